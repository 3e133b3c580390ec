"""Shared fixtures: tiny random models built on the spot (no weights are committed)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path

import pytest

from .tiny_models import HH_SAMPLE, build_tiny_bert, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LlamaForSequenceClassification (width 64) with a byte-level BPE tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BertModel (width 32) with a WordPiece tokenizer: the encoder path."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session", autouse=True)
def tiny_harm_encoder(request):
    """The harm judge (run by every scan, for the default flipped rule) reads sentences with the tiny BERT,
    built when a judge first encodes: a scan of tiny models should not pay for a real sentence model. For the
    whole session, so module-scoped scans have it too; a test marked ``embedded_harm`` gets the embedded
    MiniLM, as users do (``embedded_harm_encoder``), and so does a scan in another process."""
    from safer_audit.backends import harm

    made = {}
    init = harm.HarmJudge.__init__

    def tiny_by_default(self, encoder=None):
        if encoder is None:
            if "encoder" not in made:
                from safer_audit.backends.labellers import SentenceEncoder

                made["encoder"] = SentenceEncoder(request.getfixturevalue("tiny_bert_dir"))
            encoder = made["encoder"]
        init(self, encoder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harm.HarmJudge, "__init__", tiny_by_default)
        yield init


@pytest.fixture(autouse=True)
def embedded_harm_encoder(request, tiny_harm_encoder, monkeypatch):
    if request.node.get_closest_marker("embedded_harm"):
        from safer_audit.backends import harm

        monkeypatch.setattr(harm.HarmJudge, "__init__", tiny_harm_encoder)  # the judge's own


def hh_records(n: int) -> list[dict]:
    """The first ``n`` real HH-RLHF pairs, from the committed sample."""
    with open(HH_SAMPLE, encoding="utf-8") as handle:
        records = [json.loads(line) for line in itertools.islice(handle, n)]
    if len(records) < n:
        pytest.skip(f"needs {n} HH pairs; the committed sample {HH_SAMPLE.name} holds {len(records)}")
    return records


@contextlib.contextmanager
def registered_plugin(plugin, name: str):
    """``plugin`` registered with the plugin manager for the duration (a test plugin)."""
    from safer_audit.plugins import load_plugins

    pm = load_plugins()
    pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def write_hh_pairs(path: Path, n: int) -> Path:
    """The first ``n`` real HH pairs (from the committed sample) as JSON Lines at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first 40 real HH pairs as JSON Lines, one file per test module (its scans share a cache key)."""
    return write_hh_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 40)


def tiny_scan_config(model_dir, cache_dir, **changes):
    """A scan small enough for a test on the tiny models: layer 1, 64 tokens, a 64-latent k=4 SAE and 16
    features; ``changes`` replace any other ScanConfig field."""
    from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig

    return ScanConfig(activations=ActivationConfig(model=str(model_dir), layer=1, max_length=64, cache_dir=cache_dir),
                      sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16, **changes)
