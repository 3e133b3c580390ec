"""What an encoding pass keeps of every text's SAE codes: CodeStats, and the strongest activations per latent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOP_ACTIVATIONS = 50  # strongest activations kept per latent: contexts and top tokens come from these


STREAM_PAIRS = 4096  # pairs per row range when a pass reads the per-text code means (HH: one range)


def stream_pairs() -> int:
    """STREAM_PAIRS as it is now (read at each pass, so a test can make the ranges small)."""
    return STREAM_PAIRS


@dataclass
class CodeStats:
    """Per-text SAE code statistics of one dataset (text 2i chosen, 2i+1 rejected).

    The per-text code means (and pooled activations) are TextRows: read in ranges of
    STREAM_PAIRS pairs (``pair_batches``), so passes over them hold one range at a time. Data of
    at most STREAM_PAIRS pairs is one range, and every pass computes exactly what one dense
    matrix gave. ``mean_codes`` and ``pooled`` give the whole matrix, for small data only.
    """

    codes: Any  # codes.TextRows (or a tensor, wrapped) [n_texts, n_latents] mean of z over read positions, 0 if none
    n_positions: torch.Tensor  # [n_texts] read positions per text
    fire_counts: torch.Tensor  # [n_latents] positions where z_j > 0
    top_values: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] strongest activations
    top_texts: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their text index
    top_positions: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their token index in the text
    top_tokens: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their token id
    fvu: float = float("nan")  # the SAE's fraction of variance unexplained on this data
    token_counts: torch.Tensor | None = None  # [vocab seen] read positions per token id (keyword contrast)
    # TextRows (or a tensor) [n_texts, d_model] mean activation per text (ActivationStore.pooled_mean)
    pooled_rows: Any = None
    scores: torch.Tensor | None = None  # [n_texts] reward score per text (ActivationStore.scores)
    n_encoded: int = 0  # texts this pass ran through the SAE (the rest came from the codes cache)

    def __init__(self, codes, n_positions, fire_counts, top_values, top_texts, top_positions, top_tokens,
                 fvu: float = float("nan"), token_counts=None, pooled=None, scores=None, n_encoded: int = 0):
        

        self.codes = TextRows.of(codes)
        self.n_positions, self.fire_counts = n_positions, fire_counts
        self.top_values, self.top_texts, self.top_positions, self.top_tokens = (top_values, top_texts,
                                                                                top_positions, top_tokens)
        self.fvu, self.token_counts, self.scores, self.n_encoded = fvu, token_counts, scores, n_encoded
        self.pooled_rows = TextRows.of(pooled)
        self._totals: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mean_codes(self) -> torch.Tensor:
        """[n_texts, n_latents] in memory: for small data (tests, explain); passes use ``pair_batches``."""
        return self.codes.dense()

    @property
    def pooled(self) -> torch.Tensor | None:
        """[n_texts, d_model] in memory (None when unknown): for small data; the scan reads ``pooled_rows``."""
        return None if self.pooled_rows is None else self.pooled_rows.dense()

    @property
    def n_texts(self) -> int:
        return len(self.n_positions)

    def pair_batches(self, columns: torch.Tensor | None = None, rows=None):
        """``(first pair, codes)``: the code means of STREAM_PAIRS pairs at a time (texts 2p..), in order,
        restricted to ``columns`` when given; ``rows`` reads another TextRows (the pooled activations)."""
        rows = self.codes if rows is None else rows
        n_texts = rows.shape[0]
        for start in range(0, max(n_texts, 1), 2 * STREAM_PAIRS):
            codes = rows.read(start, start + 2 * STREAM_PAIRS)
            yield start // 2, codes if columns is None else codes[:, columns]

    def token_rate(self, token_id: int) -> float:
        """The token's share of all read positions (0 when unknown)."""
        if self.token_counts is None or not 0 <= token_id < len(self.token_counts):
            return 0.0
        return float(self.token_counts[token_id]) / max(self.n_tokens, 1)

    @property
    def n_tokens(self) -> int:
        return int(self.n_positions.sum())

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C and R of docs/method.md section 3: summed codes over chosen and over rejected texts (streamed;
        computed once: salience and the feature cards both read them)."""
        if self._totals is not None:
            return self._totals
        chosen = rejected = None
        for first, codes in self.pair_batches():
            n_positions = self.n_positions[2 * first:2 * first + len(codes)]
            sums = codes * n_positions.unsqueeze(1).to(codes.dtype)
            c, r = sums[0::2].sum(0), sums[1::2].sum(0)
            chosen = c if chosen is None else chosen + c
            rejected = r if rejected is None else rejected + r
        self._totals = chosen, rejected
        return chosen, rejected


def rank_within_latent(latents: torch.Tensor, n_latents: int) -> torch.Tensor:
    """For entries already grouped by latent (strongest first), each one's rank in its group."""
    counts = torch.bincount(latents, minlength=n_latents)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(latents)) - starts[latents]


def _float_order(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> int64 keys in the same order (-0.0 and 0.0 equal, as comparisons have them); no NaN."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # negative floats: larger magnitude, smaller key


def latent_value_key(latents: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One int64 key per entry that sorts ascending as (latent ascending, value descending)."""
    return latents.long() * (1 << 33) + ((1 << 32) - _float_order(values))


def _pack_ascending(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """One int64 key per entry that sorts ascending as (major, minor), both non-negative integers."""
    major, minor = major.long(), minor.long()
    if not len(minor):
        return major
    width = int(minor.max()) + 1
    if int(major.max()) >= (1 << 62) // width:
        raise ValueError("keys too large to pack")  # not for any real text index and position
    return major * width + minor


def keep_strongest(entries: dict[str, torch.Tensor], n_latents: int) -> dict[str, torch.Tensor]:
    """The TOP_ACTIVATIONS strongest entries of each latent, grouped by latent, strongest first.

    Ties go to the earlier text, then position: by the data, not by the order the cache
    served the shards in.
    """
    # two stable sorts on packed keys, (text, position) then (latent, value descending): the order the four
    # single-key sorts gave, ties included (these sorts were most of the cold SAE pass's bookkeeping)
    order = torch.argsort(_pack_ascending(entries["text"], entries["position"]), stable=True)
    order = order[torch.argsort(latent_value_key(entries["latent"][order], entries["value"][order]), stable=True)]
    grouped = {name: values[order] for name, values in entries.items()}
    keep = rank_within_latent(grouped["latent"], n_latents) < TOP_ACTIVATIONS
    return {name: values[keep] for name, values in grouped.items()}


class TextRows:
    """A ``[n_rows, width]`` float32 matrix, one row per text, written and read by rows.

    With ``directory`` the rows live in an unnamed temporary file there (deleted when closed or
    collected) and are read back with ``pread``, so the driver never holds the whole matrix: a
    scan of 100k pairs keeps a row range at a time. Page-cache pages of the file are not the
    process's RSS (unlike a memory map). Without ``directory`` (or given ``tensor``), the rows
    are an in-memory tensor.
    """

    def __init__(self, n_rows: int, width: int, directory: Path | None = None, *, tensor: torch.Tensor | None = None):
        self.n_rows, self.width = n_rows, width
        self._tensor = tensor
        self._file = None
        if tensor is not None:
            self.n_rows, self.width = int(tensor.shape[0]), int(tensor.shape[1])
        elif directory is None:
            self._tensor = torch.zeros(n_rows, width)
        else:
            import tempfile

            Path(directory).mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=directory, prefix="rows-")
            self._file.truncate(n_rows * width * 4)  # sparse: unwritten rows read as zeros

    @classmethod
    def of(cls, value) -> TextRows | None:
        """``value`` as TextRows (a tensor is wrapped, not copied); None stays None."""
        if value is None or isinstance(value, TextRows):
            return value
        return cls(0, 0, tensor=value)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.width)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set the rows ``rows`` (any order) to ``values`` ``[len(rows), width]``."""
        if self._file is None:
            self._tensor[rows] = values.to(self._tensor.dtype)
            return
        import os

        data = values.to(torch.float32).contiguous().numpy()
        fd, size = self._file.fileno(), self.width * 4
        for n, row in enumerate(rows.tolist()):
            os.pwrite(fd, data[n].tobytes(), row * size)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start`` to ``stop`` (a new tensor)."""
        if self._file is None:
            return self._tensor[start:stop]
        import os

        import numpy as np

        stop = min(stop, self.n_rows)
        if stop <= start:
            return torch.zeros(0, self.width)
        size = self.width * 4
        data = os.pread(self._file.fileno(), (stop - start) * size, start * size)
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy()).view(stop - start, self.width)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows ``rows`` (any order, repeats allowed), as ``[len(rows), width]``."""
        if self._file is None:
            return self._tensor[rows]
        out = torch.zeros(len(rows), self.width)
        for n, row in enumerate(rows.tolist()):
            out[n] = self.read(row, row + 1)[0]
        return out

    def dense(self) -> torch.Tensor:
        """The whole matrix in memory: for small data and callers that need it (not the scan)."""
        return self._tensor if self._file is None else self.read(0, self.n_rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
