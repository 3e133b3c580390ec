"""The SAE pass over an activation store, and its per-text cache.

Per text, everything downstream of the SAE (salience, scores, feature cards, the labeller,
the reward head's pooled means) needs only: for each latent firing in the text the sum of its
codes, its firing count and its strongest value; every firing (value, position, token) so the
global strongest activations per latent come out exactly as one pass would give them; the
text's read positions, token ids, FVU contribution, pooled activation and reward score.

These are kept in shards beside the activations, under ``codes/<SAE digest>/``, keyed by the
text key (a digest of the text), so a warm scan reads them instead of running the SAE again
and a scan with a few new pairs encodes only those texts. CodeStats is always assembled from
the per-text entries, freshly encoded or read back, so cold and warm scans take one path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..common.digests import short_digest
from ..common.entries import DAMAGED, index_shards, shard_keys, split_entry, tensors_digest, write_entry
from ..common.files import remove_stale_temporaries, write_atomic
from ..common.keyindex import KeyIndex
from ..errors import CacheError
from ..model.activations import ActivationStore
from .model import TopKSAE
from .stats import (
    TOP_ACTIVATIONS,
    CodeStats,
    TextRows,
    keep_strongest,
    latent_value_key,
    rank_within_latent,
    stream_pairs,
)

CODES_FORMAT = 2  # 2: each shard carries its content digest (a warm scan trusts nothing else it reads)


class CorruptEntry(CacheError):
    """A cached block or summary failed its check: it is computed again."""


def _require(condition: bool) -> None:
    """An integrity check on a cache entry: a real check (an assert vanishes under python -O)."""
    if not condition:
        raise CorruptEntry("a cached SAE code entry failed its check")


MERGE_AT = 2  # strongest-activation candidates are merged when they exceed this many tops


SUMMARY_FORMAT = 1


# a scan's summary (CodeCache.save_summary) is kept while its sparse code means and pooled activations take at most
# this many numbers (HH, 2,312 pairs: ~4M); a larger scan's warm run merges the shards (flat driver memory)
SUMMARY_NUMBERS = 1 << 24


# fields with one row per text; the others are segments per text, delimited by the named offsets
PER_TEXT = ("n_positions", "fvu", "score", "pooled")


SEGMENTS = {"agg": ("agg_latent", "agg_sum", "agg_count", "agg_max"),
            "fire": ("fire_latent", "fire_value", "fire_position", "fire_token"),
            "tok": ("token_ids",)}


def sae_digest(sae) -> str:
    """A digest of the SAE's configuration and weights: the codes cache is keyed by what encodes."""
    h = hashlib.sha256(f"codes-{CODES_FORMAT}".encode())
    h.update(json.dumps(dataclasses.asdict(sae.cfg), sort_keys=True, default=str).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return short_digest(h.hexdigest())


class CodeCache:
    """Shards of per-text SAE results for one SAE and one activation cache."""

    def __init__(self, directory: Path, *, index: bool = True):
        """``index=False``: no index of the shards already there (a Ray worker that only adds blocks)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)  # debris of killed writes; live writers' stay
        self.index = KeyIndex()  # text key -> (shard, row), ~40 bytes a text
        if index:
            index_shards(sorted(self.directory.glob("shard-*.safetensors")), self.index, str(CODES_FORMAT))

    def index_shard(self, shard: Path) -> bool:
        """Index the texts of a shard written by another process (a Ray worker); False if it is unreadable
        (and then deleted: its texts are encoded again)."""
        return bool(index_shards([shard], self.index, str(CODES_FORMAT)))

    @classmethod
    def for_store(cls, store, sae) -> CodeCache | None:
        """The cache beside ``store``'s activations for ``sae``; None for a store without a cache."""
        cache = getattr(store, "cache", None)
        if cache is None or getattr(store, "keys", None) is None:
            return None
        return cls(Path(cache.directory) / "codes" / sae_digest(sae))

    def add(self, keys: list[str], block: dict[str, torch.Tensor]) -> Path | None:
        """Write one block (encode_chunk's layout) atomically and index it; the shard's path."""
        if not keys:
            return None
        name = short_digest(hashlib.sha256(json.dumps(keys).encode()).hexdigest())
        path = self.directory / f"shard-{name}.safetensors"
        tensors = {k: v.contiguous() for k, v in block.items()}
        write_entry(path, tensors, {"keys": json.dumps(keys), "format": str(CODES_FORMAT),
                                    "digest": block_digest(keys, tensors)})
        self.index.add(path, keys)
        return path

    def load(self, path: Path) -> dict[str, torch.Tensor] | None:
        """A shard's block, or None (and the shard deleted, its texts to encode again) if unreadable."""
        try:
            block, meta = split_entry(path.read_bytes())
            _check_block(block)
            _require(meta.get("digest") == block_digest(json.loads(meta["keys"]), block))  # flipped bytes: encoded again
        except (*DAMAGED, CorruptEntry):
            path.unlink(missing_ok=True)
            self.index.drop(path)
            return None
        return block

    def summary_path(self, keys: list[str]) -> Path:
        """Where the summary of a scan of the texts ``keys`` (in this order) lives: content-addressed."""
        h = hashlib.sha256(json.dumps([SUMMARY_FORMAT, CODES_FORMAT, TOP_ACTIVATIONS, list(keys)]).encode())
        return self.directory / f"summary-{short_digest(h.hexdigest())}.safetensors"

    def load_summary(self, keys: list[str]) -> dict[str, torch.Tensor] | None:
        """The summary of a scan of ``keys``, or None: missing, or unreadable / altered (then deleted, to be made
        again: an entry is used only when its content digest matches)."""
        path = self.summary_path(keys)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            size = struct.unpack("<Q", data[:8])[0]
            meta = json.loads(data[8:8 + size])["__metadata__"]
            _require(meta.get("format") == str(SUMMARY_FORMAT))
            _require(meta.get("keys") == _keys_digest(keys))
            _require(meta.get("digest") == hashlib.blake2b(data[8 + size:], digest_size=16).hexdigest())
            summary = load_safetensors(data)
            _check_summary(summary, len(keys))
        except (*DAMAGED, CorruptEntry):
            path.unlink(missing_ok=True)
            return None
        return summary

    def save_summary(self, keys: list[str], summary: dict[str, torch.Tensor]) -> None:
        """Write the summary of a scan of ``keys`` atomically, with the digest of its tensor bytes."""
        tensors = {k: v.contiguous() for k, v in summary.items()}
        data = save_safetensors(tensors)  # no metadata yet: the digest covers the bytes after the header
        del tensors
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]  # not copied: a summary can be hundreds of MB
        header["__metadata__"] = {"format": str(SUMMARY_FORMAT), "keys": _keys_digest(keys),
                                  "digest": hashlib.blake2b(body, digest_size=16).hexdigest()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the tensor data to 8 bytes

        def write(path: Path) -> None:
            with open(path, "wb") as out:
                out.write(struct.pack("<Q", len(raw)) + raw)
                out.write(body)

        try:
            write_atomic(self.summary_path(keys), write)
        finally:
            body.release()



def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest()


SUMMARY_FIELDS = ("n_positions", "fvu", "seen", "scores", "pooled", "fire_counts", "token_counts", "code_offsets",
                  "code_latent", "code_mean", "top_value", "top_text", "top_position", "top_token")


def _check_summary(summary: dict[str, torch.Tensor], n_texts: int) -> None:
    _require(set(summary) == set(SUMMARY_FIELDS))
    _require(len(summary["n_positions"]) == n_texts and len(summary["code_offsets"]) == n_texts + 1)
    _require(int(summary["code_offsets"][0]) == 0 and int(summary["code_offsets"][-1]) == len(summary["code_latent"]))
    _require(len(summary["code_mean"]) == len(summary["code_latent"]))
    if int(summary["seen"]):
        _require(len(summary["scores"]) == n_texts and len(summary["pooled"]) == n_texts)
    shape = summary["top_value"].shape
    _require(all(summary[name].shape == shape for name in ("top_text", "top_position", "top_token")))
    _require(shape == (TOP_ACTIVATIONS, len(summary["fire_counts"])))


def block_digest(keys: list[str], block: dict[str, torch.Tensor]) -> str:
    """The digest of a codes shard's keys and tensors (entries.tensors_digest), stored in its header and checked
    on reading."""
    return tensors_digest([CODES_FORMAT, list(keys)], block)


def _header_keys(path: Path) -> list[str] | None:
    return shard_keys(path, str(CODES_FORMAT))


def _check_block(block: dict[str, torch.Tensor]) -> None:
    n = len(block["n_positions"])
    for field in PER_TEXT:
        _require(len(block[field]) == n)
    for group, fields in SEGMENTS.items():
        offsets = block[f"{group}_offsets"]
        _require(len(offsets) == n + 1 and int(offsets[0]) == 0)
        for field in fields:
            _require(len(block[field]) == int(offsets[-1]))


@torch.inference_mode()
def encode_chunk(sae, offsets: torch.Tensor, tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The per-text entries of one chunk of texts (ActivationStore.iter_chunks' layout), in chunk order."""
    n_texts, n_latents = len(offsets) - 1, sae.cfg.n_latents
    lengths = offsets[1:] - offsets[:-1]
    acts = tensors["acts"]
    segment = torch.repeat_interleave(torch.arange(n_texts), lengths)  # chunk text of each token
    scores = tensors.get("scores")
    block = {
        "n_positions": lengths.long(),
        "fvu": torch.zeros(n_texts, dtype=torch.float64),
        "score": scores.float() if scores is not None else torch.full((n_texts,), float("nan")),
        # the reward head's input (ActivationStore.pooled_mean), so a warm scan needs no activations
        "pooled": torch.zeros(n_texts, acts.shape[1]).index_add_(0, segment, acts)
        / lengths.clamp(min=1).unsqueeze(1),
        "token_ids": tensors["token_ids"].long(),
    }
    if len(acts):
        x, x_hat, top_vals, top_idx = _encode_decode(sae, acts.to(device))
        values, latents = top_vals.float().cpu(), top_idx.cpu()
        # each token's share of ForwardOutput.fvu (a mean over tokens), summed per text
        norm2 = x.pow(2).sum(dim=-1).clamp_min(1e-12)
        token_fvu = ((x - x_hat).pow(2).sum(dim=-1) / norm2).double().cpu()
        block["fvu"].index_add_(0, segment, token_fvu)
        active = values > 0
        rows = torch.arange(len(values)).unsqueeze(1).expand_as(latents)[active]
        fire_text, fire_latent, fire_value = segment[rows], latents[active], values[active]
        # rows are in token order, so firings are already grouped by text
        pair = fire_text * n_latents + fire_latent
        unique, inverse = _unique_small(pair, n_texts * n_latents)  # sorted: grouped by text, then latent
        agg_text = unique // n_latents
        block.update({
            "agg_latent": (unique % n_latents).int(),
            "agg_sum": torch.zeros(len(unique)).index_add_(0, inverse, fire_value),
            "agg_count": torch.bincount(inverse, minlength=len(unique)).int(),
            "agg_max": torch.zeros(len(unique)).scatter_reduce_(0, inverse, fire_value, "amax"),
            "fire_latent": fire_latent.int(), "fire_value": fire_value,
            "fire_position": tensors["positions"].int()[rows], "fire_token": tensors["token_ids"].long()[rows],
        })
    else:
        agg_text = fire_text = torch.zeros(0, dtype=torch.long)
        block.update({"agg_latent": torch.zeros(0, dtype=torch.int32), "agg_sum": torch.zeros(0),
                      "agg_count": torch.zeros(0, dtype=torch.int32), "agg_max": torch.zeros(0),
                      "fire_latent": torch.zeros(0, dtype=torch.int32), "fire_value": torch.zeros(0),
                      "fire_position": torch.zeros(0, dtype=torch.int32), "fire_token": torch.zeros(0, dtype=torch.long)})
    block["agg_offsets"] = _offsets(torch.bincount(agg_text, minlength=n_texts))
    block["fire_offsets"] = _offsets(torch.bincount(fire_text, minlength=n_texts))
    block["tok_offsets"] = _offsets(lengths.long())
    return block


DENSE_UNIQUE = 1 << 24  # value ranges up to this size are made unique by counting, not sorting


def _unique_small(values: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` of integers in ``[0, bound)``: by counting when the range
    is small (a chunk's texts x latents), with no sort of the firings; the same two tensors either way."""
    if bound > DENSE_UNIQUE or not len(values):
        return torch.unique(values, return_inverse=True)
    present = torch.bincount(values, minlength=bound) > 0
    unique = present.nonzero().squeeze(1)
    rank = torch.cumsum(present, 0) - 1
    return unique, rank[values]


def _encode_decode(sae, acts: torch.Tensor):
    """(x, x_hat, top_vals, top_idx) of ``sae(acts)``: for the built-in TopKSAE the same tensors without the
    training forward's extras (its loss terms, the autograd wrapper's copy); any other SAE through its forward."""

    if type(sae).forward is not TopKSAE.forward:
        out = sae(acts)
        return out.x, out.x_hat, out.top_vals, out.top_idx
    x = sae.normalize(acts)
    pre = torch.addmm(sae.b_enc, x - sae.b_pre, sae.W_enc)  # as TopKSAE.forward computes it
    top_pre, top_idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    del pre
    top_vals = top_pre.relu()
    return x, sae.decode(top_vals, top_idx), top_vals, top_idx


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=torch.long)
    out[1:] = torch.cumsum(counts, 0)
    return out


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated arange(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    return torch.repeat_interleave(shift, lengths) + torch.arange(total)


def select_rows(block: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The entries of ``rows`` of a block, as a block of their own (rows may repeat)."""
    if len(rows) == len(block["n_positions"]) and torch.equal(rows, torch.arange(len(rows))):
        return block  # all of it, in order: no copy of the firings (the bulk of a warm scan's memory)
    out = {field: block[field][rows] for field in PER_TEXT}
    for group, fields in SEGMENTS.items():
        offsets = block[f"{group}_offsets"]
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        gather = _ranges(starts, lengths)
        out[f"{group}_offsets"] = _offsets(lengths)
        out.update({field: block[field][gather] for field in fields})
    return out




class _Accumulator:
    """CodeStats built block by block, in any order, holding only per-text numbers, running sums and
    the strongest activations: the per-text code means (and pooled activations) go to TextRows."""

    def __init__(self, n_texts: int, n_latents: int, directory: Path | None, *, keep_sparse: bool = False):
        self.n_texts, self.n_latents, self.directory = n_texts, n_latents, directory
        self.n_positions = torch.zeros(n_texts, dtype=torch.long)
        self.fvu = torch.zeros(n_texts, dtype=torch.float64)
        self.scores = torch.full((n_texts,), float("nan"))
        self.codes = TextRows(n_texts, n_latents, directory)
        self.pooled: TextRows | None = None
        self.fire_counts = torch.zeros(n_latents, dtype=torch.long)
        self.token_counts = torch.zeros(0, dtype=torch.long)
        self.top: dict[str, torch.Tensor] | None = None
        # candidates for the strongest activations, merged into ``top`` only when they outgrow it: one sort
        # per few blocks instead of one per block (the same total order, so the same result bit for bit)
        self.pending: list[dict[str, torch.Tensor]] = []
        self.n_pending = 0
        self.seen = False
        # the sparse code means (text, latent, mean) as added, for the scan's summary: dropped when they outgrow it
        self.sparse: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if keep_sparse else None
        self.n_sparse = 0

    def add(self, index: torch.Tensor, block: dict[str, torch.Tensor]) -> None:
        """The per-text entries ``block`` (encode_chunk's layout) of the dataset texts ``index``."""

        index = index.long()
        n = len(index)
        if n == 0:
            return
        self.seen = True
        n_positions = block["n_positions"].long()
        self.n_positions[index] = n_positions
        self.fvu[index] = block["fvu"].double()
        self.scores[index] = block["score"].float()
        if self.pooled is None:
            self.pooled = TextRows(self.n_texts, block["pooled"].shape[1], self.directory)
        self.pooled.write(index, block["pooled"])
        agg_local = torch.repeat_interleave(torch.arange(n), block["agg_offsets"].diff())
        agg_latent = block["agg_latent"].long()
        means = torch.zeros(n, self.n_latents)
        values = block["agg_sum"] / n_positions[agg_local].clamp(min=1)
        means[agg_local, agg_latent] = values
        self.codes.write(index, means)
        if self.sparse is not None:
            self.sparse.append((index[agg_local], agg_latent.int(), values))
            self.n_sparse += len(values)
            if self.n_sparse + self.n_texts * block["pooled"].shape[1] > SUMMARY_NUMBERS:
                self.sparse = None
        self.fire_counts.index_add_(0, agg_latent, block["agg_count"].long())
        if len(block["token_ids"]):
            counts = torch.bincount(block["token_ids"].long())
            if len(counts) > len(self.token_counts):
                counts[:len(self.token_counts)] += self.token_counts
                self.token_counts = counts
            else:
                self.token_counts[:len(counts)] += counts
        if not len(agg_latent):
            return
        # the 50th strongest per-text maximum of a latent bounds its 50th strongest firing in this block
        # from below: only firings at or above it can be among its strongest, so only those are kept
        threshold = torch.zeros(self.n_latents)
        by_max = torch.argsort(latent_value_key(agg_latent, block["agg_max"]), stable=True)
        last = rank_within_latent(agg_latent[by_max], self.n_latents) == TOP_ACTIVATIONS - 1
        threshold[agg_latent[by_max][last]] = block["agg_max"][by_max][last]
        fire_latent = block["fire_latent"].long()
        keep = block["fire_value"] >= threshold[fire_latent]
        fire_text = torch.repeat_interleave(index, block["fire_offsets"].diff())
        entries = {"latent": fire_latent[keep], "value": block["fire_value"][keep].float(), "text": fire_text[keep],
                   "position": block["fire_position"][keep].long(), "token": block["fire_token"][keep].long()}
        self.pending.append(entries)
        self.n_pending += len(entries["latent"])
        if self.n_pending > MERGE_AT * TOP_ACTIVATIONS * self.n_latents:
            self._merge()

    def _merge(self) -> None:

        if not self.pending:
            return
        # a total order (latent, value, text, position): merging in any grouping gives the one-pass top
        parts = ([self.top] if self.top is not None else []) + self.pending
        entries = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        self.top = keep_strongest(entries, self.n_latents)
        self.pending, self.n_pending = [], 0

    def finish(self):

        top = self.top_dense()
        fvu = float(self.fvu.sum()) / max(int(self.n_positions.sum()), 1) if self.seen else 0.0
        return CodeStats(self.codes, self.n_positions, self.fire_counts, top["value"], top["text"],
                         top["position"], top["token"], fvu, self.token_counts,
                         pooled=self.pooled if self.seen else None, scores=self.scores if self.seen else None)

    def summary(self, stats) -> dict[str, torch.Tensor] | None:
        """What ``stats`` (this accumulator's finish()) holds, for CodeCache.save_summary; None when too large."""
        if self.sparse is None:
            return None
        # each column's parts are let go as soon as they are joined: the summary of a scan near SUMMARY_NUMBERS
        # held the parts, their join and the sorted copy at once
        parts, self.sparse = self.sparse, None
        text = torch.cat([t for t, _, _ in parts]) if parts else torch.zeros(0, dtype=torch.long)
        latent = torch.cat([lat for _, lat, _ in parts]) if parts else torch.zeros(0, dtype=torch.int32)
        mean = torch.cat([m for _, _, m in parts]) if parts else torch.zeros(0)
        del parts
        order = torch.argsort(text, stable=True)  # each text's entries come from one block, in latent order
        latent, mean = latent[order], mean[order]
        del order
        empty = torch.zeros(0)
        return {"n_positions": self.n_positions, "fvu": torch.tensor([stats.fvu], dtype=torch.float64),
                "seen": torch.tensor([int(self.seen)]), "scores": self.scores if self.seen else empty,
                "pooled": self.pooled.read(0, self.n_texts) if self.seen else empty,
                "fire_counts": self.fire_counts, "token_counts": self.token_counts,
                "code_offsets": _offsets(torch.bincount(text, minlength=self.n_texts)),
                "code_latent": latent, "code_mean": mean,
                "top_value": stats.top_values, "top_text": stats.top_texts, "top_position": stats.top_positions,
                "top_token": stats.top_tokens}

    def top_dense(self) -> dict[str, torch.Tensor]:

        self._merge()

        n_latents = self.n_latents
        dense = {name: torch.full((TOP_ACTIVATIONS, n_latents), fill, dtype=dtype)
                 for name, fill, dtype in (("value", -1.0, torch.float32), ("text", -1, torch.long),
                                           ("position", 0, torch.long), ("token", 0, torch.long))}
        if self.top is not None:
            rank = rank_within_latent(self.top["latent"], n_latents)
            for name in dense:
                dense[name][rank, self.top["latent"]] = self.top[name]
        return dense


SUMMARY_ROWS = 1024  # texts whose dense code means are rebuilt from a summary at a time


def stats_from_summary(summary: dict[str, torch.Tensor], n_latents: int, directory: Path | None):
    """The CodeStats a summary was made from, bit for bit (the code means rebuilt as the accumulator wrote them).

    Data of one range of pairs (stats.STREAM_PAIRS) keeps its rows in memory: every pass reads that whole
    range anyway, and this spares writing the rows to a file and copying them back on each pass.
    """

    n_positions = summary["n_positions"]
    n_texts = len(n_positions)
    if n_texts <= 2 * stream_pairs():
        directory = None
    codes = TextRows(n_texts, n_latents, directory)
    offsets, latent, mean = summary["code_offsets"], summary["code_latent"].long(), summary["code_mean"]
    for start in range(0, n_texts, SUMMARY_ROWS):
        stop = min(start + SUMMARY_ROWS, n_texts)
        lo, hi = int(offsets[start]), int(offsets[stop])
        local = torch.repeat_interleave(torch.arange(stop - start), offsets[start:stop + 1].diff())
        means = torch.zeros(stop - start, n_latents)
        means[local, latent[lo:hi]] = mean[lo:hi]
        codes.write(torch.arange(start, stop), means)
    seen = bool(int(summary["seen"][0]))
    pooled = None
    if seen:
        pooled = TextRows(n_texts, summary["pooled"].shape[1], directory)
        pooled.write(torch.arange(n_texts), summary["pooled"])
    return CodeStats(codes, n_positions, summary["fire_counts"], summary["top_value"], summary["top_text"],
                     summary["top_position"], summary["top_token"], float(summary["fvu"][0]),
                     summary["token_counts"], pooled=pooled, scores=summary["scores"] if seen else None)


def encode_store(store, sae, *, progress=None, cache: CodeCache | None = None):
    """CodeStats of ``store``: cached texts are read from ``cache``, only the others encoded.

    Streamed: each shard (read back or freshly encoded) is folded into the result and let go,
    so the driver's memory does not grow with the number of texts beyond a few numbers per text;
    with a cache, the per-text code means go to a temporary file in it (TextRows). A scan of the
    very texts of an earlier one reads that scan's summary instead: one checked entry, no merge.
    """
    n_texts = store.n_texts
    if cache is not None:
        summary = cache.load_summary(list(store.keys))
        if summary is not None:
            stats = stats_from_summary(summary, sae.cfg.n_latents, cache.directory)
            if progress is not None:
                progress(n_texts, n_texts)
            return stats
    device = next(sae.parameters()).device
    acc = _Accumulator(n_texts, sae.cfg.n_latents, cache.directory if cache is not None else None,
                       keep_sparse=cache is not None)
    n_encoded = 0
    if cache is None:
        for texts, offsets, tensors in store.iter_chunks():
            acc.add(texts, encode_chunk(sae, offsets, tensors, device))
            n_encoded += len(texts)
            if progress is not None:
                progress(n_encoded, n_texts)
    else:
        executor = getattr(store, "executor", None)  # the engine that extracted the store encodes it too
        if executor is not None:
            # its workers fill the cache with the missing texts' blocks; the fold below then reads them all
            n_encoded = executor.encode_missing(store, sae, cache, progress)
        n_encoded += _fold_cached(store, sae, cache, acc, device, progress)
    stats = acc.finish()
    stats.n_encoded = n_encoded
    if cache is not None:
        summary = acc.summary(stats)
        if summary is not None:
            cache.save_summary(list(store.keys), summary)
    return stats


def missing_texts(store, cache: CodeCache) -> list[str]:
    """The keys of ``store``'s texts whose blocks ``cache`` does not index, each once, in dataset order."""
    return list(dict.fromkeys(cache.index.missing(store.keys)))


def _fold_cached(store, sae, cache: CodeCache, acc: _Accumulator, device, progress) -> int:
    """Fold the cached texts' shards into ``acc``, encode (and cache) the others; the number encoded."""

    n_texts, n_encoded = store.n_texts, 0
    keys = list(store.keys)
    by_shard: dict[Path, list[tuple[int, int]]] = {}
    paths, shards, rows = cache.index.locate(keys)
    for text, (number, row) in enumerate(zip(shards.tolist(), rows.tolist(), strict=True)):
        if number >= 0:
            by_shard.setdefault(paths[number], []).append((text, row))
    del shards, rows
    done = 0
    cached: set[int] = set()
    for shard, served in by_shard.items():
        block = cache.load(shard)
        if block is None:
            continue  # unreadable: its texts are encoded below
        acc.add(torch.tensor([t for t, _ in served]), select_rows(block, torch.tensor([r for _, r in served])))
        cached.update(t for t, _ in served)
        done += len(served)
        del block
    missing = list(dict.fromkeys(k for t, k in enumerate(keys) if t not in cached))
    if progress is not None:
        progress(done, n_texts)
    if not missing:
        return 0
    wanted: dict[str, list[int]] = {}
    for text, key in enumerate(keys):
        if text not in cached:
            wanted.setdefault(key, []).append(text)
    if hasattr(store, "ensure_verified"):
        store.ensure_verified()  # a lazily extracted store checks (or computes again) its shards now
    # a store of just the missing texts streams only the activation shards that hold them
    sub = ActivationStore(store.cache, missing, store.d_model, store.backend_identity)
    for texts, offsets, tensors in sub.iter_chunks():
        block = encode_chunk(sae, offsets, tensors, device)
        chunk_keys = [missing[t] for t in texts.tolist()]
        cache.add(chunk_keys, block)
        n_encoded += len(chunk_keys)
        # a text that occurs twice in the data is encoded once and used for both
        rows = [r for r, key in enumerate(chunk_keys) for _ in wanted[key]]
        acc.add(torch.tensor([t for key in chunk_keys for t in wanted[key]]),
                select_rows(block, torch.tensor(rows, dtype=torch.long)))
        done += len(rows)
        if progress is not None:
            progress(done, n_texts)
    return n_encoded


