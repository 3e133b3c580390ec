"""The main job: pairs in, ranked report out.

``run_scan`` chains the pipeline: load and check the pairs (data), reward-model
activations (activations), a TopK SAE trained on them or given (sae), salience and the
selected features (salience), per-pair scores and the ranking (scoring), and builds the
Report (report) that the terminal view and every exporter render.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch
from filelock import FileLock

from . import __version__
from .activations import ActivationStore, PreparedText, extract_activations, load_backend, pair_texts, resolve_layer
from .config import ActivationConfig, SaeTrainConfig, ScanConfig
from .data import find_quality_issues, load_pairs, tokenizer_counter
from .digests import sha256_text, short_digest
from .errors import ConfigError, ScanError
from .progress import no_progress
from .report import FeatureCard, FeatureContext, FeatureContribution, Finding, Report, RunInfo
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
from .scoring import (
    SIGNALS,
    Category,
    HeadFit,
    aggregate,
    categorise,
    compute_signals,
    feature_contributions,
    ranked_signals,
)

TRAINING_CHUNK = 65_536  # tokens per chunk handed to the trainer (it re-batches and shuffles them)


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
    # per pair: the stacked judges' probability that the rejected response is the better one
    flip_probability: torch.Tensor | None = None
    stack_weights: dict[str, float] = field(default_factory=dict)  # how much the stack trusts each judge
    judge_costs: dict[str, dict] = field(default_factory=dict)  # judge -> requests, tokens (judges that spend)


def _dataset_fingerprint(keys: list[str]) -> str:
    return short_digest(sha256_text("\n".join(sorted(set(keys)))))


def sae_backend(name: str = "topk"):
    """The SAE backend registered under ``name`` (``train`` and ``load``)."""
    from .plugins import sae_backends

    backends = sae_backends()
    if name not in backends:
        raise ScanError(f"unknown SAE backend {name!r} (known: {', '.join(sorted(backends))})")
    return backends[name]


def train_on_store(store: ActivationStore, train_config, backend, config, layer: int, steps):
    """Train an SAE on the activations of ``store`` (up to ``train_config.max_tokens``), with a progress bar.

    The tokens come in an order fixed by the data (ActivationStore.training_tokens), so
    the SAE does not depend on how the cache grouped them into shards or named them.
    """
    metadata = {"model": backend.identity, "model_hash": backend.fingerprint, "layer": layer,
                "positions": config.positions, "max_length": config.max_length}
    if train_config.max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, not {train_config.max_tokens}")
    tokens = store.training_tokens(train_config.seed, train_config.max_tokens)

    def make_batches():
        return tokens.split(TRAINING_CHUNK)

    with steps("Training SAE", "steps") as update:
        return sae_backend().train(make_batches, backend.d_model, train_config, n_tokens=len(tokens),
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
    key = short_digest(sha256_text(json.dumps([_dataset_fingerprint(store.keys), config.sae_train.to_dict()],
                                              sort_keys=True)))
    directory = store.cache.directory / "saes" / key
    cached = _load_cached_sae(directory)
    if cached is not None:
        return cached, directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # one trainer per SAE: a concurrent scan of the same data waits here, then loads this one's SAE
    with FileLock(str(directory.parent / f"{key}.lock")):
        cached = _load_cached_sae(directory)
        if cached is not None:
            return cached, directory
        if directory.exists():  # an unreadable cached SAE is trained again
            shutil.rmtree(directory)
        sae, _stats = train_on_store(store, config.sae_train, backend, config.activations, layer, steps)
        sae.save(directory)
    return sae, directory


def _load_cached_sae(directory: Path) -> TopKSAE | None:
    if not (directory / "cfg.json").exists():
        return None
    try:
        return sae_backend().load(directory)
    except ValueError:
        return None


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


def run_scan(source: str, config: ScanConfig, *, steps=no_progress) -> ScanResult:
    """Scan one dataset and rank its pairs, most suspicious first."""
    start = time.perf_counter()
    pairs = read_data(source, config).pairs
    return scan_pairs(pairs, config, source=str(source), steps=steps,
                      timings={"load": round(time.perf_counter() - start, 3)})


def scan_pairs(pairs: pl.DataFrame, config: ScanConfig, *, source: str, steps=no_progress, backend=None,
               timings: dict[str, float] | None = None) -> ScanResult:
    """Scan a pairs table (data.load_pairs' layout); ``backend`` reuses a loaded model."""
    timings = dict(timings or {})
    clock = time.perf_counter()

    def lap(name: str):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    if len(pairs) < 2:
        raise ScanError(f"{source}: {len(pairs)} usable pair(s); a scan needs at least 2")
    if backend is None:
        backend = load_backend(config.activations)
    layer = resolve_layer(config.activations.layer, backend.n_layers)
    lap("model")
    texts, store = _activations_for(pairs, backend, config, steps, "Activations")
    lap("activations")

    issues = find_quality_issues(pairs, max_length=config.activations.max_length,
                                 count_tokens=tokenizer_counter(backend.tokenizer))
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
        reference_stats = encode_store(reference_store, sae)
        salience = feature_salience(*reference_stats.totals())
    else:
        salience = feature_salience(*stats.totals())
    features = select_features(salience, config.n_features, features_file=config.features_file)
    lap("salience")

    signals, ranked, stack, costs = judge_pairs(pairs, stats, features, config, store, backend)
    lap("scores")

    report = build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality,
                          backend, layer, sae, sae_dir, config, timings)
    lap("report")
    report.run.timings = dict(timings)
    return ScanResult(report, pairs, texts, store, sae, stats, features, signals, ranked, backend, timings,
                      flip_probability=stack.flip_probability, stack_weights=stack.weights, judge_costs=costs)


def ranking_weights(config: ScanConfig) -> dict[str, float]:
    """Judge -> weight in the ranking: ``config.ranking`` by default, equal weights for ``--judge``."""
    if config.judges is None:
        return dict(config.ranking)
    return {name: 1.0 for name in config.judges}


def judge_pairs(pairs: pl.DataFrame, stats: CodeStats, features: FeatureSet, config: ScanConfig, store, backend):
    """The judges' signals (the built-in three always, for the report, plus those chosen), the
    suspicion, the stack and the cost of judges that spend."""
    from .judges import JudgeContext, run_judges

    fit = HeadFit.of(config)
    rewards = store.scores() if backend.has_reward_head else None
    pooled = None if backend.has_reward_head else store.pooled_mean()
    signals = compute_signals(stats, features, rewards=rewards, pooled=pooled, fit=fit)
    weights = ranking_weights(config)
    context = JudgeContext(pairs, stats, features, rewards=rewards, pooled=pooled, fit=fit,
                           cache_dir=config.activations.cache_dir / "judges",
                           computed={name: values.double() for name, values in signals.items()})
    extra, costs = run_judges([name for name in weights if weights[name] and name not in signals], context)
    signals = {**signals, **extra}
    ranked, stack = aggregate(signals, weights, method=config.aggregation, folds=config.folds, seed=config.seed)
    return signals, ranked, stack, costs


def ranking_name(config: ScanConfig) -> str:
    used = [f"{w:g}*{name}" if w != 1 else name for name, w in ranking_weights(config).items() if w]
    if config.aggregation == "stacked":
        return f"flip probability of a cross-fitted Bradley-Terry stack over ({', '.join(used)})"
    return f"mean percentile rank from the low end of ({', '.join(used)})"


def build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality, backend, layer,
                 sae, sae_dir, config: ScanConfig, timings) -> Report:
    """The Report of a scan: every pair as a Finding, every selected feature as a card."""
    pair_ids = pairs["pair_id"].to_list()
    per_pair_quality = [quality.get(pid, []) for pid in pair_ids]
    categories = categorise(ranked, ranked_signals(signals, ranking_weights(config)), per_pair_quality,
                            flipped_fraction=config.flipped_fraction, noisy_fraction=config.noisy_fraction)
    order = torch.argsort(-ranked, stable=True).tolist()
    rank_of = {pair: r + 1 for r, pair in enumerate(order)}
    labels = {f.latent: f.label for f in features.features}
    latents = features.latents.tolist()
    findings = []
    for i, row in enumerate(pairs.iter_rows(named=True)):
        chosen_terms, rejected_terms = feature_contributions(stats, features, i)
        net = (chosen_terms - rejected_terms).abs()
        top = torch.argsort(net, descending=True, stable=True)[:config.top_features_per_pair].tolist()
        contributions = [FeatureContribution(latents[j], labels.get(latents[j]), float(chosen_terms[j]),
                                             float(rejected_terms[j])) for j in top if net[j] > 0]
        findings.append(Finding(
            pair_id=row["pair_id"], source=row["source"], line=row["line"], rank=rank_of[i],
            category=categories[i], suspicion=float(ranked[i]), **{name: float(signals[name][i]) for name in SIGNALS},
            quality=per_pair_quality[i],
            chosen=row["chosen"], rejected=row["rejected"], context=row["context"], top_features=contributions))
    findings.sort(key=lambda f: f.rank)
    cards = _render_cards(feature_cards(stats, features), texts, pair_ids, backend,
                          config.activations.max_length, config.cards_with_contexts)
    counts = {str(c): categories.count(c) for c in Category}
    run = RunInfo(
        tool_version=__version__, model=backend.identity, model_hash=backend.fingerprint, layer=layer,
        positions=config.activations.positions, max_length=config.activations.max_length,
        sae_path=str(sae_dir), sae_hash=TopKSAE.file_hash(sae_dir), sae_fvu=stats.fvu,
        n_features=len(features.features), ranking=ranking_name(config),
        thresholds={"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction},
        timings=dict(timings), pairs=len(pairs), counts=counts, data_source=str(source),
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
