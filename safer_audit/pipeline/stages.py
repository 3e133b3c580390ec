"""The stages of a scan, in the order data flows through them.

Each stage is a function from the previous stages' outputs (frozen, typed) to its own, run in a
RunContext that times it and shows its progress: pairs -> Activations -> Codes -> Selection ->
Scores -> Report. The scan (pipeline.scan) chains them; the gate and train-sae run the ones they need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from ..common.memory import freed_blocks_to_the_system, heap_kept_for_tensors
from ..config import ScanConfig
from ..data import PairTable, find_quality_issues, load_pairs, spool_pairs, tokenizer_counter
from ..data.tokens import cached_counter
from ..errors import ScanError
from ..features.labels import Labelling, label_cache_file
from ..features.salience import FeatureSet, feature_salience, select_by_safety, select_features
from ..model.activations import ActivationStore, extract_activations, load_backend, resolve_layer
from ..model.texts import PreparedText, SpooledTexts, pair_texts
from ..report.build import build_report
from ..report.types import Report
from ..report.why import explain_suspects
from ..sae.cache import get_sae
from ..sae.codes import CodeCache, encode_store
from ..sae.model import TopKSAE
from ..sae.stats import CodeStats
from ..scoring.judges import judge_pairs
from ..scoring.stack import Stack
from .context import RunContext


@dataclass(frozen=True)
class Model:
    backend: object  # a hookspecs.ModelBackend
    layer: int  # the 1-based block read


@dataclass(frozen=True)
class Activations:
    texts: Sequence[PreparedText]  # two a pair (chosen, rejected), SpooledTexts: read back by index
    store: ActivationStore


@dataclass(frozen=True)
class Codes:
    sae: TopKSAE
    sae_dir: Path
    stats: CodeStats


@dataclass(frozen=True)
class Selection:
    salience: torch.Tensor  # per latent
    features: FeatureSet
    labelling: Labelling | None


@dataclass(frozen=True)
class Scores:
    signals: dict[str, torch.Tensor]  # per pair, in table order
    suspicion: torch.Tensor  # the ranking score per pair
    stack: Stack
    costs: dict[str, dict]  # judge -> requests, tokens (judges that spend)


def read_data(source, config: ScanConfig, *, spool: bool = False):
    """The pairs of ``source``, a path or a table in memory (data.LoadResult); ``spool``: as a PairTable, its texts in a temporary file in
    the cache directory (a scan: flat memory), else as a polars table (evaluate flips pairs in it)."""
    if spool:
        return spool_pairs(source, config.activations.cache_dir, config.read)
    return load_pairs(source, config.read)


def load(source, ctx: RunContext) -> PairTable:
    with ctx.timed("load"):
        return read_data(source, ctx.config, spool=True).pairs


def model(ctx: RunContext, backend=None) -> Model:
    """The model backend (``backend``: one already loaded) and the layer it is read at."""
    if backend is None:
        with ctx.step("model", "Loading model"):
            backend = load_backend(ctx.config.activations)
    return Model(backend, resolve_layer(ctx.config.activations.layer, backend.n_layers))


TEXTS_BATCH = 4096  # pairs whose messages are turned into Python objects at a time to render their texts


def rendered_texts(pairs: PairTable | pl.DataFrame, backend, directory: Path | None = None) -> SpooledTexts:
    """``pair_texts`` a range of pairs at a time (the messages columns of every pair as Python lists of
    dicts at once peaked at ~9 KB a pair), into an unnamed temporary file in ``directory`` (SpooledTexts:
    held as strings for the whole scan they were ~1.4 KB a pair)."""
    texts = SpooledTexts(directory)
    if isinstance(pairs, PairTable):
        for rows in pairs.slices(TEXTS_BATCH):
            texts.extend(pair_texts(rows, backend))
        return texts
    for start in range(0, len(pairs), TEXTS_BATCH):
        texts.extend(pair_texts(pairs.slice(start, TEXTS_BATCH), backend))
    return texts


def activations(pairs: PairTable | pl.DataFrame, model: Model, ctx: RunContext, *, lazy: bool = False,
                name: str = "activations", description: str = "Activations") -> Activations:
    """Every text's hidden states at the read layer, from the cache where it holds them. ``lazy``: cached
    shards are checked when first read (a warm scan whose codes are all cached reads none)."""
    heap_kept_for_tensors()  # a profile's second model comes after the first one's scores and report
    with ctx.stage(name, description, "pairs", scale=0.5) as update:
        texts = rendered_texts(pairs, model.backend, ctx.config.activations.cache_dir)
        store = extract_activations(texts, model.backend, ctx.config.activations, progress=update, lazy=lazy,
                                    executor=ctx.executor)
    return Activations(texts, store)


def quality(pairs: PairTable, model: Model, acts: Activations, ctx: RunContext) -> dict[str, list[str]]:
    """The cheap data-quality findings, pair id -> kinds; token counts are kept beside the activations (the
    model's tokenizer), so a warm scan does not tokenize again."""
    with ctx.step("quality", "Quality checks"):
        count_tokens = cached_counter(tokenizer_counter(model.backend.tokenizer),
                                      acts.store.cache.directory / "token-counts")
        issues = find_quality_issues(pairs, max_length=ctx.config.activations.max_length, count_tokens=count_tokens)
    found: dict[str, list[str]] = {}
    for issue in issues:
        found.setdefault(issue.pair_id, []).append(issue.kind)
    return found


def encode(store: ActivationStore, sae: TopKSAE, ctx: RunContext, *, description: str = "Encoding") -> CodeStats:
    """One pass of the SAE over every read position; codes cached before are read back."""
    with ctx.stage("codes", description, "pairs", scale=0.5) as update:
        return encode_store(store, sae, progress=update, cache=CodeCache.for_store(store, sae))


def codes(acts: Activations, model: Model, ctx: RunContext) -> Codes:
    """The SAE (the user's, or one trained on these activations and cached) and every text's codes."""
    heap_kept_for_tensors()
    with ctx.timed("sae"):
        sae, sae_dir = get_sae(acts.store, ctx.config, model.backend, model.layer, ctx.steps)
    return Codes(sae, sae_dir, encode(acts.store, sae, ctx))


def select(pairs: PairTable, model: Model, acts: Activations, codes: Codes, ctx: RunContext,
           labeller) -> Selection:
    """Salience (over ``--salience-from``'s pairs when given) and the selected features; with
    ``--select safety``, the candidates the labeller rates as safety related."""
    config = ctx.config
    if config.salience_from:
        reference = activations(read_data(config.salience_from, config, spool=True).pairs, model, ctx, lazy=True,
                                name="reference", description="Reference activations")
        totals = encode(reference.store, codes.sae, ctx, description="Reference encoding").totals()
    else:
        totals = codes.stats.totals()
    with ctx.step("salience", "Salience"):
        salience = feature_salience(*totals)
        features = select_features(salience, config.n_features, features_file=config.features_file)
    labelling = Labelling(labeller, codes.stats, acts.texts, pairs["pair_id"].to_list(), model.backend,
                          config.activations.max_length, salience,
                          label_cache_file(config, codes.sae_dir, labeller))
    if config.select == "safety":
        with ctx.timed("labels"):
            labels = labelling.label([f.latent for f in features.features])
        candidates = len(features.features)
        features = select_by_safety(features, {latent: label.relevance for latent, label in labels.items()},
                                    config.relevance_threshold, config.n_features)
        if not features.features:
            raise ScanError(f"--select safety: none of the {candidates} candidate features has a safety relevance "
                            f">= {config.relevance_threshold:g}; lower --relevance-threshold or use --select salience")
    return Selection(salience, features, labelling)


def scores(pairs: PairTable, model: Model, acts: Activations, codes: Codes, selection: Selection,
           ctx: RunContext) -> Scores:
    """The judges' signals, the suspicion they rank by, the stack and what judges that spend cost."""
    # from here on every stage reads the codes a range of pairs at a time into blocks of tens of MB; not
    # earlier: extraction and SAE training, whose blocks are as large, ran ~20% slower
    freed_blocks_to_the_system()
    with ctx.step("scores", "Scores"):
        return Scores(*judge_pairs(pairs, codes.stats, selection.features, ctx.config, acts.store, model.backend))


def report(source: str, pairs: PairTable, model: Model, acts: Activations, codes: Codes, selection: Selection,
           scores: Scores, quality: dict[str, list[str]], ctx: RunContext) -> Report:
    labeller = selection.labelling.labeller if selection.labelling is not None else None
    # labelling is most of this stage when there is a labeller (seconds to minutes): the bar says so
    described = "Report" if labeller is None else f"Report, labelling features with {getattr(labeller, 'name', '?')}"
    with ctx.step("report", described):
        built = build_report(source, pairs, model, acts, codes, selection, scores, quality, ctx.config, ctx.timings)
    built.run.timings = dict(ctx.timings)
    return built


def evidence(result, weights: dict[str, float], ctx: RunContext) -> None:
    """The suspects' why and the flipped and noisy pairs' evidence spans, once the ranking is final (a profile
    ranks again over every model's judges): after the report, so evaluate and the gate, which read no
    report text, never pay for it."""
    with ctx.step("evidence", "Evidence"):
        explain_suspects(result.report, result.pairs["pair_id"].to_list(), result.texts, result.store, result.sae,
                         result.features, result.backend, ctx.config.activations.max_length, result.signals, weights,
                         judges_cache=ctx.config.activations.cache_dir / "judges",
                         judges_dtype=ctx.config.activations.dtype)
    result.report.run.timings = dict(ctx.timings)
