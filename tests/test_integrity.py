"""What is loaded is checked before use: SAE weights (digest, finite), SAE configs, features
files and baselines by type and range, each a one-line error naming the file and the field."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from safer_audit.sae import SaeFormatError, TopKSAE

from .test_sae import make_sae

# --- SAE weights ------------------------------------------------------------------------


def _flip_a_byte(path, offset_from_end=7):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_our_weights_are_refused(tmp_path):
    make_sae().save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    TopKSAE.load(tmp_path / "sae")  # intact: loads
    _flip_a_byte(tmp_path / "sae" / "sae_weights.safetensors")
    with pytest.raises(SaeFormatError, match=r"sae_weights\.safetensors: sha256 .* differs .* recorded in cfg\.json"):
        TopKSAE.load(tmp_path / "sae")
    assert len(cfg["safer_audit"]["weights_sha256"]) == 64


def test_a_changed_digest_is_refused(tmp_path):
    make_sae().save(tmp_path / "sae")
    path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(path.read_text())
    cfg["safer_audit"]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(cfg))
    with pytest.raises(SaeFormatError, match="differs"):
        TopKSAE.load(tmp_path / "sae")


def _saelens_dir(directory, **tensors_override):
    sae = make_sae()
    tensors = sae.state_for_saving() | tensors_override
    directory.mkdir()
    save_file(tensors, directory / "sae_weights.safetensors")
    (directory / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4,
                                                    "normalize_activations": "none"}))
    return directory


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    w_dec = make_sae().W_dec.detach().contiguous().clone()
    w_dec[3, 5] = bad
    directory = _saelens_dir(tmp_path / "sae", W_dec=w_dec)
    with pytest.raises(SaeFormatError, match=r'sae_weights\.safetensors: tensor "W_dec" has 1 NaN or infinite'):
        TopKSAE.load(directory)


def test_our_own_sae_with_nan_weights_is_refused_on_load(tmp_path):
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc[0] = math.nan
    sae.save(tmp_path / "sae")  # the digest matches: it is the content that is refused
    with pytest.raises(SaeFormatError, match='tensor "b_enc" has 1 NaN'):
        TopKSAE.load(tmp_path / "sae")


def test_integer_weights_are_refused(tmp_path):
    directory = _saelens_dir(tmp_path / "sae", b_dec=torch.zeros(16, dtype=torch.int32))
    with pytest.raises(SaeFormatError, match='tensor "b_dec" has dtype torch.int32'):
        TopKSAE.load(directory)


# --- SAE config -------------------------------------------------------------------------


def _nested(depth):
    value = {}
    for _ in range(depth):
        value = {"x": value}
    return value


def _edit(directory, edit):
    path = directory / "cfg.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["safer_audit"].update(format_version="1"),
         r'field "safer_audit\.format_version" must be an integer, not \'1\''),
        (lambda c: c["safer_audit"].update(format_version=None), r'"safer_audit\.format_version" must be an integer'),
        (lambda c: c["safer_audit"].update(format_version=0), r'"safer_audit\.format_version" must be positive'),
        (lambda c: c["safer_audit"].update(metadata=["a", "list"]),
         r'field "safer_audit\.metadata" must be an object, not list'),
        (lambda c: c["safer_audit"].update(metadata="text"), r'"safer_audit\.metadata" must be an object'),
        (lambda c: c.update(safer_audit=[1]), r'field "safer_audit" must be an object'),
        (lambda c: c["safer_audit"].update(layer_norm_eps="big"), r'"safer_audit\.layer_norm_eps" must be a finite'),
        (lambda c: c["safer_audit"].update(layer_norm_eps=-1.0), r'"safer_audit\.layer_norm_eps" must be positive'),
        (lambda c: c["safer_audit"].update(weights_sha256="abc"), r'"safer_audit\.weights_sha256" must be 64'),
        (lambda c: c["safer_audit"].update(metadata=_nested(40)), r'field "safer_audit\.metadata\.x\.x.*" is nested'),
        (lambda c: c.update(d_in=-16), r'field "d_in" must be positive, not -16'),
        (lambda c: c.update(d_sae=0), r'field "d_sae" must be positive, not 0'),
        (lambda c: c.update(apply_b_dec_to_input="no"), r'field "apply_b_dec_to_input" must be true or false'),
        (lambda c: c.update(normalize_activations=["layer_norm"]), r'field "normalize_activations" must be a string'),
        (lambda c: c.update(architecture=["topk"]), r'field "architecture" must be a string, not list'),
    ],
)
def test_every_sae_config_field_is_checked_by_type_and_range(tmp_path, edit, message):
    make_sae().save(tmp_path / "sae")
    _edit(tmp_path / "sae", edit)
    with pytest.raises(SaeFormatError, match=message) as info:
        TopKSAE.load(tmp_path / "sae")
    assert str(info.value).startswith(str(tmp_path / "sae" / "cfg.json"))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_config_nested_past_the_parser_is_one_line_error(tmp_path):
    make_sae().save(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SaeFormatError, match=r"cfg\.json: nested too deeply"):
        TopKSAE.load(tmp_path / "sae")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(num_latents="64"), r'field "num_latents" must be an integer'),
        (lambda c: c.update(num_latents=0, expansion_factor=-4), r'field "expansion_factor" must be positive'),
        (lambda c: c.update(d_in=0), r'field "d_in" must be positive'),
        (lambda c: c.update(transcode="no"), r'field "transcode" must be true or false'),
    ],
)
def test_sparsify_config_fields_are_checked(tmp_path, edit, message):
    from .test_sae import sparsify_directory

    sparsify_directory(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(SaeFormatError, match=message):
        TopKSAE.load(tmp_path)


def test_config_types_are_checked_in_the_library_too():
    from safer_audit.sae import SaeConfig

    for kwargs, message in (({"k": "4"}, "k must be an integer"), ({"metadata": []}, "metadata must be an object"),
                            ({"normalize": None}, "normalize must be a string")):
        with pytest.raises(ValueError, match=message):
            SaeConfig(**({"d_in": 16, "n_latents": 64, "k": 4} | kwargs))


def test_a_corrupt_cached_sae_is_trained_again_not_used(tiny_llama_dir, tmp_path):
    from safer_audit.pipeline.scan import run_scan

    from .conftest import ROOT
    from .test_scan import scan_config

    data = tmp_path / "pairs.jsonl"
    lines = (ROOT / "fixtures" / "hh-harmless-300.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[:12]), encoding="utf-8")
    config = scan_config(tiny_llama_dir, tmp_path / "cache")
    first = run_scan(str(data), config)
    (weights,) = (tmp_path / "cache").rglob("sae_weights.safetensors")
    intact = weights.read_bytes()
    _flip_a_byte(weights)
    second = run_scan(str(data), config)
    assert weights.read_bytes() == intact  # retrained (seeded) and cached again
    assert second.report.run.sae_hash == first.report.run.sae_hash


# --- baselines --------------------------------------------------------------------------


def _fixture_pairs(path, n=3):
    from .conftest import ROOT

    lines = (ROOT / "fixtures" / "hh-harmless-300.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


@pytest.fixture
def baseline_dir(tmp_path):
    """A valid baseline of three fixture pairs, made without a model (gate never runs one on unchanged data)."""
    import hashlib

    from safetensors.torch import save as save_safetensors

    from safer_audit import __version__
    from safer_audit.common.digests import short_digest
    from safer_audit.common.files import render_json
    from safer_audit.workflows.gate import BASELINE_FORMAT, content_digest, read_sources, row_digest

    data = _fixture_pairs(tmp_path / "data.jsonl")
    make_sae().save(tmp_path / "b-sae")
    heads = save_safetensors({"sae_margin.weight": torch.zeros(64)})
    (tmp_path / "b-heads.safetensors").write_bytes(heads)
    header = {
        "format": BASELINE_FORMAT, "tool_version": __version__,
        "model": {"identity": "tiny", "fingerprint": "f" * 16, "reward_head": False, "location": None},
        "activations": {"layer": 1, "positions": "response", "max_length": 64},
        "data": {"schema": None, "split": None, "preference": "better", "skip_invalid": False},
        "skipped": 0,
        "sae": {"path": "b-sae", "hash": TopKSAE.file_hash(tmp_path / "b-sae"), "latents": 64, "d_in": 16},
        "heads": {"path": "b-heads.safetensors", "hash": short_digest(hashlib.sha256(heads).hexdigest())},
        "features": [{"latent": 3, "sign": 1, "label": None}, {"latent": 7, "sign": -1, "label": "refusal"}],
        "ranking": {"score_safe": 1.0, "reward_margin": 1.0, "sae_margin": 0.0},
        "thresholds": {"flipped_fraction": 0.04, "noisy_fraction": 0.1, "flipped_cutoff": 0.9, "noisy_cutoff": 0.7},
    }
    pairs = {row["pair_id"]: {"category": "clean", "digest": row_digest(row), "score_safe": -0.5,
                              "reward_margin": 0.25, "sae_margin": None}
             for row in read_sources([str(data)]).iter_rows(named=True)}
    (tmp_path / "b.json").write_text(render_json({"content_digest": content_digest(header, pairs), "header": header,
                                                  "pairs": pairs}), encoding="utf-8")
    return tmp_path


def _gate(directory):
    from click.testing import CliRunner

    from safer_audit.cli import cli

    return CliRunner().invoke(cli, ["gate", str(directory / "data.jsonl"), "--baseline", str(directory / "b.json")])


def _edit_baseline(directory, edit):
    path = directory / "b.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    if isinstance(data.get("header"), dict) and isinstance(data.get("pairs"), dict):
        from safer_audit.workflows.gate import content_digest

        data["content_digest"] = content_digest(data["header"], data["pairs"])  # sealed again: the field is named
    path.write_text(json.dumps(data), encoding="utf-8")


def _first_pair(data):
    return next(iter(data["pairs"].values()))


_MALFORMED = [
    (lambda d: d["header"]["features"][0].update(latent=-5), r'"header\.features\[0\]\.latent" must be in 0\.\.63, not -5'),
    (lambda d: d["header"]["features"][1].update(latent=64), r'"header\.features\[1\]\.latent" must be in 0\.\.63'),
    (lambda d: d["header"]["features"].append({"latent": 3, "sign": 1, "label": None}), r"repeats latent 3"),
    (lambda d: d["header"]["features"][0].update(sign=True), r'"header\.features\[0\]\.sign" must be 1 or -1'),
    (lambda d: d["header"].update(features={"latent": 3}), r'"header\.features" must be a list'),
    (lambda d: d["header"].update(sae="b-sae"), r'"header\.sae" must be an object'),
    (lambda d: d["header"]["sae"].update(latents="64"), r'"header\.sae\.latents" must be an integer'),
    (lambda d: d["header"]["heads"].update(hash="not-a-digest"), r'"header\.heads\.hash" must be 32 lowercase hex'),
    (lambda d: d["header"]["ranking"].update(score_safe="1"), r'"header\.ranking\.score_safe" must be a finite number'),
    (lambda d: d["header"]["ranking"].update(score_safe=-1.0), r'"header\.ranking\.score_safe" must be in \[0\.0'),
    (lambda d: d["header"].update(ranking={"score_safe": 0, "reward_margin": 0}), r"at least one signal"),
    (lambda d: d["header"]["ranking"].update(loudness=1.0), r'"header\.ranking\.loudness" is not a signal'),
    (lambda d: d["header"]["thresholds"].update(flipped_fraction=2.0), r'"header\.thresholds\.flipped_fraction"'),
    (lambda d: d["header"]["thresholds"].update(noisy_cutoff=[0.5]), r'"header\.thresholds\.noisy_cutoff" must be'),
    (lambda d: d["header"]["activations"].update(max_length="64"), r'"header\.activations\.max_length" must be an int'),
    (lambda d: d["header"]["activations"].update(positions="everywhere"), r'"header\.activations\.positions" is'),
    (lambda d: d["header"]["model"].update(reward_head="yes"), r'"header\.model\.reward_head" must be true or false'),
    (lambda d: d["header"]["data"].update(preference="kinder"), r'"header\.data\.preference" is .kinder.'),
    (lambda d: d["header"].update(format=True), r"baseline format True is not supported"),
    (lambda d: d["header"].update(extra={}), r'"header\.extra" is not a baseline field'),
    (lambda d: _first_pair(d).update(category="bogus"), r'"pairs\.[^"]+\.category" is .bogus.; expected one of'),
    (lambda d: _first_pair(d).update(score_safe=float("nan")), r"NaN is not a JSON value"),
    (lambda d: _first_pair(d).update(reward_margin="0.3"), r'"pairs\.[^"]+\.reward_margin" must be a finite number'),
    (lambda d: _first_pair(d).update(digest="ABCDEF0123456789"), r'"pairs\.[^"]+\.digest" must be 32 lowercase hex'),
]


@pytest.mark.parametrize("edit, message", _MALFORMED)
def test_a_malformed_baseline_is_one_line_error_naming_the_field(baseline_dir, edit, message):
    _edit_baseline(baseline_dir, edit)
    result = _gate(baseline_dir)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {baseline_dir / 'b.json'}: ")
    assert re.search(message, lines[0]), lines[0]


def test_an_older_baseline_format_says_to_make_a_new_one(baseline_dir):
    """Format 1 named pairs by another digest: compared with this one's, every pair would look changed."""
    _edit_baseline(baseline_dir, lambda d: d["header"].update(format=1))
    result = _gate(baseline_dir)
    assert result.exit_code == 2, result.output
    assert "made by an older safer-audit" in result.output and "safer-audit baseline" in result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"header": ' + "[" * 100_000 + "]" * 100_000 + ', "pairs": {}}', "nested too deeply"),
        ('{"header": {}, "pairs": {"a": {}, "a": {}}}', r"key 'a' appears twice"),
    ],
)
def test_a_malformed_baseline_text_is_one_line_error(baseline_dir, text, message):
    (baseline_dir / "b.json").write_text(text, encoding="utf-8")
    result = _gate(baseline_dir)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and re.search(message, result.output), result.output


def test_a_pair_id_given_twice_is_refused(baseline_dir):
    result = _gate(baseline_dir)
    assert result.exit_code == 0, result.output  # the hand-made baseline is valid as written
    path = baseline_dir / "b.json"
    text = path.read_text(encoding="utf-8")
    start = text.index('\n    "', text.index('"pairs"'))
    line = text[start:text.index("\n", start + 1)]
    path.write_text(text.replace(line, line + line.rstrip(",") + ",", 1), encoding="utf-8")
    result = _gate(baseline_dir)
    assert result.exit_code == 2 and "appears twice" in result.output, result.output


# --- features files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("features:\n  - {latent: 1}\n  - {latent: -5, include: true}\n",
         r"f\.yaml: feature 2: latent -5 is out of range"),
        ("features:\n  - {latent: 1}\n  - {latent: 5, include: true}\n",
         r"f\.yaml: feature 2: latent 5 is out of range \(the SAE has 5 latents, 0\.\.4\)"),
        ("features:\n  - {latent: 2, include: true}\n  - {latent: 2, include: true, label: again}\n",
         r"f\.yaml: feature 2: latent 2 is listed again \(first as feature 1\)"),
        ("features: " + "[" * 5000 + "]" * 5000 + "\n", r"f\.yaml: not a features file \(nested too deeply\)"),
    ],
)
def test_a_bad_features_file_entry_is_named(tmp_path, content, message):
    from safer_audit.errors import FeaturesFileError
    from safer_audit.features.salience import select_features

    path = tmp_path / "f.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FeaturesFileError, match=message):
        select_features(torch.tensor([0.5, -0.4, 0.3, 0.2, 0.1]), 3, features_file=path)
