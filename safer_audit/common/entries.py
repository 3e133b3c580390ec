"""Cache entries on disk: safetensors files of named tensors with a small JSON metadata header.

Every cache of tensors (activation shards, per-text SAE codes, fitted heads and posteriors) writes
and reads its entries here: one atomic writer, one reader that turns any damage into "no entry"
(the caller computes it again), one digest of keys and tensors that names or checks an entry, and
the listing of a directory's shards by the text keys their headers hold.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .files import write_atomic
from .keyindex import KeyIndex

# what reading a damaged entry raises: a bad header, tensors cut short (safetensors' own error, not a
# ValueError), a truncated size prefix
DAMAGED = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, struct.error)
MAX_HEADER = 100_000_000  # bytes: a header larger than this is damage, not an entry


def tensors_digest(head: object, tensors: dict[str, torch.Tensor]) -> str:
    """blake2b-128 of ``head`` (as JSON) and the tensors in name order: each name, dtype, shape and bytes.

    Not the file's bytes: safetensors writes the metadata in a key order that changes from process
    to process, and an entry's name or check must not depend on that.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(head).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # the buffer itself, no copy
    return digest.hexdigest()


def write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one entry atomically (files.write_atomic: never a half-written file under its name)."""
    data = save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=metadata)
    write_atomic(path, data)


def split_entry(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An entry's tensors and metadata from its bytes; raises one of DAMAGED when it is not whole."""
    metadata = header_metadata(data[:8], lambda size: data[8:8 + size])
    if metadata is None:
        raise ValueError("not a safetensors header")
    return load_safetensors(data), metadata


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """An entry's tensors and metadata, or None when it is missing or damaged."""
    try:
        return split_entry(path.read_bytes())
    except DAMAGED:
        return None


def header_metadata(prefix: bytes, read) -> dict[str, str] | None:
    """The metadata of a safetensors header: ``prefix`` its 8-byte size, ``read(size)`` the header's bytes."""
    try:
        size = struct.unpack("<Q", prefix)[0]
        if not 0 < size <= MAX_HEADER:
            return None
        metadata = json.loads(read(size)).get("__metadata__", {})
    except (ValueError, TypeError, AttributeError, struct.error):
        return None
    return metadata if isinstance(metadata, dict) else None


def shard_keys(path: Path, format: str) -> list[str] | None:
    """The text keys a shard's header lists, without reading its tensors; None when the file is damaged or
    of another format."""
    try:
        with open(path, "rb") as handle:
            metadata = header_metadata(handle.read(8), handle.read)
    except OSError:
        return None
    return keys_of(metadata, format)


def keys_of(metadata: dict[str, str] | None, format: str) -> list[str] | None:
    """The text keys in a shard's metadata, when it is of ``format``."""
    if metadata is None or metadata.get("format") != format:
        return None
    try:
        keys = json.loads(metadata["keys"])
    except (KeyError, ValueError, TypeError):
        return None
    return keys if isinstance(keys, list) and all(isinstance(k, str) for k in keys) else None


def index_shards(shards: Iterable[Path], index: KeyIndex, format: str) -> list[Path]:
    """Index each shard's texts in ``index``; a shard whose header is unreadable is deleted (its texts are
    computed again). The shards indexed."""
    indexed = []
    for shard in shards:
        keys = shard_keys(shard, format)
        if keys is None:
            shard.unlink(missing_ok=True)
            continue
        index.add(shard, keys)
        indexed.append(shard)
    return indexed
