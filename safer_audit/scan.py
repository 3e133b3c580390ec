"""The main job: pairs in, ranked report out.

``run_scan`` chains the pipeline: load and check the pairs (data), reward-model
activations (activations), a TopK SAE trained on them or given (sae), salience and the
selected features (salience), per-pair scores and the ranking (scoring), and builds the
Report (report) that the terminal view and every exporter render.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch

from . import __version__
from .activations import ActivationStore, PreparedText, extract_activations, load_backend, pair_texts, resolve_layer
from .config import ActivationConfig, SaeTrainConfig, ScanConfig
from .data import find_quality_issues, load_pairs
from .errors import ScanError
from .progress import no_progress
from .report import (
    FEW_PAIRS,
    FeatureCard,
    FeatureContext,
    FeatureContribution,
    Finding,
    Report,
    RunInfo,
    display_path,
    few_pairs_warning,
)
from .sae import TopKSAE
from .salience import (
    CONTEXT_TOKENS,
    CodeStats,
    FeatureSet,
    encode_store,
    feature_cards,
    feature_salience,
    select_features,
)
from .scoring import categorise, cross_fitted_margins, feature_contributions, score_safe, suspicion


@dataclass
class ScanResult:
    """A finished scan: the report and what it was computed from (for explain and evaluate)."""

    report: Report
    pairs: pl.DataFrame
    texts: list[PreparedText]
    store: ActivationStore
    sae: TopKSAE
    stats: CodeStats
    features: FeatureSet
    signals: dict[str, torch.Tensor]  # per pair, in table order
    suspicion: torch.Tensor  # the combined ranking score per pair, in table order
    backend: object
    timings: dict[str, float] = field(default_factory=dict)


def _dataset_fingerprint(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]


def sae_backend(name: str = "topk"):
    """The SAE backend registered under ``name`` (``train`` and ``load``)."""
    from .plugins import sae_backends

    backends = sae_backends()
    if name not in backends:
        raise ScanError(f"unknown SAE backend {name!r} (known: {', '.join(sorted(backends))})")
    return backends[name]


def train_on_store(store: ActivationStore, train_config, backend, config, layer: int, steps):
    """Train an SAE on every activation of ``store``, with a progress bar."""
    metadata = {"model": backend.identity, "model_hash": backend.fingerprint, "layer": layer,
                "positions": config.positions, "max_length": config.max_length}
    with steps("Training SAE", "steps") as update:
        return sae_backend().train(store.iter_acts, backend.d_model, train_config, n_tokens=store.n_tokens(),
                                   metadata=metadata,
                                   progress=lambda step, total, figures: update(
                                       step, total, fvu=figures["fvu"], dead=figures["dead_fraction"]))


def get_sae(store: ActivationStore, config: ScanConfig, backend, layer: int, steps) -> tuple[TopKSAE, Path]:
    """The SAE to read the activations with: the given one, or one trained on them.

    A trained SAE is cached next to the activations, keyed by the exact set of texts and
    the training configuration, so a warm re-run does not train again.
    """
    if config.sae_path is not None:
        sae = sae_backend().load(config.sae_path)
        if sae.cfg.d_in != backend.d_model:
            raise ScanError(f"SAE {config.sae_path} reads width {sae.cfg.d_in}, but layer {layer} of "
                            f"{backend.identity} has width {backend.d_model}")
        return sae, Path(config.sae_path)
    key = hashlib.sha256(json.dumps([_dataset_fingerprint(store.keys), config.sae_train.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    directory = store.cache.directory / "saes" / key
    if (directory / "cfg.json").exists():
        try:
            return sae_backend().load(directory), directory
        except ValueError:
            pass  # an unreadable cached SAE is trained again
    sae, _stats = train_on_store(store, config.sae_train, backend, config.activations, layer, steps)
    sae.save(directory)
    return sae, directory


def train_sae_on_data(source: str, out: Path, activations: ActivationConfig, train: SaeTrainConfig, *,
                      data_options: dict, steps=no_progress):
    """``safer-audit train-sae``: extract the activations of ``source``, train an SAE, save it."""
    pairs = load_pairs(source, **data_options).pairs
    backend = load_backend(activations)
    layer = resolve_layer(activations.layer, backend.n_layers)
    config = ScanConfig(activations=activations, sae_train=train)
    _texts, store = _activations_for(pairs, backend, config, steps, "Activations")
    sae, stats = train_on_store(store, train, backend, activations, layer, steps)
    sae.save(out)
    return stats


def read_data(source: str, config: ScanConfig):
    return load_pairs(source, schema=config.schema, split=config.split, skip_invalid=config.skip_invalid,
                      preference=config.preference)


def _activations_for(pairs: pl.DataFrame, backend, config: ScanConfig, steps, label: str):
    texts = pair_texts(pairs, backend)
    with steps(label, "pairs", scale=0.5) as update:
        store = extract_activations(texts, backend, config.activations, progress=update)
    return texts, store


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
    while 1 / n > fraction:  # the same test as scoring.categorise: (position + 1) / n <= fraction
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


def run_scan(source: str, config: ScanConfig, *, steps=no_progress, warn=None) -> ScanResult:
    """Scan one dataset and rank its pairs, most suspicious first.

    ``warn(message)`` is told, before the long work, when the data is too small to trust the result.
    """
    start = time.perf_counter()
    pairs = read_data(source, config).pairs
    return scan_pairs(pairs, config, source=str(source), steps=steps, warn=warn,
                      timings={"load": round(time.perf_counter() - start, 3)})


@contextmanager
def _one_step(steps, description: str):
    """A progress step for work that reports no progress of its own: shown while it runs."""
    with steps(description, "steps") as update:
        update(0, 1)
        yield
        update(1, 1)


def scan_pairs(pairs: pl.DataFrame, config: ScanConfig, *, source: str, steps=no_progress, backend=None,
               timings: dict[str, float] | None = None, warn=None) -> ScanResult:
    """Scan a pairs table (data.load_pairs' layout); ``backend`` reuses a loaded model."""
    timings = dict(timings or {})
    clock = time.perf_counter()

    def lap(name: str):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    warning = check_pair_count(len(pairs), config, source)
    if warning and warn is not None:
        warn(f"{source}: {warning}")
    if backend is None:
        with _one_step(steps, "Loading model"):
            backend = load_backend(config.activations)
    layer = resolve_layer(config.activations.layer, backend.n_layers)
    lap("model")
    texts, store = _activations_for(pairs, backend, config, steps, "Activations")
    lap("activations")

    def count_tokens(batch: list[str]) -> list[int]:
        return [len(ids) for ids in backend.tokenizer(batch, add_special_tokens=False)["input_ids"]]

    with _one_step(steps, "Quality checks"):
        issues = find_quality_issues(pairs, max_length=config.activations.max_length, count_tokens=count_tokens)
    quality: dict[str, list[str]] = {}
    for issue in issues:
        quality.setdefault(issue.pair_id, []).append(issue.kind)
    lap("quality")
    sae, sae_dir = get_sae(store, config, backend, layer, steps)
    lap("sae")
    with steps("Encoding", "pairs", scale=0.5) as update:
        stats = encode_store(store, sae, progress=update)
    if config.salience_from:
        reference = read_data(config.salience_from, config).pairs
        _, reference_store = _activations_for(reference, backend, config, steps, "Reference activations")
        with steps("Reference encoding", "pairs", scale=0.5) as update:
            reference_stats = encode_store(reference_store, sae, progress=update)
        totals = reference_stats.totals()
    else:
        totals = stats.totals()
    with _one_step(steps, "Salience"):
        salience = feature_salience(*totals)
        features = select_features(salience, config.n_features, features_file=config.features_file)
    lap("salience")

    with steps("Scores", "signals") as update:
        update(0, 3)
        signals = {"score_safe": score_safe(stats, features)}
        update(1, 3)
        if backend.has_reward_head:
            rewards = store.scores()
            signals["reward_margin"] = rewards[0::2] - rewards[1::2]
        else:
            pooled = store.pooled_mean()
            signals["reward_margin"] = cross_fitted_margins(pooled[0::2] - pooled[1::2], folds=config.folds,
                                                            seed=config.seed, l2=config.margin_l2).margins
        update(2, 3)
        code_diffs = stats.mean_codes[0::2] - stats.mean_codes[1::2]
        signals["sae_margin"] = cross_fitted_margins(code_diffs, folds=config.folds, seed=config.seed,
                                                     l2=config.sae_l2, l1=config.sae_l1).margins
        ranked = suspicion(signals, config.ranking)
        update(3, 3)
    lap("scores")

    with _one_step(steps, "Report"):
        report = build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality,
                              backend, layer, sae, sae_dir, config, timings)
    lap("report")
    report.run.timings = dict(timings)
    return ScanResult(report, pairs, texts, store, sae, stats, features, signals, ranked, backend, timings)


def ranking_name(config: ScanConfig) -> str:
    used = [f"{w:g}*{name}" if w != 1 else name for name, w in config.ranking.items() if w]
    return f"mean percentile rank from the low end of ({', '.join(used)})"


def build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality, backend, layer,
                 sae, sae_dir, config: ScanConfig, timings) -> Report:
    """The Report of a scan: every pair as a Finding, every selected feature as a card."""
    pair_ids = pairs["pair_id"].to_list()
    per_pair_quality = [quality.get(pid, []) for pid in pair_ids]
    ranked_signals = {name: values for name, values in signals.items() if config.ranking.get(name)}
    categories = categorise(ranked, ranked_signals, per_pair_quality, flipped_fraction=config.flipped_fraction,
                            noisy_fraction=config.noisy_fraction)
    order = torch.argsort(-ranked, stable=True).tolist()
    rank_of = {pair: r + 1 for r, pair in enumerate(order)}
    labels = {f.latent: f.label for f in features.features}
    latents = features.latents.tolist()
    # a report is shared: it names files relative to the working directory, never by absolute path
    cache_dir = config.activations.cache_dir
    shown = {name: display_path(name, cache_dir) for name in set(pairs["source"].to_list())}
    findings = []
    for i, row in enumerate(pairs.iter_rows(named=True)):
        chosen_terms, rejected_terms = feature_contributions(stats, features, i)
        net = (chosen_terms - rejected_terms).abs()
        top = torch.argsort(net, descending=True, stable=True)[:config.top_features_per_pair].tolist()
        contributions = [FeatureContribution(latents[j], labels.get(latents[j]), float(chosen_terms[j]),
                                             float(rejected_terms[j])) for j in top if net[j] > 0]
        findings.append(Finding(
            pair_id=row["pair_id"], source=shown[row["source"]], line=row["line"], rank=rank_of[i],
            category=categories[i], suspicion=float(ranked[i]),
            score_safe=float(signals["score_safe"][i]), reward_margin=float(signals["reward_margin"][i]),
            sae_margin=float(signals["sae_margin"][i]), quality=per_pair_quality[i],
            chosen=row["chosen"], rejected=row["rejected"], context=row["context"], top_features=contributions))
    findings.sort(key=lambda f: f.rank)
    cards = _render_cards(feature_cards(stats, features), texts, pair_ids, backend,
                          config.activations.max_length, config.cards_with_contexts)
    counts = {c: categories.count(c) for c in ("flipped", "noisy", "quality", "clean")}
    run = RunInfo(
        tool_version=__version__, model=display_path(backend.identity, cache_dir), model_hash=backend.fingerprint, layer=layer,
        positions=config.activations.positions, max_length=config.activations.max_length,
        sae_path=display_path(sae_dir, cache_dir), sae_hash=TopKSAE.file_hash(sae_dir), sae_fvu=stats.fvu,
        n_features=len(features.features), ranking=ranking_name(config),
        thresholds={"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction},
        timings=dict(timings), pairs=len(pairs), counts=counts, data_source=display_path(source, cache_dir),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return Report(run, cards, findings)


def _render_cards(cards, texts: list[PreparedText], pair_ids: list[str], backend, max_length: int,
                  with_contexts: int) -> list[FeatureCard]:
    """Turn token ids and positions into strings and marked windows of text.

    Contexts are rendered for the first ``with_contexts`` cards (the largest |salience|):
    they hold ~130 tokens of text each, and a report with 1024 features x 10 contexts
    would be megabytes of text nobody reads.
    """
    needed = sorted({c.text_index for card in cards[:with_contexts] for c in card.contexts})
    tokenized = {}
    for special in (False, True):
        group = [i for i in needed if texts[i].has_special_tokens == special]
        if group:
            # the same left-truncated tokenization as extraction, so positions index it directly
            ids, offsets, specials = backend.tokenize([texts[i].text for i in group], max_length=max_length,
                                                      has_special_tokens=special)
            tokenized.update({i: (o, sp) for i, o, sp in zip(group, offsets, specials, strict=True)})
    out = []
    for n, card in enumerate(cards):
        contexts = []
        for ctx in card.contexts if n < with_contexts else []:
            text = texts[ctx.text_index].text
            offsets, special = tokenized[ctx.text_index]
            window = [i for i in range(max(ctx.position - CONTEXT_TOKENS, 0),
                                       min(ctx.position + CONTEXT_TOKENS + 1, len(offsets))) if not special[i]]
            s, e = offsets[ctx.position]
            lo, hi = offsets[window[0]][0], offsets[window[-1]][1]
            contexts.append(FeatureContext(pair_ids[ctx.text_index // 2], ("chosen", "rejected")[ctx.text_index % 2],
                                           text[lo:s], text[s:e], text[e:hi], ctx.value))
        tokens = backend.token_strings([t for t, _ in card.top_tokens])
        f = card.feature
        out.append(FeatureCard(latent=f.latent, label=f.label, salience=f.salience, chosen_total=card.chosen_total,
                               rejected_total=card.rejected_total, fire_rate=card.fire_rate,
                               sign="+" if f.sign > 0 else "-",
                               top_tokens=[(tok, c) for tok, (_, c) in zip(tokens, card.top_tokens, strict=True)],
                               contexts=contexts))
    return out
