"""Flip injection, AUROC and precision@k, and the evaluate command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.data import load_pairs
from safer_audit.workflows.evaluate import auroc, flip_pairs, precision_at

from .conftest import hh_records


def test_auroc_against_hand_computed_cases():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    positive = torch.tensor([True, False, True, False])
    # positive-negative pairs: (0.9,0.8) yes, (0.9,0.1) yes, (0.7,0.8) no, (0.7,0.1) yes
    assert auroc(scores, positive) == pytest.approx(3 / 4)
    assert auroc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([True, False, False])) == pytest.approx(0.75)
    assert auroc(-scores, positive) == pytest.approx(1 / 4)
    assert auroc(scores, torch.tensor([True] * 4)) != auroc(scores, torch.tensor([True] * 4))  # NaN: no negatives


def test_precision_at_top_fraction():
    scores = torch.arange(100, dtype=torch.float32)  # 99 is the most suspicious
    positive = torch.zeros(100, dtype=torch.bool)
    positive[[99, 98, 50]] = True
    assert precision_at(scores, positive, 0.01) == 1.0
    assert precision_at(scores, positive, 0.05) == pytest.approx(2 / 5)
    assert precision_at(scores, positive, 0.10) == pytest.approx(2 / 10)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(60)), encoding="utf-8")
    return path, load_pairs(path).pairs


def test_flipping_is_exact_and_reproducible(pairs):
    _, table = pairs
    flipped, mask = flip_pairs(table, 0.1, seed=3)
    assert int(mask.sum()) == 6
    again, mask_again = flip_pairs(table, 0.1, seed=3)
    assert torch.equal(mask, mask_again) and again.equals(flipped)
    _, other = flip_pairs(table, 0.1, seed=4)
    assert not torch.equal(mask, other)
    for i in range(len(table)):
        original, row = table.row(i, named=True), flipped.row(i, named=True)
        if mask[i]:
            assert (row["chosen"], row["rejected"]) == (original["rejected"], original["chosen"])
            assert row["chosen_messages"] == original["rejected_messages"]
        else:
            assert row == original
    assert flipped["pair_id"].to_list() == table["pair_id"].to_list()
    assert int(flip_pairs(table, 0.25, seed=0)[1].sum()) == 15


def test_evaluate_command_measures_every_scorer(tiny_llama_dir, pairs, tmp_path):
    path, _ = pairs
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, [
        "evaluate", str(path), "--model", str(tiny_llama_dir), "--layer", "1", "--max-length", "64",
        "--cache-dir", str(tmp_path / "cache"), "--latents", "64", "--k", "4", "--n-features", "16",
        "--positions", "response", "--positions", "all", "--seed", "0", "--seed", "1",
        "--flip-rate", "0.2", "--quiet", "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["flipped"] == 12 and report["seeds"] == [0, 1]
    judged = {"score_safe", "reward_margin", "sae_margin"}
    assert set(report["summary"]) == {"score_safe[all]", "combined[response]", "combined-lenres[response]",
                                      "stacked[response]", "stack-oracle[response]", "length", "random",
                                      *(f"{j}[response]" for j in judged), *(f"{j}-lenres[response]" for j in judged)}
    assert report["flip_mode"] == "uniform"
    assert set(report["length_correlation"]) >= {f"{j}[response]" for j in judged}
    for scorer in report["summary"].values():
        assert 0.0 <= scorer["auroc"]["mean"] <= 1.0
        assert set(scorer) == {"auroc", "p@1%", "p@5%", "p@10%"}
    assert report["runs"]["0"] != report["runs"]["1"]
    assert "AUROC" in result.output and "score_safe[response]" in result.output
