"""Reward-model activations: positions, the content-addressed on-disk cache, extraction.

Every chosen and rejected conversation becomes one *text*; a pair ``i`` has its chosen
text at index ``2*i`` and its rejected text at ``2*i + 1``. For each text we keep the
hidden states of one layer at the read positions (docs/method.md section 1), the token ids
there, and the reward score when the model has a head.

The cache is content-addressed: a text's key hashes the model fingerprint, layer,
positions, max_length and the exact input text, so unchanged texts never run a forward
pass again. Texts are stored in shards (``shard-<blake2b of the keys and tensors>.safetensors``)
written atomically; a shard whose contents no longer match its name is corrupt and is
deleted and recomputed. An interrupted run keeps every shard written before the
interruption, so it resumes there.

Results must not depend on the cache's history (cold, warm, resumed, copied) or on file
names. So shard names hash what a shard holds, not how safetensors serialised it (its
header's key order varies from process to process); extraction batches and shards are
planned over all of a dataset's texts, so a resumed run recomputes exactly the batches a
cold run would; and the store is read in an order derived from the data.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..common.entries import DAMAGED, index_shards, keys_of, shard_keys, split_entry, tensors_digest, write_entry
from ..common.files import remove_stale_temporaries, write_atomic
from ..common.keyindex import KeyIndex
from ..common.memory import release_freed_memory
from ..config import LOCAL_ENGINE, ActivationConfig
from ..errors import CacheError, ConfigError, inert
from ..plugins import lookup
from .texts import PreparedText, SpooledTexts

CACHE_FORMAT = 2  # 2: shards named by content, not by file bytes


SHARD_TEXTS = 256  # texts per shard: a killed run loses at most this much work


TOKENIZE_CHUNK = 512  # texts tokenized at once when measuring lengths


# tokens whose encodings the plan keeps for extraction (~150 bytes each as Python lists: HH's 717k tokens fit;
# a larger dataset keeps its first texts' and tokenizes the others again)
KEEP_TOKENS = 1 << 20


PUNCTUATION = ".,?!;"


PUNCTUATION_MIN_GAP = 5


def read_positions(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int],
                   response_start: int, positions: str) -> list[int]:
    """Token indices to read for one tokenized text (docs/method.md section 1).

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


SHARD_TENSORS = ("acts", "offsets", "positions", "scores", "token_ids")


def content_digest(keys: Sequence[str], tensors: dict[str, torch.Tensor]) -> str:
    """A shard's name: the digest of its keys and tensors (entries.tensors_digest)."""
    return tensors_digest([CACHE_FORMAT, list(keys)], {name: tensors[name] for name in SHARD_TENSORS})


def _seeded_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a cheap, well-spread hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_key(identity: str, fingerprint: str, layer: int, positions: str, max_length: int,
               cache_dtype: str = "float32", compute_dtype: str = "float32") -> str:
    """The cache sub-directory for one model + reading configuration.

    The storage dtype and the dtype the forward pass computed in are part of the key (a float16
    cache, or activations computed in bfloat16, are a different set of numbers), but only when
    they are not float32, so caches written before they existed keep their key.
    """
    parts = [CACHE_FORMAT, identity, fingerprint, layer, positions, max_length]
    if cache_dtype != "float32":
        parts.append(cache_dtype)
    if compute_dtype != "float32":
        parts.append({"compute": compute_dtype})
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


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

    def __init__(self, root: Path, key: str, meta: dict | None = None, dtype: str = "float32", *,
                 index: bool = True):
        """``index=False``: no index of the shards already there (a Ray worker that only writes shards, or reads
        the ones it is told, keeps no per-text entry of the whole cache)."""
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, not {dtype!r}")
        self.dtype = CACHE_DTYPES[dtype]  # how activations are stored; they are read back as float32
        self.directory = Path(root) / "activations" / key
        self.directory.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            meta_path = self.directory / "config.json"
            if not meta_path.exists():
                write_atomic(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        self.index = KeyIndex()  # text key -> (shard, row), ~40 bytes a text
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._verified: set[Path] = set()
        # debris of killed writes (files.write_atomic); another live scan's temporaries stay
        remove_stale_temporaries(self.directory)
        if (self.directory / "saes").is_dir():
            remove_stale_temporaries(self.directory / "saes")
        if index:
            index_shards(sorted(self.directory.glob("shard-*.safetensors")), self.index, str(CACHE_FORMAT))

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def add_shard(self, keys: list[str], items: list[TextActivations]) -> None:
        """Write one shard atomically and index it."""
        offsets = [0]
        for item in items:
            offsets.append(offsets[-1] + item.acts.shape[0])
        tensors = {
            "acts": torch.cat([i.acts for i in items]).to(self.dtype).contiguous(),
            "token_ids": torch.cat([i.token_ids for i in items]).long().contiguous(),
            "positions": torch.cat([i.positions for i in items]).int().contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.long),
            "scores": torch.tensor([i.score for i in items], dtype=torch.float32),
        }
        path = self.directory / f"shard-{content_digest(keys, tensors)}.safetensors"
        write_entry(path, tensors, {"keys": json.dumps(keys), "format": str(CACHE_FORMAT)})
        self._verified.add(path)  # its name is the hash of the tensors just written
        self.index.add(path, keys)

    def load_shard(self, path: Path) -> dict[str, torch.Tensor] | None:
        """A shard's tensors, checked against the hash in its name; None (and deleted) if corrupt.

        The hash is checked once per shard and cache object: a scan streams the store
        several times (verify, SAE pass, pooling), and re-hashing 300 MB each time bought
        nothing a first check had not.
        """
        if path in self._loaded:
            return self._loaded[path]
        try:
            tensors, metadata = split_entry(path.read_bytes())
            if path not in self._verified:
                keys = keys_of(metadata, str(CACHE_FORMAT))
                if keys is None or path.name != f"shard-{content_digest(keys, tensors)}.safetensors":
                    tensors = None
        except DAMAGED:
            tensors = None
        if tensors is None:
            path.unlink(missing_ok=True)
            self.index.drop(path)
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
        return TextActivations(tensors["acts"][lo:hi].float(), tensors["token_ids"][lo:hi],
                               tensors["positions"][lo:hi], tensors["scores"][row].item())

    def verify(self, keys: Sequence[str]) -> list[str]:
        """Keys whose shard is missing or corrupt (their entries are dropped, to recompute)."""
        for shard in sorted(self.index.shards_of(keys) - self._verified):
            self.load_shard(shard)
        self._loaded = {}
        return self.index.missing(keys)


def _shard_keys(path: Path) -> list[str] | None:
    """The text keys listed in a shard's header, without reading its tensors."""
    return shard_keys(path, str(CACHE_FORMAT))


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


# sub-directory -> its row field (safer_audit/cache.py lists every kind the cache holds)
CACHE_PARTS = {"saes": "sae_bytes", "codes": "codes_bytes", "heads": "heads_bytes", "token-counts": "token_count_bytes"}


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def cache_info(root: Path) -> list[dict]:
    """One row per cached configuration: model, layer, positions, texts, and bytes on disk: ``bytes`` all of
    the entry, of which ``activation_bytes`` the activation shards, ``sae_bytes`` the trained SAEs (and their
    labels), ``codes_bytes`` the per-text SAE results, ``heads_bytes`` the fitted heads and ``token_count_bytes``
    the token counts of the truncation check."""
    rows = []
    base = Path(root) / "activations"
    for directory in sorted(base.glob("*")) if base.exists() else []:
        meta = _read_cache_meta(directory / "config.json")
        shards = list(directory.glob("shard-*.safetensors"))
        texts = sum(len(_shard_keys(s) or []) for s in shards)
        parts = {field: _tree_bytes(directory / name) for name, field in CACHE_PARTS.items()}
        rows.append({"key": directory.name, **meta, "shards": len(shards), "texts": texts,
                     "bytes": _tree_bytes(directory), "activation_bytes": sum(s.stat().st_size for s in shards),
                     **parts})
    return rows


@dataclass
class ActivationStore:
    """The activations of one dataset's texts, read back from the cache shard by shard."""

    cache: ActivationCache
    keys: list[str]  # one per text, dataset order
    d_model: int
    backend_identity: str
    n_forward_texts: int = 0  # texts that ran a forward pass in this extraction
    # the options it was extracted with (extract_activations)
    config: ActivationConfig | None = field(default=None, repr=False, compare=False)
    # the engine that extracted it (hookspecs.Executor; None: this process) also runs its SAE pass (sae.codes)
    executor: object = field(default=None, repr=False, compare=False)
    _locations: tuple = field(default=(), repr=False)  # KeyIndex.locate of the keys: (paths, shards, rows)
    # a lazily extracted store (extract_activations(lazy=True)): checks its shards' hashes, and computes
    # again the texts of a corrupt one, only when activations are first read (a warm scan reads none)
    _verify: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        paths, shards, rows = self.cache.index.locate(self.keys)
        if (shards < 0).any():
            raise KeyError(self.keys[int(np.argmax(shards < 0))])
        self._locations = (paths, shards, rows)

    def ensure_verified(self) -> None:
        """Check the hashes of the shards this store reads; texts of a missing or corrupt shard are
        computed again first. A no-op for a store extract_activations already checked."""
        if self._verify is None:
            return
        recompute, self._verify = self._verify, None
        if not self.cache.verify(self.keys):
            return
        computed = recompute()  # a missing or corrupt shard (now dropped): its texts are computed again
        self.cache = computed.cache
        self.n_forward_texts += computed.n_forward_texts
        self.__post_init__()

    @property
    def n_texts(self) -> int:
        return len(self.keys)

    def iter_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """Per shard: (text indices, per-text token offsets, tensors of those texts' positions).

        Tensors hold ``acts``, ``token_ids``, ``positions`` and ``scores`` for the texts
        in ``text indices``, in that order. One shard is in memory at a time. Shards come
        in the order of the first text each serves (not by name), texts in dataset order.
        """
        self.ensure_verified()
        for shard, texts, rows in self.chunk_plan():
            release_freed_memory()  # the previous shard's buffers
            tensors = self.cache.load_shard(shard)
            if tensors is None:
                raise CacheError(f"cache shard {shard.name} became unreadable during the run")
            offsets, chunk = chunk_tensors(tensors, rows)
            yield torch.tensor(texts, dtype=torch.long), offsets, chunk
        self.cache._loaded = {}

    def chunk_plan(self) -> list[tuple[Path, list[int], list[int]]]:
        """iter_chunks' chunks, unread: per shard (in the order of the first text each serves), the indices of
        the texts it serves and their rows in it. The Ray engine encodes these very chunks (engine.ray)."""
        paths, shard_of, row_of = self._locations
        order = np.argsort(shard_of, kind="stable")  # each shard's texts in dataset order
        numbers, starts = np.unique(shard_of[order], return_index=True)
        groups = np.split(order, starts[1:]) if len(order) else []
        plan = sorted(zip(numbers.tolist(), groups, strict=True), key=lambda group: int(group[1][0]))
        return [(paths[number], texts.tolist(), row_of[texts].tolist()) for number, texts in plan]

    def iter_acts(self) -> Iterator[torch.Tensor]:
        """Just the activation rows, shard by shard (the SAE trains on this stream)."""
        for _texts, _offsets, tensors in self.iter_chunks():
            yield tensors["acts"]

    def training_tokens(self, seed: int, max_tokens: int) -> torch.Tensor:
        """Up to ``max_tokens`` activation rows [n, d_model] in an order fixed by the data.

        Each token's rank is a hash of (seed, text key, position), so which tokens are
        kept and their order do not depend on how texts are grouped into shards (cold,
        warm, resumed) or on file names; the order is already a uniform shuffle. Memory
        stays within about twice the budget.
        """
        kept: dict[str, list] = {"rank": [], "text": [], "position": [], "acts": []}
        n_kept = 0

        def select(limit: int) -> None:
            nonlocal n_kept
            merged = {name: np.concatenate(kept[name]) for name in ("rank", "text", "position")}
            order = np.lexsort((merged["position"], merged["text"], merged["rank"]))[:limit]
            for name, values in merged.items():
                kept[name] = [values[order]]
            kept["acts"] = [_gathered(kept["acts"], order)]
            n_kept = len(order)

        for texts, offsets, tensors in self.iter_chunks():
            if int(offsets[-1]) == 0:
                continue
            text_hash = np.array([_seeded_hash(seed, self.keys[t]) for t in texts.tolist()], dtype=np.uint64)
            per_token = np.repeat(text_hash, (offsets[1:] - offsets[:-1]).numpy())
            position = tensors["positions"].numpy().astype(np.uint64)
            kept["rank"].append(_mix64(per_token ^ _mix64(position + np.uint64(1))))
            kept["text"].append(per_token)
            kept["position"].append(position)
            kept["acts"].append(tensors["acts"])
            n_kept += len(position)
            if n_kept > 2 * max_tokens:
                select(max_tokens)
        if n_kept == 0:
            return torch.zeros(0, self.d_model)
        select(max_tokens)
        return kept["acts"][0]

    def n_tokens(self) -> int:
        total = 0
        for _texts, offsets, _tensors in self.iter_chunks():
            total += int(offsets[-1])
        return total

    def text(self, index: int) -> TextActivations:
        self.ensure_verified()
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


def _gathered(chunks: list[torch.Tensor], order: np.ndarray) -> torch.Tensor:
    """The rows ``order`` indexes in the chunks laid end to end, in that order; each chunk let go once copied.

    Concatenating the chunks first and indexing that held three copies at once: SmolLM2's 853k HH tokens
    (1.97 GB) peaked at 6.2 GB. Here the chunks and the rows gathered so far are held, about one copy."""
    starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
    source = np.searchsorted(starts, order, side="right") - 1  # the chunk each wanted row is in
    by_chunk = np.argsort(source, kind="stable")
    bounds = np.searchsorted(source[by_chunk], np.arange(len(chunks) + 1))
    out = chunks[0].new_empty((len(order), chunks[0].shape[1]))
    for c in range(len(chunks)):
        dest = by_chunk[bounds[c]:bounds[c + 1]]
        if len(dest):
            out[torch.from_numpy(dest)] = chunks[c][torch.from_numpy(order[dest] - starts[c])]
        chunks[c] = None  # its rows are in ``out``: the list held the last reference
    return out


def chunk_tensors(tensors: dict[str, torch.Tensor], rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rows ``rows`` of a loaded shard as one chunk (ActivationStore.iter_chunks' layout): per-text token
    offsets, and ``acts`` (float32), ``token_ids``, ``positions``, ``scores`` of those texts, in that order."""
    rows = torch.tensor(rows, dtype=torch.long)
    starts, ends = tensors["offsets"][rows], tensors["offsets"][rows + 1]
    lengths = ends - starts
    gather = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=False)]) \
        if len(rows) else torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return offsets, {
        "acts": tensors["acts"][gather].float(),  # float16/bfloat16 caches widen on reading
        "token_ids": tensors["token_ids"][gather],
        "positions": tensors["positions"][gather],
        "scores": tensors["scores"][rows],
    }


class _KeyedTexts(Sequence):
    """``(key, PreparedText)`` of the texts ``indices`` of ``texts``, read from ``texts`` when asked for:
    extraction's unique texts without a second copy of them."""

    def __init__(self, keys: list[str], indices: list[int], texts: Sequence[PreparedText]):
        self.keys, self.indices, self.texts = keys, indices, texts

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index):
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            if rows.step == 1 and isinstance(self.texts, SpooledTexts) and self._consecutive(rows):
                return list(zip(self.keys[index], self.texts[self.indices[rows.start]:self.indices[rows.stop - 1] + 1],
                                strict=True))
            return [self[i] for i in rows]
        return self.keys[index], self.texts[self.indices[index]]

    def _consecutive(self, rows: range) -> bool:
        return len(rows) > 0 and self.indices[rows.stop - 1] - self.indices[rows.start] == len(rows) - 1


def load_backend(config: ActivationConfig):
    """The model backend named by the configuration, through the plugin registry."""
    factory = lookup("model", config.backend)
    # a backend that keeps converted weights (hf: a GGUF model's dequantised ones) keeps them in the cache
    options = {"cache_dir": config.cache_dir} if "cache_dir" in inspect.signature(factory).parameters else {}
    return factory(config.model, device=config.device, dtype=config.dtype,
                   trust_remote_code=config.trust_remote_code, **options)


def executor_for(config: ActivationConfig):
    """The executor of the engine ``config.engine`` names (None for the local engine, this process)."""
    if config.engine == LOCAL_ENGINE:
        return None
    return lookup("engine", config.engine, also=(LOCAL_ENGINE,))(config)


def resolve_layer(layer: int, n_layers: int) -> int:
    """1-based block index; negative counts from the end (-1 is the last block)."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 1 <= resolved <= n_layers:
        raise ConfigError(f"layer {layer} is out of range for a model with {n_layers} layers "
                         f"(use 1..{n_layers}, or -1..-{n_layers} from the end)")
    return resolved


def open_cache(backend, config: ActivationConfig, layer: int) -> ActivationCache:
    # a backend that does not say computes in float32
    compute_dtype = getattr(backend, "compute_dtype", "float32")
    key = config_key(backend.identity, backend.fingerprint, layer, config.positions, config.max_length,
                     config.cache_dtype, compute_dtype)
    meta = {"model": backend.identity, "fingerprint": backend.fingerprint, "layer": layer,
            "positions": config.positions, "max_length": config.max_length, "d_model": backend.d_model}
    if config.cache_dtype != "float32":
        meta["dtype"] = config.cache_dtype
    if compute_dtype != "float32":
        meta["compute_dtype"] = compute_dtype
    return ActivationCache(config.cache_dir, key, meta, dtype=config.cache_dtype)


def extract_activations(texts: Sequence[PreparedText], backend, config: ActivationConfig, *,
                        want_score: bool | None = None, progress=None, notice=None,
                        lazy: bool = False, executor=None) -> ActivationStore:
    """Activations for every text, computing only what the cache does not hold.

    ``want_score`` defaults to whether the model has a reward head; without it the
    forward pass stops at the read layer. ``progress(done, total)`` is called per batch.
    ``executor`` (a hookspecs.Executor, chosen once at the top of a run; by default the one
    ``config.engine`` names, see ``executor_for``) runs the forward passes elsewhere, e.g. on a
    Ray cluster; ``None`` or ``local`` runs them in this process. Every engine writes the same
    shards into the same cache, and the store is read back here the same way. ``notice(text)`` receives
    the estimate of disk and time printed before a large job.

    ``lazy``: texts the cache indexes are taken as they are, without reading their shards; the
    shards' hashes are checked (and corrupt ones computed again) when the store is first read
    (ActivationStore.ensure_verified). A warm scan whose SAE codes are all cached reads none.
    """
    layer = resolve_layer(config.layer, backend.n_layers)
    if want_score is None:
        want_score = backend.has_reward_head
    if executor is None:
        executor = executor_for(config)
    cache = open_cache(backend, config, layer)
    keys = [text_key(t.text) for t in texts]  # one pass (SpooledTexts reads a range at a time)
    missing = set(cache.index.missing(keys) if lazy else cache.verify(keys))
    computed = 0
    if missing:
        unique: dict[str, int] = {}  # each key's first text, by index: the texts are read when needed, not copied
        for index, key in enumerate(keys):
            unique.setdefault(key, index)
        items = _KeyedTexts(list(unique), list(unique.values()), texts)
        del unique
        # the plan tokenizes every text for its length; the local path runs those encodings
        encodings: dict[str, tuple] | None = {} if executor is None else None
        shards = plan_missing(items, missing, backend, config, keep=encodings)
        estimate = estimate_job(shards, items, backend, config)
        if estimate is not None:
            (notice or _print_notice)(estimate)
        if executor is not None:
            computed = executor.compute_shards(items, shards, config, layer, want_score, cache, progress)
            cache = open_cache(backend, config, layer)  # index the shards the workers wrote
        else:
            computed = _compute(items, shards, backend, config, layer, want_score, cache, progress, encodings)
    store = ActivationStore(cache, keys, backend.d_model, backend.identity, n_forward_texts=computed, config=config,
                            executor=executor)
    if lazy:
        store._verify = lambda: extract_activations(texts, backend, config, want_score=want_score, notice=notice,
                                                    executor=executor)
    return store


def _print_notice(text: str) -> None:
    print(inert(text), file=sys.stderr, flush=True)


LARGE_JOB_TEXTS = 20_000  # extraction jobs at least this big print their estimated disk and time first


ESTIMATED_TEXTS_PER_SECOND = 72  # measured locally: 36 pairs/s, MiniLM-L6 on two CPU cores (BENCHMARKS.md)


def estimate_job(shards: list[list[list[int]]], texts: list[tuple[str, PreparedText]], backend,
                 config: ActivationConfig) -> str | None:
    """A one-line estimate of the cache's growth and the time of extracting ``shards``, for large jobs.

    Disk: every token position (an upper bound: ``response`` positions read fewer) times the
    model width times the cache dtype's bytes. Time: the measured CPU rate of the default
    model, scaled by width; a GPU or a smaller model is faster.
    """
    n_texts = sum(len(batch) for shard in shards for batch in shard)
    if n_texts < LARGE_JOB_TEXTS:
        return None
    sample = [prepared for _, prepared in texts[:: max(1, len(texts) // 512)]][:512]
    mean_tokens = sum(len(ids) for ids, _, _ in tokenize_prepared(sample, backend, config.max_length)) / max(1, len(sample))
    width_bytes = backend.d_model * CACHE_DTYPES[config.cache_dtype].itemsize + 12  # + token id and position
    disk = n_texts * mean_tokens * width_bytes
    seconds = n_texts / ESTIMATED_TEXTS_PER_SECOND * max(1.0, backend.d_model / 384)
    return (f"extracting {n_texts:,} texts (~{mean_tokens:.0f} tokens each): at most {disk / 1e9:.1f} GB of "
            f"cache ({config.cache_dtype}) in {config.cache_dir}, about {seconds / 3600:.1f} h on 2 CPU cores "
            f"(less on GPUs or with --engine ray)")


def tokenize_prepared(items: list[PreparedText], backend, max_length: int):
    """Token ids, offsets and special-token masks of ``items``, in their order, as extraction reads them
    (left-truncated to ``max_length``)."""
    out: list = [None] * len(items)
    for special in (False, True):
        where = [i for i, item in enumerate(items) if item.has_special_tokens == special]
        if where:
            ids, offsets, specials = backend.tokenize([items[i].text for i in where], max_length=max_length,
                                                      has_special_tokens=special)
            for i, row in zip(where, zip(ids, offsets, specials, strict=False), strict=False):
                out[i] = row
    return out


def plan_batches(texts: list[tuple[str, PreparedText]], backend, config: ActivationConfig) -> list[list[list[int]]]:
    """Shards of batches of indices into ``texts``: length-sorted (ties by key), over all texts.

    Planned over every text of the dataset, not just the missing ones, so a run resumed
    after a kill pads the same batches and writes the same shards as a cold run.
    Lengths come a chunk of texts at a time; holding every text's full encoding at once
    cost over a kilobyte per token.
    """
    return _plan(texts, backend, config)[0]


def _plan(texts: list[tuple[str, PreparedText]], backend, config: ActivationConfig, keep: dict | None = None,
          wanted: set[str] | None = None):
    """plan_batches' shards, the token count of every text and its key.

    ``keep`` (a dict) receives the encodings (_tokenize's rows) of the texts whose key is in ``wanted``, by key,
    while they hold at most KEEP_TOKENS tokens in all, so that extraction does not tokenize them a second time.
    """
    lengths = []
    names = []  # each text's key, so that sorting and planning do not read the texts again
    kept = 0
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        encoded = tokenize_prepared([prepared for _, prepared in chunk], backend, config.max_length)
        lengths += [len(ids) for ids, _, _ in encoded]
        names += [key for key, _ in chunk]
        if keep is not None:
            for (key, _prepared), row in zip(chunk, encoded, strict=True):
                if kept + len(row[0]) <= KEEP_TOKENS and (wanted is None or key in wanted):
                    keep[key] = row
                    kept += len(row[0])
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], names[i]))
    return _batched(order, lengths, config), lengths, names


def _batched(order: list[int], lengths: list[int], config: ActivationConfig) -> list[list[list[int]]]:
    """``order`` cut into batches (by text count, or by ``config.batch_tokens``), grouped into shards."""
    if not config.batch_tokens:
        return _shards_of(order, config.batch_size)
    if config.batch_tokens < config.max_length:
        raise ConfigError(f"batch tokens ({config.batch_tokens}) must be at least the max length "
                          f"({config.max_length}), so that any one text fits in a batch")
    return _group_shards(token_batches(order, lengths, config.batch_tokens))


def token_batches(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive batches of ``order`` whose padded size (texts x the longest) stays within ``budget``.

    ``order`` is length-sorted, so a batch's longest text is its last and batches of short texts
    hold many; a text longer than the budget alone would get a batch of its own (planning asks for
    a budget of at least max_length, so none is).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i], 1)
        if current and width * (len(current) + 1) > budget:
            batches.append(current)
            current, width = [], max(lengths[i], 1)
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def _group_shards(batches: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive batches grouped into shards of at least SHARD_TEXTS texts (the last may hold fewer)."""
    shards: list[list[list[int]]] = []
    current: list[list[int]] = []
    count = 0
    for batch in batches:
        current.append(batch)
        count += len(batch)
        if count >= SHARD_TEXTS:
            shards.append(current)
            current, count = [], 0
    if current:
        shards.append(current)
    return shards


def _shards_of(order: list[int], batch_size: int) -> list[list[list[int]]]:
    """Consecutive batches of ``order``, grouped into shards of about SHARD_TEXTS texts that end on batch boundaries."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_shard = max(1, -(-SHARD_TEXTS // batch_size))
    return [batches[i:i + per_shard] for i in range(0, len(batches), per_shard)]


def plan_missing(texts: list[tuple[str, PreparedText]], missing: set[str], backend,
                 config: ActivationConfig, *, keep: dict | None = None) -> list[list[list[int]]]:
    """The shards (of batches of indices into ``texts``) that must run to fill in ``missing``.

    A planned shard whose texts are all missing (a cold run, or the part a killed run had
    not written) is computed exactly as planned, so a resumed run writes the same bytes
    as a cold one, whichever engine computes it. The missing texts of partly cached shards
    (texts shared with another dataset, a grown dataset) are batched among themselves, so
    only new texts run.
    """
    whole: list[list[list[int]]] = []
    loose: list[int] = []
    shards, lengths, names = _plan(texts, backend, config, keep, missing)
    for shard in shards:
        members = [i for batch in shard for i in batch]
        absent = [i for i in members if names[i] in missing]
        if len(absent) == len(members):
            whole.append(shard)
        else:
            loose += absent
    return whole + _batched(loose, lengths, config)  # loose is in the plan's order: by length, then key


def compute_shard(batches: list[list[tuple[str, PreparedText]]], backend, config: ActivationConfig, layer: int,
                  want_score: bool, on_batch=None, encodings: dict | None = None) -> tuple[list[str], list[TextActivations]]:
    """Run the model over one planned shard's batches; its keys and activations, in order.

    ``encodings``: tokenize_prepared's rows of some texts by key (the plan's, taken out as used); the others are tokenized
    here (the same rows: a text's encoding does not depend on the texts tokenized with it)."""
    keys: list[str] = []
    items: list[TextActivations] = []
    for batch in batches:
        encoded = [encodings.pop(key, None) for key, _ in batch] if encodings else [None] * len(batch)
        todo = [n for n, row in enumerate(encoded) if row is None]
        if todo:
            fresh = tokenize_prepared([batch[n][1] for n in todo], backend, config.max_length)
            for n, row in zip(todo, fresh, strict=True):
                encoded[n] = row
        input_ids, mask = backend.pad_batch([ids for ids, _, _ in encoded])
        hidden, score = backend.forward(input_ids, mask, layer=layer, want_score=want_score)
        keeps = [read_positions(prepared.text, offsets, special, prepared.response_start, config.positions)
                 for (_key, prepared), (_ids, offsets, special) in zip(batch, encoded, strict=False)]
        # the read positions of the whole batch in one gather (one indexing per text cost ~6 ms each on a
        # busy CPU); on a GPU the gather runs there and only those rows come back, as float32
        flat = torch.tensor([(b, p) for b, keep in enumerate(keeps) for p in keep], dtype=torch.long).reshape(-1, 2)
        if hidden.device.type != "cpu":
            flat = flat.to(hidden.device)
            score = score.float().cpu() if score is not None else None
        rows = hidden[flat[:, 0], flat[:, 1]].float().cpu().split([len(keep) for keep in keeps])
        for b, ((key, _prepared), (ids, _offsets, _special)) in enumerate(zip(batch, encoded, strict=False)):
            keys.append(key)
            items.append(TextActivations(
                rows[b], torch.tensor([ids[p] for p in keeps[b]], dtype=torch.long),
                torch.tensor(keeps[b], dtype=torch.int32), float(score[b]) if score is not None else float("nan")))
        if on_batch is not None:
            on_batch(len(batch))
    return keys, items


def _compute(texts: list[tuple[str, PreparedText]], shards: list[list[list[int]]], backend,
             config: ActivationConfig, layer: int, want_score: bool, cache: ActivationCache, progress,
             encodings: dict | None = None) -> int:
    """Run the model over the planned ``shards`` in this process and write them; returns the texts run."""
    total = sum(len(batch) for shard in shards for batch in shard)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for shard in shards:
        keys, items = compute_shard([[texts[i] for i in batch] for batch in shard], backend, config, layer,
                                    want_score, on_batch, encodings)
        if items:
            cache.add_shard(keys, items)
            release_freed_memory()
    return total
