"""A warm scan needs the tokenizer and the model's fingerprint, not its weights: they load on first use."""

from __future__ import annotations

from safer_audit.backends.hf import HFModelBackend
from safer_audit.pipeline.scan import run_scan

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


def test_the_labeller_embeds_with_the_scan_models_weights():
    """The offline labeller's sentence encoder and a scan of the embedded default model share one set of weights
    (a cold scan used to read and build all-MiniLM-L6-v2 twice)."""
    from safer_audit.backends.hf import embedded_model_path
    from safer_audit.backends.labellers import SentenceEncoder

    backend = HFModelBackend(str(embedded_model_path()), device="cpu")
    assert SentenceEncoder().model is backend.model


def test_a_model_rewritten_in_place_is_read_again(tiny_bert_dir, tmp_path):
    import shutil

    import torch

    directory = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    first = HFModelBackend(str(directory), device="cpu").model
    assert HFModelBackend(str(directory), device="cpu").model is first  # the same files: loaded once
    changed = type(first).from_pretrained(directory)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(directory)
    again = HFModelBackend(str(directory), device="cpu").model
    assert again is not first
    assert not torch.equal(next(again.parameters()), next(first.parameters()))
