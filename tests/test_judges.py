"""Judges as plugins, their aggregation (mean rank, the cross-fitted stack, the flip probability),
length control, and evaluate's flip modes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from safer_audit import plugins
from safer_audit.cli import cli
from safer_audit.config import ScanConfig
from safer_audit.data import load_pairs
from safer_audit.errors import ConfigError
from safer_audit.hookspecs import hookimpl
from safer_audit.scoring.judges import FunctionJudge, JudgeContext, make_judge, residualise_on_length, run_judges
from safer_audit.scoring.ranks import suspicion
from safer_audit.scoring.stack import aggregate, stack_judges
from safer_audit.workflows.evaluate import flip_pairs, flip_weights, spearman

from .conftest import hh_records


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("judges") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(40)), encoding="utf-8")
    return path, load_pairs(path).pairs


def test_built_in_judges_are_listed_and_a_lenres_variant_of_any_is_made():
    assert {"score_safe", "reward_margin", "sae_margin", "length"} <= set(plugins.judges())
    info = {i.name: i for i in plugins.plugin_info()}["safer_audit.backends.judges"]
    assert info.registers["judges"] == ["score_safe", "reward_margin", "sae_margin", "length"]
    assert make_judge("reward_margin-lenres").name == "reward_margin-lenres"
    with pytest.raises(ConfigError, match="unknown judge 'nope'.*score_safe"):
        make_judge("nope")


def test_residualising_removes_the_length_dependence():
    generator = torch.Generator().manual_seed(0)
    length = torch.randn(400, generator=generator) * 300
    truth = torch.randn(400, generator=generator)
    signal = truth + length / 100  # a judge that partly reads length
    residual = residualise_on_length(signal, length, folds=5, seed=0)
    assert spearman(signal, length) > 0.8
    assert abs(spearman(residual, length)) < 0.1
    assert spearman(residual, truth) > 0.5
    # odd, as a judge must be: a pair's own values decide its sign
    assert torch.equal(torch.sign(residualise_on_length(-signal, -length)), -torch.sign(residual))


def test_the_stack_trusts_the_informative_judge_and_gives_a_flip_probability():
    generator = torch.Generator().manual_seed(1)
    n = 600
    good = torch.randn(n, generator=generator) + 1.0  # chosen usually better
    noise = torch.randn(n, generator=generator)
    stack = stack_judges({"good": good, "noise": noise}, folds=5, seed=0)
    assert stack.weights["good"] > 5 * abs(stack.weights["noise"])
    assert torch.allclose(stack.rejected_probability, torch.sigmoid(-stack.margin))
    assert float(stack.rejected_probability[good.argmin()]) > 0.5 > float(stack.rejected_probability[good.argmax()])
    ranked, again = aggregate({"good": good, "noise": noise}, method="stacked")
    assert torch.equal(ranked, again.rejected_probability)


def test_mean_rank_aggregation_is_the_old_suspicion_and_ignores_unweighted_judges():
    generator = torch.Generator().manual_seed(2)
    signals = {name: torch.randn(50, generator=generator) for name in ("score_safe", "reward_margin", "extra")}
    weights = {"score_safe": 1.0, "reward_margin": 1.0, "sae_margin": 0.0}
    ranked, stack = aggregate(signals, weights)
    assert torch.equal(ranked, suspicion({k: signals[k] for k in ("score_safe", "reward_margin")}, weights))
    assert set(stack.weights) == {"score_safe", "reward_margin"}
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(signals, method="median")


def test_a_plugin_judge_is_run_once_with_the_context_and_checked():
    calls = []

    class Plugin:
        @hookimpl
        def register_judges(self, register):
            register("count", lambda: FunctionJudge("count", "test", lambda c: calls.append(1) or
                                                    torch.arange(len(c.pairs), dtype=torch.float64)))
            register("short", lambda: FunctionJudge("short", "test", lambda c: torch.zeros(1)))

    plugins.load_plugins()
    plugin = Plugin()
    plugins.pm.register(plugin, name="test-judges")
    try:
        import polars as pl

        context = JudgeContext(pl.DataFrame({"context": ["c"] * 3, "chosen": ["a", "bb", "c"], "rejected": ["x"] * 3}))
        signals, costs = run_judges(["count", "count", "length"], context)
        assert signals["count"].tolist() == [0, 1, 2] and calls == [1] and costs == {}
        assert set(signals) == {"count", "length"}
        with pytest.raises(ConfigError, match="'short' gave \\(1,\\) values for 3 pairs"):
            run_judges(["short"], context)
    finally:
        plugins.pm.unregister(plugin)


def test_flip_modes_bias_which_pairs_are_flipped(pairs):
    _, table = pairs
    weights = flip_weights(table, "length")
    longer_rejected = torch.tensor((table["rejected"].str.len_chars() > table["chosen"].str.len_chars()).to_list())
    shares = {"uniform": [], "length": []}
    for seed in range(20):
        for mode, w in (("uniform", None), ("length", weights)):
            copy, mask = flip_pairs(table, 0.25, seed, weights=w)
            assert int(mask.sum()) == 10
            shares[mode].append(float(longer_rejected[mask].double().mean()))
            chosen_longer = (copy["chosen"].str.len_chars() > copy["rejected"].str.len_chars()).to_list()
            assert [chosen_longer[i] for i in mask.nonzero().flatten().tolist()] == \
                   longer_rejected[mask].tolist()  # flipped pairs now have the longer response chosen
    assert sum(shares["length"]) / 20 > sum(shares["uniform"]) / 20 + 0.1
    assert torch.equal(flip_pairs(table, 0.25, 3, weights=weights)[1], flip_pairs(table, 0.25, 3, weights=weights)[1])
    reference = torch.linspace(-1, 1, len(table))
    close = flip_weights(table, "margin", reference)
    assert float(close[len(table) // 2]) > 10 * float(close[0])
    with pytest.raises(ConfigError, match="reference"):
        flip_weights(table, "margin")


def test_scan_with_judges_ranks_by_them(tiny_llama_dir, pairs, tmp_path):
    from safer_audit.config import ActivationConfig
    from safer_audit.pipeline.scan import scan_pairs

    path, table = pairs
    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache"), n_features=16)
    config.sae_train.n_latents, config.sae_train.k = 64, 4
    default = scan_pairs(table, config, source=str(path))
    assert torch.equal(default.suspicion, suspicion(default.signals, config.ranking))
    # the harm judge is run for the default flipped rule, and not ranked
    assert set(default.signals) == {"score_safe", "reward_margin", "sae_margin", "harm"}
    assert default.flip_probability.shape == (len(table),) and set(default.stack_weights) == {"score_safe",
                                                                                             "reward_margin"}
    config.judges = ("score_safe", "length", "reward_margin-lenres")
    judged = scan_pairs(table, config, source=str(path))
    expected = suspicion({name: judged.signals[name] for name in config.judges})
    assert torch.equal(judged.suspicion, expected)
    assert "length, reward_margin-lenres" in judged.report.run.ranking
    config.aggregation = "stacked"
    stacked = scan_pairs(table, config, source=str(path))
    from safer_audit.scoring.stack import ranking_weights

    _, stack = aggregate(stacked.signals, ranking_weights(config), method="stacked", folds=config.folds,
                         seed=config.seed)
    assert torch.equal(stacked.suspicion, stack.rejected_probability)  # ranked by the margin; findings carry the
    assert torch.equal(stacked.flip_probability, stack.flip_probability)  # mixture posterior
    assert "stack" in stacked.report.run.ranking


def test_cli_judge_and_flip_mode_options(tiny_llama_dir, pairs, tmp_path):
    path, _ = pairs
    common = ["--model", str(tiny_llama_dir), "--layer", "1", "--max-length", "64", "--cache-dir",
              str(tmp_path / "cache"), "--latents", "64", "--k", "4", "--n-features", "16", "--quiet"]
    bad = CliRunner().invoke(cli, ["scan", str(path), *common, "--judge", "nope"])
    assert bad.exit_code == 2 and "unknown judge 'nope'" in bad.output
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["evaluate", str(path), *common, "--positions", "response", "--flip-rate", "0.25",
                                      "--flip-mode", "length", "--flip-mode", "margin", "--judge", "score_safe",
                                      "--judge", "length", "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [mode["flip_mode"] for mode in report["modes"]] == ["length", "margin"]
    for mode in report["modes"]:
        assert {"length[response]", "stacked[response]", "stack-oracle[response]"} <= set(mode["summary"])
        assert mode["config"]["judges"] == ["score_safe", "length"]
        assert all(math.isfinite(v) for v in mode["length_correlation"].values())
        assert set(mode["calibration"]["0"]) == {"mean_predicted", "flip_rate", "brier", "ece", "estimated_rate",
                                                 "rate_sd", "identified", "rejected_mean_predicted", "rejected_brier",
                                                 "rejected_ece"}
    assert "length flips" in result.output and "margin flips" in result.output
