"""Cheap data-quality findings of pairs: duplicates, contradictions, identical or empty responses,
different contexts, and (with a token counter) responses lost to truncation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from .schemas import content_digest
from .transcripts import render_transcript

FINDING_KINDS = ("duplicate", "contradiction", "identical", "empty_response", "context_mismatch", "truncated")


@dataclass(frozen=True)
class QualityFinding:
    """One cheap data-quality problem of one pair; ``kind`` is one of ``FINDING_KINDS``."""

    kind: str
    pair_id: str
    source: str
    line: int | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QualityChecker:
    """Check pairs one at a time; token counts are taken in batches (fast tokenizers are)."""

    def __init__(self, max_length: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None,
                 batch_size: int = 512):
        if max_length is not None and count_tokens is None:
            raise ValueError("max_length needs count_tokens to count the tokens")
        self.max_length, self.count_tokens, self.batch_size = max_length, count_tokens, batch_size
        self.context_cut = 0
        self._first_line: dict[str, int | None] = {}
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._index = 0

    def add(self, pair: dict[str, Any]) -> list[tuple[int, QualityFinding]]:
        index, self._index = self._index, self._index + 1

        def finding(kind: str, detail: str) -> tuple[int, QualityFinding]:
            return index, QualityFinding(kind, pair["pair_id"], pair["source"], pair["line"], detail)

        found = []
        chosen, rejected = pair["chosen"], pair["rejected"]
        chosen_context, rejected_context = pair["chosen_messages"][:-1], pair["rejected_messages"][:-1]
        rejected_text = render_transcript(rejected_context)[0]
        key = content_digest(pair["context"], chosen, rejected_text, rejected)
        swapped = content_digest(rejected_text, rejected, pair["context"], chosen)
        if key in self._first_line:
            found.append(finding("duplicate", f"duplicate of line {self._first_line[key]}"))
        else:
            self._first_line[key] = pair["line"]
        if swapped != key and swapped in self._first_line:
            found.append(finding("contradiction", f"line {self._first_line[swapped]} has the same responses the other way round"))
        if chosen == rejected:
            found.append(finding("identical", "chosen and rejected responses are identical"))
        empty = [side for side, text in (("chosen", chosen), ("rejected", rejected)) if not text.strip()]
        if empty:
            found.append(finding("empty_response", "both responses are empty" if len(empty) == 2
                                 else f"{empty[0]} response is empty"))
        if chosen_context != rejected_context:
            turn = next((i for i, (a, b) in enumerate(zip(chosen_context, rejected_context, strict=False)) if a != b),
                        min(len(chosen_context), len(rejected_context)))
            found.append(finding("context_mismatch", f"chosen and rejected contexts differ at message {turn + 1}"))
        if self.max_length is not None:
            self._pending.append((index, pair))
            if len(self._pending) >= self.batch_size:
                found += self.flush()
        return found

    def flush(self) -> list[tuple[int, QualityFinding]]:
        """Count tokens of the pairs waiting for it; returns their ``truncated`` findings."""
        if not self._pending:
            return []
        texts = []
        for _, pair in self._pending:
            texts += [pair["chosen"], pair["rejected"], render_transcript(pair["chosen_messages"])[0],
                      render_transcript(pair["rejected_messages"])[0]]
        counts = self.count_tokens(texts)
        found = []
        for number, (index, pair) in enumerate(self._pending):
            chosen, rejected, chosen_full, rejected_full = counts[4 * number : 4 * number + 4]
            if max(chosen_full, rejected_full) > self.max_length:
                self.context_cut += 1
            long = [f"{side} response has {count} tokens" for side, count in (("chosen", chosen), ("rejected", rejected))
                    if count > self.max_length]
            if long:
                detail = "; ".join(long) + f" (max_length {self.max_length})"
                found.append((index, QualityFinding("truncated", pair["pair_id"], pair["source"], pair["line"], detail)))
        self._pending = []
        return found


def find_quality_issues(pairs: pl.DataFrame | Iterable[dict[str, Any]], *, max_length: int | None = None,
                        count_tokens: Callable[[list[str]], list[int]] | None = None) -> list[QualityFinding]:
    """The cheap data-quality findings of ``pairs`` (a pairs table, or pair dicts), in pair order.

    ``truncated``: a final response alone is longer than ``max_length`` tokens, as counted
    by ``count_tokens(texts) -> counts``; with left truncation of the context, that is
    when response text is lost.
    """
    checker = QualityChecker(max_length, count_tokens)
    rows = pairs.iter_rows(named=True) if isinstance(pairs, pl.DataFrame) else pairs
    found = []
    for pair in rows:
        found += checker.add(pair)
    found += checker.flush()
    found.sort(key=lambda item: (item[0], FINDING_KINDS.index(item[1].kind)))
    return [finding for _, finding in found]
