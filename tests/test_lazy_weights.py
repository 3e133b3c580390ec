"""A warm scan needs the tokenizer and the model's fingerprint, not its weights: they load on first use."""

from __future__ import annotations

from safer_audit.backends.hf import HFModelBackend
from safer_audit.scan import run_scan

from .test_codes import assert_same_report, config, write_pairs


def test_a_warm_scan_never_loads_the_weights(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert cold.backend._model is not None  # the cold scan ran the model
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert warm.backend._model is None
    assert_same_report(cold.report, warm.report)


def test_the_weights_load_on_first_use(tiny_llama_dir):
    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    assert backend._model is None and backend.n_layers == 2
    assert backend.model is backend.model  # loaded once
    assert len(backend._layers) == backend.n_layers
