"""The main job: pairs in, ranked report out.

``run_scan`` reads the pairs and runs ``scan_profile``: the one-model pipeline (``scan_pairs``:
the stages of pipeline.stages, in order) once per model of the profile, then the merge stage
(pipeline.profiles.rerank) that ranks over every model's judges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from ..common.progress import no_progress
from ..config import ActivationConfig, ReadOptions, SaeTrainConfig, ScanConfig
from ..data import PairTable, source_name
from ..errors import ScanError
from ..features.labels import FeatureLabel, Labelling, labeller_for
from ..features.salience import FeatureSet
from ..model.activations import ActivationStore
from ..model.texts import PreparedText
from ..report.types import FEW_PAIRS, Report, few_pairs_warning
from ..sae.cache import train_on_store
from ..sae.model import TopKSAE
from ..sae.stats import CodeStats
from ..scoring.posterior import FlipMixture
from . import stages
from .context import RunContext
from .profiles import model_config, model_name, profile_models, profile_weights, rerank, set_flip_probability


@dataclass
class ScanResult:
    """A finished scan: the report and what it was computed from (for explain and evaluate)."""

    report: Report
    pairs: pl.DataFrame
    texts: Sequence[PreparedText]  # SpooledTexts in a scan: read back from a temporary file by index
    store: ActivationStore
    sae: TopKSAE
    stats: CodeStats
    features: FeatureSet
    signals: dict[str, torch.Tensor]  # per pair, in table order
    suspicion: torch.Tensor  # the combined ranking score per pair, in table order
    backend: object
    timings: dict[str, float] = field(default_factory=dict)
    labelling: Labelling | None = None  # labels more latents on demand (evaluate, benchmarks)

    @property
    def labels(self) -> dict[int, FeatureLabel]:
        """The labeller's labels made for this scan, by latent."""
        return dict(self.labelling.labels) if self.labelling is not None else {}

    # per pair: the posterior that it is flipped (scoring.posterior.flip_posterior, a mixture over the stack's margins)
    flip_probability: torch.Tensor | None = None
    flip_mixture: FlipMixture | None = None  # its fit; its ``reason`` says why the report gives no flip probability
    stack_weights: dict[str, float] = field(default_factory=dict)  # how much the stack trusts each judge
    judge_costs: dict[str, dict] = field(default_factory=dict)  # judge -> requests, tokens (judges that spend)
    models: dict[str, ScanResult] = field(default_factory=dict)  # a profile's other models' scans, by prefix


def run_scan(source, config: ScanConfig, *, steps=no_progress, warn=None) -> ScanResult:
    """Scan one dataset and rank its pairs, most suspicious first.

    ``source`` is a path (a file, a datasets directory, ``-``, ``hf://owner/name``) or a table in
    memory: a polars or pandas DataFrame, a list of records in any of the four schemas, or a
    ``datasets.Dataset``. A table is read with the checks a file gets; its records are named by
    index from 0 (``<table>:3: field "chosen" ...``), and its report's source is ``<table>``.

    ``warn(message)`` is told, before the long work, when the data is too small to trust the result.
    """
    ctx = RunContext.of(config, steps=steps, warn=warn)
    result = scan_profile(stages.load(source, ctx), config, source=source_name(source), ctx=ctx)
    stages.evidence(result, profile_weights(config, list(result.models)), ctx)
    return result


def scan_profile(pairs, config: ScanConfig, *, source: str, steps=no_progress, backend=None, backends=None,
                 timings=None, warn=None, labels: bool = True, ctx: RunContext | None = None) -> ScanResult:
    """``scan_pairs`` once per model of ``config.profile``, then the merge stage: the first model's
    ScanResult with the ranking over every model's judges, every model's feature cards and each
    finding's flip probability. ``backends``: prefix -> loaded backend to reuse (filled in);
    ``labels=False``: the other models' cards go unlabelled (evaluate)."""
    ctx = ctx or RunContext.of(config, steps=steps, warn=warn, timings=timings)
    extras = profile_models(config)  # a wrong profile fails before the long work
    pairs = PairTable.of(pairs, config.activations.cache_dir)  # one copy of the texts on disk for every model
    result = scan_pairs(pairs, config, source=source, backend=backend, ctx=ctx)
    result.report.run.profile = config.profile
    first = model_name(result.backend.identity)
    for card in result.report.features:
        card.model = first
    if not extras:
        set_flip_probability(result)
        return result
    backends = backends if backends is not None else {}
    signals = dict(result.signals)
    for extra in extras:
        extra_config = model_config(config, extra, labels=labels)
        sub = scan_pairs(pairs, extra_config, source=source, backend=backends.get(extra.prefix),
                         ctx=ctx.replace_config(extra_config))
        for card in sub.report.features:
            card.model = extra.prefix
        result.report.features.extend(sub.report.features)
        backends[extra.prefix] = sub.backend
        result.models[extra.prefix] = sub
        signals.update({f"{extra.prefix}/{name}": values for name, values in sub.signals.items()})
        result.timings.update({f"{extra.prefix}/{name}": seconds for name, seconds in sub.timings.items()})
    rerank(result, signals, profile_weights(config, [extra.prefix for extra in extras]), config)
    return result


def scan_pairs(pairs: PairTable | pl.DataFrame, config: ScanConfig, *, source: str, steps=no_progress, backend=None,
               timings: dict[str, float] | None = None, warn=None, ctx: RunContext | None = None) -> ScanResult:
    """The one-model pipeline over ``pairs`` (a PairTable, or a table in data.load_pairs' layout, spooled to
    a PairTable first); ``backend`` reuses a loaded model."""
    ctx = ctx or RunContext.of(config, steps=steps, warn=warn, timings=timings)
    pairs = PairTable.of(pairs, config.activations.cache_dir)
    warning = check_pair_count(len(pairs), config, source)
    if warning and ctx.warn is not None:
        ctx.warn(f"{source}: {warning}")
    labeller = labeller_for(config)  # a wrong labeller name or option fails before the long work
    model = stages.model(ctx, backend)
    acts = stages.activations(pairs, model, ctx, lazy=True)
    quality = stages.quality(pairs, model, acts, ctx)
    codes = stages.codes(acts, model, ctx)
    selection = stages.select(pairs, model, acts, codes, ctx, labeller)
    scores = stages.scores(pairs, model, acts, codes, selection, ctx)
    report = stages.report(source, pairs, model, acts, codes, selection, scores, quality, ctx)
    return ScanResult(report, pairs, acts.texts, acts.store, codes.sae, codes.stats, selection.features,
                      scores.signals, scores.suspicion, model.backend, ctx.timings, selection.labelling,
                      flip_probability=scores.stack.flip_probability, flip_mixture=scores.stack.mixture,
                      stack_weights=scores.stack.weights,
                      judge_costs=scores.costs)


def train_sae_on_data(source: str, out: Path, activations: ActivationConfig, train: SaeTrainConfig, *,
                      read: ReadOptions | None = None, sae_backend_name: str = "topk", steps=no_progress):
    """``safer-audit train-sae``: extract the activations of ``source``, train an SAE, save it."""
    ctx = RunContext.of(ScanConfig(activations=activations, sae_train=train, read=read or ReadOptions()), steps=steps)
    model = stages.model(ctx)
    acts = stages.activations(stages.load(source, ctx), model, ctx)
    sae, stats = train_on_store(acts.store, train, model.backend, activations, model.layer, steps, sae_backend_name)
    sae.save(out)
    return stats


def min_pairs(config: ScanConfig) -> int:
    """The fewest pairs a scan with ``config`` can flag any pair in.

    Measured (BENCHMARKS.md "How few pairs"): the cross-fitted heads run from 2 pairs, but a
    pair is flipped or noisy only when it is within the top ``noisy_fraction`` (or
    ``flipped_fraction``) of the ranking, so with fewer than 1 / fraction pairs (10 by default)
    no pair can be: the scan would rank and then report nothing but data-quality problems.
    """
    fraction = max(config.flipped_fraction, config.noisy_fraction)
    if fraction <= 0:
        return 2
    n = max(2, math.ceil(1 / fraction) - 1)
    while 1 / n > fraction:  # the same test as scoring.categories.categorise: (position + 1) / n <= fraction
        n += 1
    return n


def check_pair_count(n: int, config: ScanConfig, source: str) -> str | None:
    """Refuse a scan of too few pairs (ScanError naming the minimum); the warning for few."""
    least = min_pairs(config)
    if n < least:
        raise ScanError(f"{source}: {n} usable pair(s); a scan needs at least {least} (with noisy fraction "
                        f"{config.noisy_fraction:g}, fewer pairs leave no room in the ranking to flag any), "
                        f"and a useful ranking from about {FEW_PAIRS}")
    return few_pairs_warning(n)


