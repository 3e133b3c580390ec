"""Reward-model activations: positions, the content-addressed on-disk cache, extraction.

Every chosen and rejected conversation becomes one *text*; a pair ``i`` has its chosen
text at index ``2*i`` and its rejected text at ``2*i + 1``. For each text we keep the
hidden states of one layer at the read positions (METHOD.md section 1), the token ids
there, and the reward score when the model has a head.

The cache is content-addressed: a text's key hashes the model fingerprint, layer,
positions, max_length and the exact input text, so unchanged texts never run a forward
pass again. Texts are stored in shards (``shard-<blake2b of the file>.safetensors``)
written atomically; a shard whose bytes no longer match its name is corrupt and is
deleted and recomputed. An interrupted run keeps every shard written before the
interruption, so it resumes there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import ActivationConfig
from .errors import CacheError, ConfigError
from .files import write_atomic

CACHE_FORMAT = 1
SHARD_TEXTS = 256  # texts per shard: a killed run loses at most this much work
TOKENIZE_CHUNK = 512  # texts tokenized at once when measuring lengths
PUNCTUATION = ".,?!;"
PUNCTUATION_MIN_GAP = 5


# --------------------------------------------------------------------------- positions

def read_positions(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int],
                   response_start: int, positions: str) -> list[int]:
    """Token indices to read for one tokenized text (METHOD.md section 1).

    ``all``: every non-special token. ``response``: the tokens of the final turn.
    ``punctuation``: the token ending each run of ``. , ? ! ;`` or a line break, at least
    5 tokens after the last kept one.
    """
    real = [i for i, (s, e) in enumerate(offsets) if not special[i] and e > s]
    if positions == "all":
        return real
    if positions == "response":
        return [i for i in real if offsets[i][1] > response_start]
    if positions != "punctuation":
        raise ConfigError(f"unknown positions {positions!r}")

    def ends_clause(j: int) -> bool:
        s, e = offsets[real[j]]
        nxt = offsets[real[j + 1]][0] if j + 1 < len(real) else len(text)
        return text[s:e][-1:] in PUNCTUATION or "\n" in text[e:nxt]

    kept: list[int] = []
    for j in range(len(real)):
        if not ends_clause(j):
            continue
        nxt_is_punct = j + 1 < len(real) and text[offsets[real[j + 1]][0]:offsets[real[j + 1]][1]][-1:] in PUNCTUATION
        if nxt_is_punct and "\n" not in text[offsets[real[j]][1]:offsets[real[j + 1]][0]]:
            continue  # not the end of the run yet
        if kept and real[j] - kept[-1] < PUNCTUATION_MIN_GAP:
            continue
        kept.append(real[j])
    return kept


# ------------------------------------------------------------------------------ cache

def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def config_key(identity: str, fingerprint: str, layer: int, positions: str, max_length: int) -> str:
    """The cache sub-directory for one model + reading configuration."""
    blob = json.dumps([CACHE_FORMAT, identity, fingerprint, layer, positions, max_length])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class TextActivations:
    """What the cache holds for one text."""

    acts: torch.Tensor  # [n_positions, d_model] float32
    token_ids: torch.Tensor  # [n_positions] int64
    positions: torch.Tensor  # [n_positions] int32, token index in the truncated input
    score: float  # reward score, NaN when the model has no head


class ActivationCache:
    """Shards of text activations for one model + layer + positions + max_length."""

    def __init__(self, root: Path, key: str, meta: dict | None = None):
        self.directory = Path(root) / "activations" / key
        self.directory.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            meta_path = self.directory / "config.json"
            if not meta_path.exists():
                write_atomic(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        self.index: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._verified: set[Path] = set()
        for stale in self.directory.glob(".*.tmp"):  # debris of a killed write (files.write_atomic)
            stale.unlink(missing_ok=True)
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            keys = _shard_keys(shard)
            if keys is None:
                shard.unlink(missing_ok=True)
                continue
            for row, key in enumerate(keys):
                self.index.setdefault(key, (shard, row))

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def add_shard(self, keys: list[str], items: list[TextActivations]) -> None:
        """Write one shard atomically and index it."""
        offsets = [0]
        for item in items:
            offsets.append(offsets[-1] + item.acts.shape[0])
        tensors = {
            "acts": torch.cat([i.acts for i in items]).float().contiguous(),
            "token_ids": torch.cat([i.token_ids for i in items]).long().contiguous(),
            "positions": torch.cat([i.positions for i in items]).int().contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.long),
            "scores": torch.tensor([i.score for i in items], dtype=torch.float32),
        }
        data = save_safetensors(tensors, metadata={"keys": json.dumps(keys), "format": str(CACHE_FORMAT)})
        path = self.directory / f"shard-{_digest(data)}.safetensors"
        write_atomic(path, data)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (path, row))

    def load_shard(self, path: Path) -> dict[str, torch.Tensor] | None:
        """A shard's tensors, checked against the hash in its name; None (and deleted) if corrupt.

        The hash is checked once per shard and cache object: a scan streams the store
        several times (verify, SAE pass, pooling), and re-hashing 300 MB each time bought
        nothing a first check had not.
        """
        if path in self._loaded:
            return self._loaded[path]
        try:
            data = path.read_bytes()
            ok = path in self._verified or path.name == f"shard-{_digest(data)}.safetensors"
            tensors = load_safetensors(data) if ok else None
        except (OSError, ValueError, RuntimeError):  # safetensors raises on a bad header
            tensors = None
        if tensors is None:
            path.unlink(missing_ok=True)
            self.index = {k: v for k, v in self.index.items() if v[0] != path}
            return None
        self._verified.add(path)
        self._loaded = {path: tensors}  # keep one shard in memory: stream, don't hoard
        return tensors

    def get(self, key: str) -> TextActivations | None:
        location = self.index.get(key)
        if location is None:
            return None
        tensors = self.load_shard(location[0])
        if tensors is None:
            return None
        row = location[1]
        lo, hi = tensors["offsets"][row].item(), tensors["offsets"][row + 1].item()
        return TextActivations(tensors["acts"][lo:hi], tensors["token_ids"][lo:hi],
                               tensors["positions"][lo:hi], tensors["scores"][row].item())

    def verify(self, keys: Sequence[str]) -> list[str]:
        """Keys whose shard is missing or corrupt (their entries are dropped, to recompute)."""
        for shard in sorted({self.index[k][0] for k in keys if k in self.index}):
            self.load_shard(shard)
        self._loaded = {}
        return [k for k in keys if k not in self.index]


def _shard_keys(path: Path) -> list[str] | None:
    """The text keys listed in a shard's header, without reading its tensors."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > 100_000_000:
                return None
            header = json.loads(handle.read(size))
        return json.loads(header["__metadata__"]["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_cache_meta(meta_path: Path) -> dict:
    """A cache entry's config.json; a damaged one is marked (``config_error``), not fatal:
    the shards beside it are still counted and ``cache clear`` still removes them."""
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {"config_error": f"{meta_path}: not valid JSON ({exc})"}
    if not isinstance(meta, dict):
        return {"config_error": f"{meta_path}: not a JSON object"}
    return meta


def cache_info(root: Path) -> list[dict]:
    """One row per cached configuration: model, layer, positions, texts, bytes."""
    rows = []
    base = Path(root) / "activations"
    for directory in sorted(base.glob("*")) if base.exists() else []:
        meta = _read_cache_meta(directory / "config.json")
        shards = list(directory.glob("shard-*.safetensors"))
        texts = sum(len(_shard_keys(s) or []) for s in shards)
        rows.append({"key": directory.name, **meta, "shards": len(shards), "texts": texts,
                     "bytes": sum(s.stat().st_size for s in shards)})
    return rows


def cache_clear(root: Path) -> int:
    """Delete every cached activation under ``root``; returns the bytes freed."""
    base = Path(root) / "activations"
    if not base.exists():
        return 0
    freed = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    shutil.rmtree(base)
    return freed


# ------------------------------------------------------------------------- extraction

@dataclass
class ActivationStore:
    """The activations of one dataset's texts, read back from the cache shard by shard."""

    cache: ActivationCache
    keys: list[str]  # one per text, dataset order
    d_model: int
    backend_identity: str
    n_forward_texts: int = 0  # texts that ran a forward pass in this extraction
    _locations: list[tuple[Path, int]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._locations = [self.cache.index[k] for k in self.keys]

    @property
    def n_texts(self) -> int:
        return len(self.keys)

    def iter_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """Per shard: (text indices, per-text token offsets, tensors of those texts' positions).

        Tensors hold ``acts``, ``token_ids``, ``positions`` and ``scores`` for the texts
        in ``text indices``, in that order. One shard is in memory at a time.
        """
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for text, (shard, row) in enumerate(self._locations):
            by_shard.setdefault(shard, []).append((text, row))
        for shard in sorted(by_shard):
            _release_freed_memory()  # the previous shard's buffers
            tensors = self.cache.load_shard(shard)
            if tensors is None:
                raise CacheError(f"cache shard {shard.name} became unreadable during the run")
            texts = torch.tensor([t for t, _ in by_shard[shard]], dtype=torch.long)
            rows = torch.tensor([r for _, r in by_shard[shard]], dtype=torch.long)
            starts, ends = tensors["offsets"][rows], tensors["offsets"][rows + 1]
            lengths = ends - starts
            gather = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())]) \
                if len(rows) else torch.zeros(0, dtype=torch.long)
            offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(lengths, 0)
            yield texts, offsets, {
                "acts": tensors["acts"][gather],
                "token_ids": tensors["token_ids"][gather],
                "positions": tensors["positions"][gather],
                "scores": tensors["scores"][rows],
            }
        self.cache._loaded = {}

    def iter_acts(self) -> Iterator[torch.Tensor]:
        """Just the activation rows, shard by shard (the SAE trains on this stream)."""
        for _texts, _offsets, tensors in self.iter_chunks():
            yield tensors["acts"]

    def n_tokens(self) -> int:
        total = 0
        for _texts, offsets, _tensors in self.iter_chunks():
            total += int(offsets[-1])
        return total

    def text(self, index: int) -> TextActivations:
        item = self.cache.get(self.keys[index])
        if item is None:
            raise CacheError(f"text {index} is missing from the cache")
        return item

    def scores(self) -> torch.Tensor:
        """Reward score per text (NaN without a reward head)."""
        out = torch.full((self.n_texts,), float("nan"))
        for texts, _offsets, tensors in self.iter_chunks():
            out[texts] = tensors["scores"]
        return out

    def pooled_mean(self) -> torch.Tensor:
        """Mean activation over each text's read positions [n_texts, d_model]; 0 when none."""
        out = torch.zeros(self.n_texts, self.d_model)
        for texts, offsets, tensors in self.iter_chunks():
            lengths = offsets[1:] - offsets[:-1]
            segment = torch.repeat_interleave(torch.arange(len(texts)), lengths)
            sums = torch.zeros(len(texts), self.d_model).index_add_(0, segment, tensors["acts"])
            out[texts] = sums / lengths.clamp(min=1).unsqueeze(1)
        return out


@dataclass
class PreparedText:
    text: str
    response_start: int
    has_special_tokens: bool


def pair_texts(pairs, backend) -> list[PreparedText]:
    """The model input of every chosen and rejected conversation, interleaved."""
    out = []
    for chosen, rejected in zip(pairs["chosen_messages"].to_list(), pairs["rejected_messages"].to_list()):
        for messages in (chosen, rejected):
            text, start, special = backend.render(messages)
            out.append(PreparedText(text, start, special))
    return out


def load_backend(config: ActivationConfig):
    """The model backend named by the configuration, through the plugin registry."""
    from .plugins import model_backends

    backends = model_backends()
    if config.backend not in backends:
        raise ConfigError(f"unknown model backend {config.backend!r} (known: {', '.join(sorted(backends))})")
    return backends[config.backend](config.model, device=config.device, dtype=config.dtype,
                                    trust_remote_code=config.trust_remote_code)


def resolve_layer(layer: int, n_layers: int) -> int:
    """1-based block index; negative counts from the end (-1 is the last block)."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 1 <= resolved <= n_layers:
        raise ConfigError(f"layer {layer} is out of range for a model with {n_layers} layers "
                         f"(use 1..{n_layers}, or -1..-{n_layers} from the end)")
    return resolved


def open_cache(backend, config: ActivationConfig, layer: int) -> ActivationCache:
    key = config_key(backend.identity, backend.fingerprint, layer, config.positions, config.max_length)
    meta = {"model": backend.identity, "fingerprint": backend.fingerprint, "layer": layer,
            "positions": config.positions, "max_length": config.max_length, "d_model": backend.d_model}
    return ActivationCache(config.cache_dir, key, meta)


def extract_activations(texts: Sequence[PreparedText], backend, config: ActivationConfig, *,
                        want_score: bool | None = None, progress=None) -> ActivationStore:
    """Activations for every text, computing only what the cache does not hold.

    ``want_score`` defaults to whether the model has a reward head; without it the
    forward pass stops at the read layer. ``progress(done, total)`` is called per batch.
    """
    layer = resolve_layer(config.layer, backend.n_layers)
    if want_score is None:
        want_score = backend.has_reward_head
    cache = open_cache(backend, config, layer)
    keys = [text_key(t.text) for t in texts]
    missing = cache.verify(keys)
    todo: dict[str, PreparedText] = {}
    for key, text in zip(keys, texts):
        if key in missing:
            todo.setdefault(key, text)
    computed = _compute(list(todo.items()), backend, config, layer, want_score, cache, progress)
    return ActivationStore(cache, keys, backend.d_model, backend.identity, n_forward_texts=computed)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Batches grow in length as extraction goes (they are length-sorted), so glibc cannot
    reuse the smaller freed blocks and keeps them: peak RSS grew with the dataset (2.5 GB
    after extracting HH, 0.5 GB after malloc_trim). Trimming once per shard bounds it.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _tokenize(items: list[PreparedText], backend, max_length: int):
    """Token ids, offsets and special-token masks of ``items``, in their order."""
    out: list = [None] * len(items)
    for special in (False, True):
        where = [i for i, item in enumerate(items) if item.has_special_tokens == special]
        if where:
            ids, offsets, specials = backend.tokenize([items[i].text for i in where], max_length=max_length,
                                                      has_special_tokens=special)
            for i, row in zip(where, zip(ids, offsets, specials)):
                out[i] = row
    return out


def _compute(todo: list[tuple[str, PreparedText]], backend, config: ActivationConfig, layer: int,
             want_score: bool, cache: ActivationCache, progress) -> int:
    """Run the model over ``todo`` in length-sorted batches and write shards as they fill.

    Lengths come first, a chunk of texts at a time; each batch is tokenized again with its
    offsets. Holding every text's full encoding at once cost over a kilobyte per token,
    so peak memory grew with the dataset.
    """
    if not todo:
        return 0
    lengths = []
    for start in range(0, len(todo), TOKENIZE_CHUNK):
        chunk = [prepared for _, prepared in todo[start:start + TOKENIZE_CHUNK]]
        lengths += [len(ids) for ids, _, _ in _tokenize(chunk, backend, config.max_length)]
    order = sorted(range(len(todo)), key=lambda i: lengths[i])
    pending_keys: list[str] = []
    pending: list[TextActivations] = []
    done = 0
    for start in range(0, len(order), config.batch_size):
        batch = [todo[i] for i in order[start:start + config.batch_size]]
        encoded = _tokenize([prepared for _, prepared in batch], backend, config.max_length)
        input_ids, mask = backend.pad_batch([ids for ids, _, _ in encoded])
        hidden, score = backend.forward(input_ids, mask, layer=layer, want_score=want_score)
        hidden = hidden.cpu()
        for b, ((key, prepared), (ids, offsets, special)) in enumerate(zip(batch, encoded)):
            keep = read_positions(prepared.text, offsets, special, prepared.response_start, config.positions)
            index = torch.tensor(keep, dtype=torch.long)
            pending_keys.append(key)
            pending.append(TextActivations(
                hidden[b, index].clone(), torch.tensor(ids, dtype=torch.long)[index],
                index.int(), float(score[b]) if score is not None else float("nan")))
        if len(pending) >= SHARD_TEXTS:
            cache.add_shard(pending_keys, pending)
            pending_keys, pending = [], []
            _release_freed_memory()
        done += len(batch)
        if progress is not None:
            progress(done, len(order))
    if pending:
        cache.add_shard(pending_keys, pending)
    return len(order)
