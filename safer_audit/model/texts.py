"""The texts a model reads: each response rendered in its conversation, kept in a temporary file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.files import SpooledRecords


@dataclass
class PreparedText:
    text: str
    response_start: int
    has_special_tokens: bool


SPOOL_READ = 4096  # texts read back in one pread when SpooledTexts is iterated


class SpooledTexts(Sequence):
    """PreparedTexts kept in an unnamed temporary file (deleted when closed or collected), read back by
    index or range; the driver holds 17 bytes a text (end offset, response start, special-tokens flag).

    A scan's rendered texts are used by extraction and later by the few texts a feature card shows:
    held as Python strings for the whole scan they were ~1.4 KB a pair at 100k pairs.
    """

    def __init__(self, directory: Path | None = None):
        from array import array

        self._records = SpooledRecords(directory, prefix="texts-")
        self._starts = array("q")  # response_start of each text
        self._special = bytearray()

    def extend(self, texts) -> None:
        texts = list(texts)
        self._records.extend(text.text.encode("utf-8", "surrogatepass") for text in texts)
        for text in texts:
            self._starts.append(text.response_start)
            self._special.append(1 if text.has_special_tokens else 0)

    def __len__(self) -> int:
        return len(self._records)

    def _read(self, start: int, stop: int) -> list[PreparedText]:
        return [PreparedText(data.decode("utf-8", "surrogatepass"), self._starts[i], bool(self._special[i]))
                for i, data in enumerate(self._records.read(start, stop), start)]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read(start, max(start, stop))
            return [self[i] for i in range(start, stop, step)]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._read(index, index + 1)[0]

    def __iter__(self):
        for start in range(0, len(self), SPOOL_READ):
            yield from self._read(start, min(start + SPOOL_READ, len(self)))

    def close(self) -> None:
        self._records.close()


def pair_texts(pairs, backend) -> list[PreparedText]:
    """The model input of every chosen and rejected conversation, interleaved (``pairs``: a pairs table, or
    rows as dicts)."""
    out = []
    if isinstance(pairs, list):
        conversations = [(row["chosen_messages"], row["rejected_messages"]) for row in pairs]
    else:
        conversations = zip(pairs["chosen_messages"].to_list(), pairs["rejected_messages"].to_list(), strict=False)
    for chosen, rejected in conversations:
        for messages in (chosen, rejected):
            text, start, special = backend.render(messages)
            out.append(PreparedText(text, start, special))
    return out
