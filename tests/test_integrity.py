"""What is loaded is checked before use: SAE weights (digest, finite), SAE configs, features
files and baselines by type and range, each a one-line error naming the file and the field."""

from __future__ import annotations

import json
import math

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
    from safer_audit.scan import run_scan

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
