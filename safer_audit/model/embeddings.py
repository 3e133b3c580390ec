"""Sentence embeddings kept across runs: one row per distinct text, for one encoder.

The harm judge (scoring.harm) embeds every sentence of every reply and the last human turns of every
conversation with a sentence encoder; on the HH file that is as much work as the scan's own forward pass.
The embeddings depend on nothing but the text and the encoder, so they are kept: a second scan of the same
data reads them back instead of running the encoder, and a change of the judge's examples or weights
re-embeds only the examples.

Layout: ``<directory>/<encoder key>/shard-<digest>.safetensors``, the encoder key a digest of the encoder's
fingerprint (its model files, tokenizer, max length and pooling). A shard holds one tensor, ``embeddings``
(texts x width, float32), and in its header the key of each row's text (a blake2b of the text), the
fingerprint and the digest of the keys and the tensor (entries.tensors_digest). A shard is used only when
the digest matches and every row is finite with unit norm (the encoder's rows are L2-normed); else it is
deleted and its texts are encoded again.

Texts are encoded in the batches of the call that finds them missing, and a batch's other texts move an
embedding in float32's last bits (about 3e-7); so a warm run gives exactly the cold run's values, and a run
whose cache holds some of its texts from other data gives the values of a cold run to that rounding.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..common.digests import short_digest
from ..common.entries import DAMAGED, index_shards, split_entry, tensors_digest, write_entry
from ..common.files import remove_stale_temporaries
from ..common.keyindex import KeyIndex

FORMAT = "sentence-embeddings-1"
UNIT_NORM_TOLERANCE = 1e-3  # an encoder's L2-normed float32 rows are within 1e-6 of norm 1
KEEP_BYTES = 64 << 20  # checked shards held in memory: a later slice's repeated texts are not read again

Encode = Callable[[list[str]], torch.Tensor]  # texts -> L2-normed embeddings, one row per text


def text_key(text: str) -> str:
    """A text's key in the cache: blake2b-128 of its UTF-8 bytes (a lone surrogate kept as it is)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def embed_distinct(texts: Sequence[str], encode: Encode) -> torch.Tensor:
    """``encode(texts)``, each distinct text encoded once (in order of first appearance)."""
    distinct = list(dict.fromkeys(texts))
    rows = encode(distinct)
    if len(distinct) == len(texts):
        return rows
    position = {text: i for i, text in enumerate(distinct)}
    return rows[torch.tensor([position[text] for text in texts], dtype=torch.long)]


class BadEntry(ValueError):
    """A shard that is not what its maker wrote (then deleted and its texts encoded again)."""


def _require(condition: bool) -> None:
    if not condition:
        raise BadEntry("embedding shard fails its check")


class EmbeddingCache:
    """The embeddings of one encoder under ``directory``: ``embed(texts, encode)`` reads what is kept and
    encodes (and keeps) the rest."""

    def __init__(self, directory: Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.directory = Path(directory) / short_digest(hashlib.sha256(fingerprint.encode()).hexdigest())
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)  # debris of killed writes
        self.index = KeyIndex()
        index_shards(sorted(self.directory.glob("shard-*.safetensors")), self.index, FORMAT)
        self._held: OrderedDict[Path, torch.Tensor] = OrderedDict()  # shards checked this run, latest used last

    def embed(self, texts: Sequence[str], encode: Encode) -> torch.Tensor:
        """One embedding per text, in order: read back when kept, else encoded (each distinct text once)
        and kept."""
        if not texts:
            return encode([])
        distinct = list(dict.fromkeys(texts))
        keys = [text_key(text) for text in distinct]
        rows: dict[int, torch.Tensor] = {}  # position in ``distinct`` -> its row
        paths, shards, places = self.index.locate(keys)
        for shard in np.unique(shards[shards >= 0]).tolist():
            embeddings = self._shard(paths[shard])
            if embeddings is not None:
                held = np.flatnonzero(shards == shard)
                rows.update(zip(held.tolist(), embeddings[torch.from_numpy(places[held])], strict=True))
        missing = [i for i in range(len(distinct)) if i not in rows]
        if missing:
            encoded = encode([distinct[i] for i in missing]).float().contiguous()
            self._write([keys[i] for i in missing], encoded)
            rows.update(zip(missing, encoded, strict=True))
        if len({len(row) for row in rows.values()}) > 1:  # kept rows of another width than the encoder's
            return embed_distinct(texts, encode)  # cannot be this encoder's: none of them is used
        out = torch.stack([rows[i] for i in range(len(distinct))])
        if len(distinct) == len(texts):
            return out
        position = {text: i for i, text in enumerate(distinct)}
        return out[torch.tensor([position[text] for text in texts], dtype=torch.long)]

    def _digest(self, keys: list[str], embeddings: torch.Tensor) -> str:
        return tensors_digest([FORMAT, self.fingerprint, keys], {"embeddings": embeddings})

    def _write(self, keys: list[str], embeddings: torch.Tensor) -> None:
        digest = self._digest(keys, embeddings)
        path = self.directory / f"shard-{short_digest(digest)}.safetensors"
        write_entry(path, {"embeddings": embeddings},
                    {"format": FORMAT, "fingerprint": self.fingerprint, "keys": json.dumps(keys), "digest": digest})
        self.index.add(path, keys)
        self._hold(path, embeddings)

    def _shard(self, path: Path) -> torch.Tensor | None:
        """A shard's embeddings: from memory when checked earlier in this run, else read and checked."""
        if path in self._held:
            self._held.move_to_end(path)
            return self._held[path]
        embeddings = self._load(path)
        if embeddings is not None:
            self._hold(path, embeddings)
        return embeddings

    def _hold(self, path: Path, embeddings: torch.Tensor) -> None:
        self._held[path] = embeddings
        while len(self._held) > 1 and sum(t.numel() * t.element_size() for t in self._held.values()) > KEEP_BYTES:
            self._held.popitem(last=False)

    def _load(self, path: Path) -> torch.Tensor | None:
        """A shard's embeddings, or None (and the shard deleted, its texts to encode again) when it fails
        its check."""
        try:
            tensors, metadata = split_entry(path.read_bytes())
            _require(metadata.get("format") == FORMAT and metadata.get("fingerprint") == self.fingerprint)
            keys = json.loads(metadata["keys"])
            _require(isinstance(keys, list) and all(isinstance(key, str) for key in keys))
            _require(set(tensors) == {"embeddings"})
            embeddings = tensors["embeddings"]
            _require(embeddings.dtype == torch.float32 and embeddings.dim() == 2)
            _require(embeddings.shape[0] == len(keys) and embeddings.shape[1] > 0)
            _require(metadata.get("digest") == self._digest(keys, embeddings))
            _require(bool(torch.isfinite(embeddings).all()))
            _require(bool(((embeddings.norm(dim=1) - 1).abs() <= UNIT_NORM_TOLERANCE).all()))
        except (*DAMAGED, BadEntry):
            path.unlink(missing_ok=True)
            self.index.drop(path)
            return None
        return embeddings
