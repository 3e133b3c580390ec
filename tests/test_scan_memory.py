"""What a scan's encoding pass holds at its peak does not pile up copies.

A scan's summary (the sparse code means of every text, kept below SUMMARY_NUMBERS) lets go of
its parts as they are joined, and is written without copying its tensor bytes, to the same bytes
as before.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import save as save_safetensors

from safer_audit.sae.codes import SUMMARY_FORMAT, CodeCache, _Accumulator, _keys_digest


def reference_bytes(keys: list[str], summary: dict[str, torch.Tensor]) -> bytes:
    """The summary file as an older save_summary wrote it (header, then the whole tensor bytes)."""
    data = save_safetensors({k: v.contiguous() for k, v in summary.items()})
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = {"format": str(SUMMARY_FORMAT), "keys": _keys_digest(keys),
                              "digest": hashlib.blake2b(data[8 + size:], digest_size=16).hexdigest()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def test_a_summary_lets_go_of_its_parts_and_is_written_as_before(tmp_path):
    acc = _Accumulator(3, 4, None, keep_sparse=True)
    # two blocks as added: (text, latent, mean) per entry, texts out of order
    acc.sparse = [(torch.tensor([2, 2]), torch.tensor([1, 3], dtype=torch.int32), torch.tensor([0.5, 0.25])),
                  (torch.tensor([0]), torch.tensor([2], dtype=torch.int32), torch.tensor([1.0]))]
    stats = acc.finish()
    summary = acc.summary(stats)
    assert acc.sparse is None  # the parts are not held beside their join
    assert summary["code_offsets"].tolist() == [0, 1, 1, 3]
    assert summary["code_latent"].tolist() == [2, 1, 3] and summary["code_mean"].tolist() == [1.0, 0.5, 0.25]
    cache = CodeCache(tmp_path / "codes")
    keys = ["a", "b", "c"]
    cache.save_summary(keys, summary)
    assert cache.summary_path(keys).read_bytes() == reference_bytes(keys, summary)
    loaded = cache.load_summary(keys)
    assert loaded is not None and all(torch.equal(loaded[k], summary[k]) for k in summary)
    assert not [p for p in (tmp_path / "codes").iterdir() if p.name.startswith(".")]  # no temporary left
