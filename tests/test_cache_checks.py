"""Cached heads, flip posteriors and feature labels are checked before use: an entry that was damaged is
computed again, never used. Heads and posteriors carry a digest of their tensors and are checked by range;
labels are checked by type and size."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from safer_audit.errors import PluginError
from safer_audit.features.labels import FeatureLabel, LabelRequest, label_features
from safer_audit.pipeline.scan import run_scan
from safer_audit.report.types import export_report
from safer_audit.scoring.heads import (
    CROSS_FIT_FIELDS,
    HeadCache,
    HeadFit,
    PairDiffs,
    cross_fitted_head,
    cross_fitted_margins,
)
from safer_audit.scoring.posterior import FlipMixture, flip_posterior, plausible_posterior

from .conftest import tiny_scan_config
from .test_determinism import without_run_clock
from .test_labelling import counting_plugin  # noqa: F401 (a fixture)


def flip_in_tensor(path, name: str) -> None:
    """Flip a high bit of the first element of the tensor ``name`` of a safetensors file: the file still parses,
    and the value changes by orders of magnitude (a float's exponent, an integer's high byte)."""
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8:8 + size])[name]
    width = {"F32": 4, "F64": 8, "I64": 8}[entry["dtype"]]
    data[8 + size + entry["data_offsets"][0] + width - 1] ^= 0x40
    path.write_bytes(bytes(data))


def tensor_names(path) -> list[str]:
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return sorted(name for name in json.loads(path.read_bytes()[8:8 + size]) if name != "__metadata__")


DIFFS = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
OPTIONS = dict(folds=5, seed=0, l2=1.0, l1=0.0)


@pytest.mark.parametrize("name", CROSS_FIT_FIELDS)
def test_a_cross_fit_with_a_flipped_byte_is_fitted_again(tmp_path, name):
    cache = HeadCache(tmp_path / "heads")
    plain = cross_fitted_margins(DIFFS, **OPTIONS)
    cross_fitted_margins(DIFFS, cache=cache, **OPTIONS)
    [path] = cache.directory.glob("head-*.safetensors")
    flip_in_tensor(path, name)
    assert cache.get(HeadCache.key(DIFFS, **OPTIONS), len(DIFFS)) is None
    again = cross_fitted_margins(DIFFS, cache=cache, **OPTIONS)
    for field in CROSS_FIT_FIELDS:
        assert torch.equal(getattr(again, field), getattr(plain, field)), field
    assert cache.get(HeadCache.key(DIFFS, **OPTIONS), len(DIFFS)) is not None  # written again, whole


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_cross_fit_holding_what_no_fit_gives_is_fitted_again(tmp_path, value):
    cache = HeadCache(tmp_path / "heads")
    key = HeadCache.key(DIFFS, **OPTIONS)
    fit = cross_fitted_margins(DIFFS, **OPTIONS)
    fit.margins[3] = value  # written whole, with its digest: only the range check can refuse it
    cache.put(key, fit)
    assert cache.get(key, len(DIFFS)) is None


@pytest.mark.parametrize("name", ["weights", "scale"])
def test_bounded_fold_heads_with_a_flipped_byte_are_fitted_again(tmp_path, name):
    rows = PairDiffs(torch.randn(80, 6, generator=torch.Generator().manual_seed(1)))
    fit = HeadFit(max_pairs=30)
    plain = cross_fitted_head("sae_margin", rows, fit)
    cache = HeadCache(tmp_path / "heads")
    cross_fitted_head("sae_margin", rows, fit, cache=cache)
    [path] = cache.directory.glob("head-*.safetensors")
    flip_in_tensor(path, name)
    again = cross_fitted_head("sae_margin", rows, fit, cache=cache)
    assert torch.equal(again.margins, plain.margins) and torch.equal(again.weights, plain.weights)


@pytest.mark.parametrize("name", ["posterior", "mixture"])
def test_a_damaged_flip_posterior_is_fitted_again(tmp_path, name):
    margins = torch.randn(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 1.0
    plain, mixture = flip_posterior(margins)
    cache = HeadCache(tmp_path / "heads")
    cache.flip_posterior(margins)
    [path] = cache.directory.glob("posterior-*.safetensors")
    flip_in_tensor(path, name)
    posterior, again = cache.flip_posterior(margins)
    assert torch.equal(posterior, plain) and again == mixture
    assert bool(((posterior >= 0) & (posterior <= 1)).all())


@pytest.mark.parametrize("posterior, mixture", [
    ([0.1, 2.03], FlipMixture(0.1, 1.0, -5.0)),  # the flip probability a damaged entry gave
    ([0.1, math.nan], FlipMixture(0.1, 1.0, -5.0)),
    ([-0.1, 0.2], FlipMixture(0.1, 1.0, -5.0)),
    ([0.1, 0.2], FlipMixture(0.7, 1.0, -5.0)),  # a flip rate above one half
    ([0.1, 0.2], FlipMixture(0.1, 100.0, -5.0)),  # a separation outside the searched range
    ([0.1, 0.2], FlipMixture(0.1, 1.0, 3.0)),  # the log-likelihood of signs is <= 0
    ([0.1, 0.2], FlipMixture(math.nan, 1.0, -5.0)),
])
def test_a_posterior_no_fit_gives_is_not_plausible(posterior, mixture):
    assert not plausible_posterior(torch.tensor(posterior, dtype=torch.float64), mixture)
    fitted = flip_posterior(torch.randn(100, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert plausible_posterior(*fitted)


# -- feature labels ---------------------------------------------------------------------------------------


class Labeller:
    name, version = "plain", "1"

    def __init__(self, text=lambda latent: f"label {latent}"):
        self.text = text
        self.asked: list[int] = []

    def label(self, requests):
        self.asked += [r.latent for r in requests]
        return {r.latent: FeatureLabel(r.latent, self.text(r.latent), 0.5, "weapons", self.name, "m", self.version)
                for r in requests}


def requests(latents):
    return [LabelRequest(latent, 1.0, ()) for latent in latents]


def good(latent, **changes):
    return {"latent": latent, "label": f"label {latent}", "relevance": 0.5, "category": "weapons",
            "labeller": "plain", "model": "m", "version": "1", "extra": {}, **changes}


DAMAGED = {
    "2": good(2, label=["a", "list"]),  # made features and -o x.parquet exit 70
    "3": good(3, label="x" * 2_000_000),  # made a 312 MB report
    "4": good(4, relevance=math.nan),
    "5": good(5, relevance=True),
    "6": good(7),  # filed under another latent
    "7": good(7, extra={"blob": "x" * 100_000}),
    "8": good(8, model={"not": "text"}),
    "9": ["not", "an", "entry"],
    "10": good(10, category=7),
    "11": good(11, unknown_field=1),
    "12": good(12, relevance="0.5"),
}


def test_damaged_cached_labels_are_made_again_and_good_ones_kept(tmp_path):
    cache = tmp_path / "labels.json"
    cache.write_text(json.dumps({"labeller": "plain", "version": "1", "labels": {"1": good(1), **DAMAGED}}))
    labeller = Labeller()
    latents = list(range(1, 13))
    labels = label_features(latents, requests, labeller, cache)
    assert sorted(labeller.asked) == list(range(2, 13))  # every damaged entry, and only those
    assert all(labels[latent] == FeatureLabel(**good(latent)) for latent in latents)
    again = Labeller()
    assert label_features(latents, requests, again, cache) == labels and again.asked == []  # rewritten, whole


@pytest.mark.parametrize("text, problem", [(lambda latent: ["a"], "its label is list"),
                                           (lambda latent: "x" * 10_000, "its label is 10,000 characters")])
def test_a_labeller_returning_an_unusable_label_is_a_plugin_error(tmp_path, text, problem):
    with pytest.raises(PluginError, match=problem):
        label_features([1], requests, Labeller(text), tmp_path / "labels.json")
    assert not (tmp_path / "labels.json").exists()


# -- a whole scan -----------------------------------------------------------------------------------------


def test_a_rescan_over_damaged_heads_posteriors_and_labels_gives_the_cold_report(
        tiny_llama_dir, data_file, tmp_path, counting_plugin):  # noqa: F811 (the fixture)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="counting", aggregation="stacked")
    cold = run_scan(str(data_file), config)
    heads = sorted((tmp_path / "cache").rglob("heads/*.safetensors"))
    assert {path.name.split("-")[0] for path in heads} == {"head", "posterior"}
    for path in heads:
        for name in tensor_names(path):
            flip_in_tensor(path, name)
    [labels_file] = (tmp_path / "cache").rglob("labels/counting-*.json")
    data = json.loads(labels_file.read_text())
    for i, entry in enumerate(data["labels"].values()):
        entry["label"] = "x" * 2_000_000 if i == 0 else ["a", "list"]
    labels_file.write_text(json.dumps(data))

    warm = run_scan(str(data_file), config)
    export_report(cold.report, tmp_path / "cold.json")
    export_report(warm.report, tmp_path / "warm.json")
    assert without_run_clock((tmp_path / "warm.json").read_bytes()) == \
        without_run_clock((tmp_path / "cold.json").read_bytes())
    export_report(warm.report, tmp_path / "warm.parquet")  # a list as a label made this exit 70
    assert all(0 <= f.flip_probability <= 1 for f in warm.report.findings if f.flip_probability is not None)


def test_an_sae_trained_by_another_trainer_format_is_not_served(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """The SAE cache key holds the trainer's format: after a change to training, the older SAE is not read."""
    from safer_audit.sae import cache as sae_cache

    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none")
    first = run_scan(str(data_file), config).report.run.sae_path
    assert run_scan(str(data_file), config).report.run.sae_path == first  # the same format: read back
    monkeypatch.setattr(sae_cache, "SAE_TRAIN_FORMAT", sae_cache.SAE_TRAIN_FORMAT + 1)
    assert run_scan(str(data_file), config).report.run.sae_path != first
