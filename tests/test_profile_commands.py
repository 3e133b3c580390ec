"""--profile beyond scan and evaluate: the report's cards from every model of the profile,
each finding's flip probability, clean --min-flip-probability, and --profile for explain, review
and clean (with a report: the report's own profile)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.report.types import Report
from safer_audit.scoring.posterior import FlipMixture

from .conftest import write_hh_pairs
from .test_profiles import _config

N = 24
IDENTIFIED = FlipMixture(0.5, 1.0, 0.0, 0.1, 10.0, N // 2, N // 2)  # a fit the judges identify


@pytest.fixture
def second_model(monkeypatch, tiny_gguf_path):
    """--profile thorough reads the tiny GGUF as its second model, named "second"."""
    from safer_audit.pipeline import profiles

    model = profiles.ProfileModel("second", str(tiny_gguf_path), layer=2, max_length=64)
    monkeypatch.setitem(profiles.PROFILES, "thorough", (model,))
    return model


@pytest.fixture(scope="module")
def tiny_gguf_path(tiny_llama_dir, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from .test_profiles import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama_dir / "tokenizer.json")


def _options(model: Path, tmp_path: Path) -> list[str]:
    return ["--model", str(model), "--layer", "1", "--max-length", "64", "--latents", "64", "--k", "4",
            "--n-features", "16", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_thorough_report_has_every_models_cards_each_naming_its_model(tiny_llama_dir, second_model, tmp_path):
    from safer_audit.pipeline import profiles
    from safer_audit.pipeline.scan import run_scan, scan_pairs

    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    result = run_scan(str(data), _config(tiny_llama_dir, tmp_path, profile="thorough"))
    report = result.report
    assert report.run.profile == "thorough"
    first = [card for card in report.features if card.model == tiny_llama_dir.name]
    second = [card for card in report.features if card.model == "second"]
    assert len(first) + len(second) == len(report.features) and first and second
    alone = scan_pairs(result.pairs, profiles.model_config(_config(tiny_llama_dir, tmp_path), second_model),
                       source=str(data))
    assert [card.latent for card in second] == [card.latent for card in alone.report.features]
    fast = run_scan(str(data), _config(tiny_llama_dir, tmp_path))
    assert [card.latent for card in first] == [card.latent for card in fast.report.features]
    assert {card.model for card in fast.report.features} == {tiny_llama_dir.name} and fast.report.run.profile == "fast"
    from safer_audit.report.types import export_report

    # each card's title names its model; the page shows the cards the evidence names, the first model's
    export_report(report, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert f"<h3>{first[0].model} latent " in page and "<h3>second latent " not in page
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert [(c.model, c.latent) for c in again.features] == [(c.model, c.latent) for c in report.features]
    assert again.run.profile == "thorough"


@pytest.fixture
def distinct_flip_probability(monkeypatch):
    """The flip posterior replaced by sigmoid(-margin), distinct per pair: the tiny random models' judges carry no
    signal, so the real posterior is 0 for every pair (test_flip_posterior tests it); these tests follow the
    values from the stack to the findings and to clean."""
    from safer_audit.scoring import heads, stack

    for module in (heads, stack):  # where the posterior is used: the cached and the uncached stack
        monkeypatch.setattr(module, "flip_posterior",
                            lambda margin: (torch.sigmoid(-margin), IDENTIFIED))


def test_findings_carry_the_mixture_posterior_not_the_probability_that_rejected_is_better(tiny_llama_dir, tmp_path,
                                                                                          monkeypatch):
    from safer_audit.pipeline.scan import run_scan
    from safer_audit.scoring import posterior as module
    from safer_audit.scoring.stack import aggregate, flip_posterior, ranking_weights

    # the tiny random models' judges are too weak to identify the mixture (test_flip_refusal): taken as identified
    monkeypatch.setattr(module, "MIN_SIZE_SIGN_Z", -math.inf)
    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    config = _config(tiny_llama_dir, tmp_path, profile="fast")
    result = run_scan(str(data), config)
    _, stack = aggregate(result.signals, ranking_weights(config), folds=config.folds, seed=config.seed)
    posterior, _ = flip_posterior(stack.margin)
    index = {pair_id: i for i, pair_id in enumerate(result.pairs["pair_id"].to_list())}
    for finding in result.report.findings:
        i = index[finding.pair_id]
        assert finding.flip_probability == pytest.approx(float(posterior[i]), abs=1e-6)
        assert finding.flip_probability != pytest.approx(float(torch.sigmoid(-stack.margin[i])), abs=1e-3)


def test_every_finding_carries_the_stacks_flip_probability(tiny_llama_dir, second_model, tmp_path,
                                                           distinct_flip_probability):
    from safer_audit.pipeline.scan import run_scan

    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    for profile in ("fast", "thorough"):
        result = run_scan(str(data), _config(tiny_llama_dir, tmp_path, profile=profile))
        index = {pair_id: i for i, pair_id in enumerate(result.pairs["pair_id"].to_list())}
        for finding in result.report.findings:
            expected = float(result.flip_probability[index[finding.pair_id]])
            assert finding.flip_probability == pytest.approx(expected, abs=1e-6)
        frame = result.report.to_frame()
        assert frame["flip_probability"].to_list() == [f.flip_probability for f in result.report.findings]
    assert len({f.flip_probability for f in result.report.findings}) > 1


def _scan_report(model: Path, data: Path, tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / f"report{len(list(tmp_path.glob('report*.json')))}.json"
    result = invoke("scan", data, "-o", path, "--labeller", "none", *_options(model, tmp_path), *extra)
    assert result.exit_code == 0, result.output
    return path


def test_clean_min_flip_probability_selects_by_the_reports_flip_probability(tiny_llama_dir, tmp_path,
                                                                           distinct_flip_probability):
    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    report_path = _scan_report(tiny_llama_dir, data, tmp_path)
    findings = json.loads(report_path.read_text())["findings"]
    values = sorted(f["flip_probability"] for f in findings)
    cut = values[len(values) * 3 // 4]  # about a quarter of the pairs at or above it
    expected = {f["line"] for f in findings if f["flip_probability"] >= cut}
    out = tmp_path / "clean.jsonl"
    result = invoke("clean", data, "-o", out, "--report", report_path, "--min-flip-probability", cut)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "clean.jsonl.manifest.json").read_text())
    assert manifest["selection"]["rule"] == "flip probability"
    assert manifest["selection"]["min_flip_probability"] == cut
    assert {c["line"] for c in manifest["changes"]} == expected and 0 < len(expected) < N
    assert all(c["flip_probability"] >= cut for c in manifest["changes"])
    lines = data.read_text().splitlines(keepends=True)
    assert out.read_text().splitlines(keepends=True) == [line for i, line in enumerate(lines, 1)
                                                         if i not in expected]
    # with --mode flip the same pairs are flipped back instead
    result = invoke("clean", data, "-o", tmp_path / "flip.jsonl", "--report", report_path,
                    "--min-flip-probability", cut, "--mode", "flip")
    manifest = json.loads((tmp_path / "flip.jsonl.manifest.json").read_text())
    assert {c["line"] for c in manifest["changes"]} == expected and {c["action"] for c in manifest["changes"]} == {
        "flip"}


def test_clean_min_flip_probability_refuses_a_report_without_it_and_a_second_rule(tiny_llama_dir, tmp_path):
    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    report_path = _scan_report(tiny_llama_dir, data, tmp_path)
    report = json.loads(report_path.read_text())
    for finding in report["findings"]:
        del finding["flip_probability"]  # a report written before findings had one
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "c.jsonl"), "--report",
                                      str(old), "--min-flip-probability", "0.5"])
    assert result.exit_code == 2 and "no flip probability" in result.output
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "c.jsonl"), "--report",
                                      str(report_path), "--min-flip-probability", "0.5", "--threshold", "0.5"])
    assert result.exit_code == 2 and "not both --threshold and --min-flip-probability" in result.output
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "c.jsonl"),
                                      "--min-flip-probability", "1.5"])
    assert result.exit_code == 2 and "1.5" in result.output


def test_clean_and_review_scan_with_the_profile_they_are_given(tiny_llama_dir, second_model, tmp_path):
    from safer_audit.pipeline.scan import run_scan

    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    thorough = run_scan(str(data), _config(tiny_llama_dir, tmp_path, profile="thorough")).report
    fast = run_scan(str(data), _config(tiny_llama_dir, tmp_path)).report
    top = {profile: {f.line for f in report.findings if f.rank <= 6}
           for profile, report in (("thorough", thorough), ("fast", fast))}
    assert top["thorough"] != top["fast"]  # the two rankings differ on these pairs, so the test can tell them apart
    for profile in ("thorough", "fast"):
        out = tmp_path / f"clean-{profile}.jsonl"
        result = invoke("clean", data, "-o", out, "--drop-fraction", 0.25, "--profile", profile,
                        *_options(tiny_llama_dir, tmp_path))
        assert result.exit_code == 0, result.output
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        assert {c["line"] for c in manifest["changes"]} == top[profile]
        assert ("second/score_safe" in manifest["selection"]["ranking"]) == (profile == "thorough")
    result = CliRunner().invoke(cli, ["review", str(data), "--profile", "thorough", "--decisions",
                                      str(tmp_path / "d.json"), *_options(tiny_llama_dir, tmp_path)], input="q\n")
    assert result.exit_code == 0, result.output
    first = thorough.suspects(1)[0]
    assert first.chosen[:30] in result.output


def test_explain_scans_with_its_profile_and_a_report_keeps_its_own(tiny_llama_dir, second_model, tmp_path):
    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    report_path = _scan_report(tiny_llama_dir, data, tmp_path)  # fast
    result = invoke("explain", data, "1", "--profile", "thorough", *_options(tiny_llama_dir, tmp_path))
    assert result.exit_code == 0, result.output
    assert "second/" in result.output  # the ranking line of a thorough scan names the second model's judges
    assert invoke("explain", data, "1", "--report", report_path).exit_code == 0
    result = CliRunner().invoke(cli, ["explain", str(data), "1", "--report", str(report_path), "--profile",
                                      "thorough"])
    assert result.exit_code == 2 and "--profile fast" in result.output
    for command in (["review", str(data), "--decisions", str(tmp_path / "d.json")],
                    ["clean", str(data), "-o", str(tmp_path / "c.jsonl")]):
        result = CliRunner().invoke(cli, [*command, "--report",
                                          str(report_path), "--profile", "thorough"], input="q\n")
        assert result.exit_code == 2 and "--profile fast" in result.output, result.output
