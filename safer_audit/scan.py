"""The main job: pairs in, ranked report out.

``run_scan`` chains the pipeline: load and check the pairs (data), reward-model
activations (activations), a TopK SAE trained on them or given (sae), salience and the
selected features (salience), per-pair scores and the ranking (scoring), and builds the
Report (report) that the terminal view and every exporter render.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch
from filelock import FileLock

from . import __version__
from .activations import (
    ActivationStore,
    PreparedText,
    SpooledTexts,
    extract_activations,
    load_backend,
    pair_texts,
    resolve_layer,
)
from .codes import CodeCache
from .config import ActivationConfig, ReadOptions, SaeTrainConfig, ScanConfig
from .data import PairTable, find_quality_issues, load_pairs, spool_pairs, tokenizer_counter
from .data.tokens import cached_counter
from .digests import sha256_text, short_digest
from .errors import ConfigError, ScanError
from .labelling import FeatureLabel, LabelContext, LabelRequest
from .labels import cache_path, label_features, make_labeller
from .progress import no_progress
from .report import (
    FEW_PAIRS,
    FeatureCard,
    FeatureContext,
    FeatureContribution,
    Finding,
    LazyFindings,
    Report,
    RunInfo,
    display_path,
    few_pairs_warning,
)
from .sae import TopKSAE
from .salience import (
    CONTEXT_TOKENS,
    LENGTH_DRIVEN,
    CodeStats,
    Feature,
    FeatureSet,
    encode_store,
    feature_cards,
    feature_salience,
    select_by_safety,
    select_features,
)
from .scoring import (
    SIGNALS,
    Category,
    HeadCache,
    HeadFit,
    aggregate,
    categorise,
    compute_signals,
    ranked_signals,
)

TRAINING_CHUNK = 65_536  # tokens per chunk handed to the trainer (it re-batches and shuffles them)


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

    # per pair: the posterior that it is flipped (scoring.flip_posterior, a mixture over the stack's margins)
    flip_probability: torch.Tensor | None = None
    stack_weights: dict[str, float] = field(default_factory=dict)  # how much the stack trusts each judge
    judge_costs: dict[str, dict] = field(default_factory=dict)  # judge -> requests, tokens (judges that spend)
    models: dict[str, ScanResult] = field(default_factory=dict)  # a profile's other models' scans, by prefix


def _dataset_fingerprint(keys: list[str]) -> str:
    return short_digest(sha256_text("\n".join(sorted(set(keys)))))


def sae_backend(name: str = "topk"):
    """The SAE backend registered under ``name`` (``train`` and ``load``)."""
    from .plugins import sae_backends

    backends = sae_backends()
    if name not in backends:
        raise ScanError(f"unknown SAE backend {name!r} (known: {', '.join(sorted(backends))})")
    return backends[name]


def train_on_store(store: ActivationStore, train_config, backend, config, layer: int, steps,
                   sae_backend_name: str = "topk"):
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
        return sae_backend(sae_backend_name).train(make_batches, backend.d_model, train_config, n_tokens=len(tokens),
                                   metadata=metadata,
                                   progress=lambda step, total, figures: update(
                                       step, total, fvu=figures["fvu"], dead=figures["dead_fraction"]))


def get_sae(store: ActivationStore, config: ScanConfig, backend, layer: int, steps) -> tuple[TopKSAE, Path]:
    """The SAE to read the activations with: the given one, or one trained on them.

    A trained SAE is cached next to the activations, keyed by the exact set of texts and
    the training configuration, so a warm re-run does not train again.
    """
    if config.sae_path is not None:
        sae = sae_backend(config.sae_backend).load(config.sae_path)
        if sae.cfg.d_in != backend.d_model:
            raise ScanError(f"SAE {config.sae_path} reads width {sae.cfg.d_in}, but layer {layer} of "
                            f"{backend.identity} has width {backend.d_model}")
        return sae, Path(config.sae_path)
    trained = [_dataset_fingerprint(store.keys), config.sae_train.to_dict()]
    if config.sae_backend != "topk":  # another trainer, another SAE; the built-in's keys stay as they were
        trained.append(config.sae_backend)
    key = short_digest(sha256_text(json.dumps(trained, sort_keys=True)))
    directory = store.cache.directory / "saes" / key
    cached = _load_cached_sae(directory, config.sae_backend)
    if cached is not None:
        return cached, directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # one trainer per SAE: a concurrent scan of the same data waits here, then loads this one's SAE
    with FileLock(str(directory.parent / f"{key}.lock")):
        cached = _load_cached_sae(directory, config.sae_backend)
        if cached is not None:
            return cached, directory
        if directory.exists():  # an unreadable cached SAE is trained again
            shutil.rmtree(directory)
        sae, _stats = train_on_store(store, config.sae_train, backend, config.activations, layer, steps,
                                     config.sae_backend)
        sae.save(directory)
    return sae, directory


def _load_cached_sae(directory: Path, name: str = "topk") -> TopKSAE | None:
    if not (directory / "cfg.json").exists():
        return None
    try:
        return sae_backend(name).load(directory)
    except ValueError:
        return None


def train_sae_on_data(source: str, out: Path, activations: ActivationConfig, train: SaeTrainConfig, *,
                      read: ReadOptions | None = None, sae_backend_name: str = "topk", steps=no_progress):
    """``safer-audit train-sae``: extract the activations of ``source``, train an SAE, save it."""
    pairs = spool_pairs(source, activations.cache_dir, read).pairs
    backend = load_backend(activations)
    layer = resolve_layer(activations.layer, backend.n_layers)
    config = ScanConfig(activations=activations, sae_train=train)
    _texts, store = _activations_for(pairs, backend, config, steps, "Activations")
    sae, stats = train_on_store(store, train, backend, activations, layer, steps, sae_backend_name)
    sae.save(out)
    return stats


def read_data(source: str, config: ScanConfig, *, spool: bool = False):
    """The pairs of ``source`` (data.LoadResult); ``spool``: as a PairTable, its texts in a temporary file in
    the cache directory (a scan: flat memory, issue 16), else as a polars table (evaluate flips pairs in it)."""
    if spool:
        return spool_pairs(source, config.activations.cache_dir, config.read)
    return load_pairs(source, config.read)


TEXTS_BATCH = 4096  # pairs whose messages are turned into Python objects at a time to render their texts


def rendered_texts(pairs: PairTable | pl.DataFrame, backend, directory: Path | None = None) -> SpooledTexts:
    """``pair_texts`` a range of pairs at a time (the messages columns of every pair as Python lists of
    dicts at once peaked at ~9 KB a pair), into an unnamed temporary file in ``directory`` (SpooledTexts:
    held as strings for the whole scan they were ~1.4 KB a pair; issue 16)."""
    texts = SpooledTexts(directory)
    if isinstance(pairs, PairTable):
        for rows in pairs.slices(TEXTS_BATCH):
            texts.extend(pair_texts(rows, backend))
        return texts
    for start in range(0, len(pairs), TEXTS_BATCH):
        texts.extend(pair_texts(pairs.slice(start, TEXTS_BATCH), backend))
    return texts


def _activations_for(pairs: PairTable | pl.DataFrame, backend, config: ScanConfig, steps, label: str, *, lazy: bool = False):
    texts = rendered_texts(pairs, backend, config.activations.cache_dir)
    with steps(label, "pairs", scale=0.5) as update:
        store = extract_activations(texts, backend, config.activations, progress=update, lazy=lazy)
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
    from .profiles import scan_profile

    start = time.perf_counter()
    pairs = read_data(source, config, spool=True).pairs
    return scan_profile(pairs, config, source=str(source), steps=steps, warn=warn,
                        timings={"load": round(time.perf_counter() - start, 3)})


@contextmanager
def _one_step(steps, description: str):
    """A progress step for work that reports no progress of its own: shown while it runs."""
    with steps(description, "steps") as update:
        update(0, 1)
        yield
        update(1, 1)


def scan_pairs(pairs: PairTable | pl.DataFrame, config: ScanConfig, *, source: str, steps=no_progress, backend=None,
               timings: dict[str, float] | None = None, warn=None) -> ScanResult:
    """Scan pairs (a PairTable, or a table in data.load_pairs' layout, spooled to a PairTable first);
    ``backend`` reuses a loaded model."""
    pairs = PairTable.of(pairs, config.activations.cache_dir)
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
    labeller = labeller_for(config)  # a wrong labeller name or option fails before the long work
    if backend is None:
        with _one_step(steps, "Loading model"):
            backend = load_backend(config.activations)
    layer = resolve_layer(config.activations.layer, backend.n_layers)
    lap("model")
    # lazy: cached shards are checked when first read; a warm scan (every text's codes cached) reads none
    texts, store = _activations_for(pairs, backend, config, steps, "Activations", lazy=True)
    lap("activations")

    with _one_step(steps, "Quality checks"):
        # token counts kept beside the activations (the model's tokenizer): a warm scan does not tokenize again
        count_tokens = cached_counter(tokenizer_counter(backend.tokenizer), store.cache.directory / "token-counts")
        issues = find_quality_issues(pairs, max_length=config.activations.max_length, count_tokens=count_tokens)
    quality: dict[str, list[str]] = {}
    for issue in issues:
        quality.setdefault(issue.pair_id, []).append(issue.kind)
    lap("quality")
    sae, sae_dir = get_sae(store, config, backend, layer, steps)
    lap("sae")
    with steps("Encoding", "pairs", scale=0.5) as update:
        stats = encode_store(store, sae, progress=update, cache=CodeCache.for_store(store, sae))
    if config.salience_from:
        reference = read_data(config.salience_from, config, spool=True).pairs
        _, reference_store = _activations_for(reference, backend, config, steps, "Reference activations",
                                               lazy=True)
        with steps("Reference encoding", "pairs", scale=0.5) as update:
            reference_stats = encode_store(reference_store, sae, progress=update,
                                           cache=CodeCache.for_store(reference_store, sae))
        totals = reference_stats.totals()
    else:
        totals = stats.totals()
    with _one_step(steps, "Salience"):
        salience = feature_salience(*totals)
        features = select_features(salience, config.n_features, features_file=config.features_file)
    lap("salience")
    labelling = Labelling(labeller, stats, texts, pairs["pair_id"].to_list(), backend,
                          config.activations.max_length, salience, label_cache_file(config, sae_dir, labeller))
    if config.select == "safety":
        labels = labelling.label([f.latent for f in features.features])
        candidates = len(features.features)
        features = select_by_safety(features, {latent: label.relevance for latent, label in labels.items()},
                                    config.relevance_threshold, config.n_features)
        if not features.features:
            raise ScanError(f"--select safety: none of the {candidates} candidate features has a safety relevance "
                            f">= {config.relevance_threshold:g}; lower --relevance-threshold or use --select salience")
        lap("labels")

    # from here on (scores, then the report) every stage reads the codes a range of pairs at a time into blocks of
    # tens of MB (issue 16); not earlier: extraction and SAE training, whose blocks are as large, ran ~20% slower
    freed_blocks_to_the_system()
    with steps("Scores", "judges") as update:
        update(0, 1)
        signals, ranked, stack, costs = judge_pairs(pairs, stats, features, config, store, backend)
        update(1, 1)
    lap("scores")

    with _one_step(steps, "Report"):
        report = build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality,
                              backend, layer, sae, sae_dir, config, timings, labelling=labelling)
    lap("report")
    report.run.timings = dict(timings)
    return ScanResult(report, pairs, texts, store, sae, stats, features, signals, ranked, backend, timings,
                      labelling, flip_probability=stack.flip_probability, stack_weights=stack.weights,
                      judge_costs=costs)


def ranking_weights(config: ScanConfig) -> dict[str, float]:
    """Judge -> weight in the ranking: ``config.ranking`` by default, equal weights for ``--judge``."""
    if config.judges is None:
        return dict(config.ranking)
    return {name: 1.0 for name in config.judges}


def judge_pairs(pairs: PairTable, stats: CodeStats, features: FeatureSet, config: ScanConfig, store, backend):
    """The judges' signals (the built-in three always, for the report, plus those chosen), the
    suspicion, the stack and the cost of judges that spend."""
    from .judges import JudgeContext, run_judges

    fit = HeadFit.of(config)
    # the encoding pass pooled the activations (and cached them): no second pass over the store
    rewards = stats.scores if backend.has_reward_head else None
    pooled = None if backend.has_reward_head else stats.pooled_rows  # read a range of pairs at a time
    # the heads' fits are cached beside the activations, keyed by their input rows and options
    cache = getattr(store, "cache", None)
    head_cache = HeadCache(Path(cache.directory) / "heads") if cache is not None else None
    signals = compute_signals(stats, features, rewards=rewards, pooled=pooled, fit=fit, head_cache=head_cache)
    weights = ranking_weights(config)
    context = JudgeContext(pairs, stats, features, rewards=rewards, pooled=pooled, fit=fit,
                           cache_dir=config.activations.cache_dir / "judges",
                           computed={name: values.double() for name, values in signals.items()})
    extra, costs = run_judges([name for name in weights if weights[name] and name not in signals], context)
    signals = {**signals, **extra}
    ranked, stack = aggregate(signals, weights, method=config.aggregation, folds=config.folds, seed=config.seed,
                              head_cache=head_cache)
    return signals, ranked, stack, costs


def labeller_for(config: ScanConfig):
    """The scan's labeller (None for ``none``); --select safety needs one."""
    options = dict(config.labeller_options)
    labeller = make_labeller(config.labeller, options)
    if labeller is None and config.select == "safety":
        raise ConfigError("--select safety rates features with a labeller; --labeller none leaves nothing to rate")
    return labeller


def label_cache_file(config: ScanConfig, sae_dir: Path, labeller) -> Path | None:
    """Beside a cached SAE; for a user's SAE, under the cache directory by the SAE's hash."""
    if labeller is None:
        return None
    sae_hash = TopKSAE.file_hash(sae_dir)
    if config.sae_path is None:
        directory = Path(sae_dir) / "labels"
    else:
        directory = Path(config.activations.cache_dir) / "labels" / sae_hash
    return cache_path(directory, sae_hash, labeller)


@dataclass
class Labelling:
    """Labels latents on demand: cached ones are read, the others get cards and go to the labeller."""

    labeller: object
    stats: CodeStats
    texts: Sequence[PreparedText]  # SpooledTexts in a scan: read back from a temporary file by index
    pair_ids: list[str]
    backend: object
    max_length: int
    salience: torch.Tensor
    cache_file: Path | None
    labels: dict[int, FeatureLabel] = field(default_factory=dict)

    def label(self, latents: list[int]) -> dict[int, FeatureLabel]:
        if self.labeller is None or not latents:
            return {}
        wanted = [latent for latent in dict.fromkeys(latents) if latent not in self.labels]
        if wanted:
            def requests(missing: list[int]) -> list[LabelRequest]:
                features = FeatureSet([Feature(j, 1 if self.salience[j] >= 0 else -1, float(self.salience[j]))
                                       for j in missing], "labelling")
                data = feature_cards(self.stats, features)
                cards = _render_cards(data, self.texts, self.pair_ids, self.backend, self.max_length, len(data))
                return [label_request(card, d, self.backend) for card, d in zip(cards, data, strict=True)]

            self.labels.update(label_features(wanted, requests, self.labeller, self.cache_file))
        return {latent: self.labels[latent] for latent in latents if latent in self.labels}


def label_request(card: FeatureCard, data, backend) -> LabelRequest:
    """What a labeller sees of one rendered card: its contexts and its tokens by activation mass."""
    tokens = backend.token_strings([t for t, _ in data.token_mass])
    return LabelRequest(
        latent=card.latent, salience=card.salience,
        contexts=tuple(LabelContext(c.side, c.text_before, c.token, c.text_after, c.value, c.pair_id, c.sample)
                       for c in card.contexts),
        top_tokens=tuple((tok, mass) for tok, (_, mass) in zip(tokens, data.token_mass, strict=True)),
        token_rates=tuple(data.token_rates))


def ranking_name(config: ScanConfig) -> str:
    used = [f"{w:g}*{name}" if w != 1 else name for name, w in ranking_weights(config).items() if w]
    if config.aggregation == "stacked":
        return f"P(rejected is better) of a cross-fitted Bradley-Terry stack over ({', '.join(used)})"
    return f"mean percentile rank from the low end of ({', '.join(used)})"


def build_report(source, pairs, texts, stats, salience, features, signals, ranked, quality, backend, layer,
                 sae, sae_dir, config: ScanConfig, timings, *, labelling: Labelling | None = None) -> Report:
    """The Report of a scan: every pair as a Finding, every selected feature as a card.

    With a labeller, the cards that show contexts and then the features behind the suspects
    (most frequent first, ``labels_for_findings`` latents in all) get the labeller's label, its
    relevance, category and provenance; a features file's own label wins over the labeller's.
    """
    pair_ids = pairs["pair_id"].to_list()
    per_pair_quality = [quality.get(pid, []) for pid in pair_ids]
    categories = categorise(ranked, ranked_signals(signals, ranking_weights(config)), per_pair_quality,
                            flipped_fraction=config.flipped_fraction, noisy_fraction=config.noisy_fraction)
    order = torch.argsort(-ranked, stable=True)  # rank r + 1 is pair order[r]
    latents = features.latents.tolist()
    # a report is shared: it names files relative to the working directory, never by absolute path
    cache_dir = config.activations.cache_dir
    shown = {name: display_path(name, cache_dir) for name in set(pairs["source"].to_list())}
    tops = []  # per pair: its top features (latent, chosen, rejected), for the pairs that are not clean
    top_columns = []  # per range of pairs: the top features' indices, chosen and rejected terms, and which are > 0
    flagged_mass = torch.zeros(len(latents), dtype=torch.float64)  # per feature: summed |term| over flagged pairs
    flagged_in = dict.fromkeys(latents, 0)  # per feature: flagged pairs it is a top feature of
    # every pair's terms a range of pairs at a time (scoring.feature_contributions' values, bit for bit), each
    # range in a few tensor ops: one call per pair cost ~10 ms, most of a warm scan of HH
    for first, codes in stats.pair_batches(features.latents):
        terms = codes * features.signs
        chosen_all, rejected_all = terms[0::2], terms[1::2]
        net_all = (chosen_all - rejected_all).abs()
        # a copy of the first columns: the slice alone is a view that kept every range's whole argsort alive
        # (8 bytes x features per pair, ~4 KB a pair with 512 features: issue 16)
        top_all = torch.argsort(net_all, dim=1, descending=True, stable=True)[:, :config.top_features_per_pair]
        top_all = top_all.contiguous()
        top_columns.append((top_all, chosen_all.gather(1, top_all), rejected_all.gather(1, top_all),
                            net_all.gather(1, top_all) > 0))
        top_rows = zip(*(column.tolist() for column in top_columns[-1]), strict=True)
        for offset, (top, chosen_top, rejected_top, nonzero) in enumerate(top_rows):
            i = first + offset
            if categories[i] == Category.CLEAN:  # only the suspects' top features are needed before the report
                tops.append(())
                continue
            tops.append([(latents[j], c, r) for j, c, r, positive in zip(top, chosen_top, rejected_top, nonzero,
                                                                         strict=True) if positive])
            if categories[i] in FLAGGED:
                flagged_mass += net_all[offset].double()
                for latent, _c, _r in tops[-1]:
                    flagged_in[latent] += 1
    share = flagged_mass / flagged_mass.sum() if float(flagged_mass.sum()) > 0 else flagged_mass
    # cards by contribution to the flagged pairs (then |salience|, the selection's order): the ones worth reading first
    by_contribution = sorted(range(len(latents)), key=lambda n: -float(share[n]))
    ordered = FeatureSet([features.features[n] for n in by_contribution], features.source)
    card_latents = [latents[n] for n in by_contribution]
    auto = _labels_for(labelling, card_latents[:config.cards_with_contexts], tops, categories, config)
    labels = {f.latent: f.label for f in features.features}
    del tops
    findings = LazyFindings(len(pairs), _finding_maker(
        pairs, order, top_columns, latents,
        categories, ranked, signals, quality, shown,
        lambda latent: (labels.get(latent) or _text(auto.get(latent)), *_rating(auto.get(latent)))))
    cards = _render_cards(feature_cards(stats, ordered), texts, pair_ids, backend,
                          config.activations.max_length, config.cards_with_contexts)
    for card, n in zip(cards, by_contribution, strict=True):
        card.contribution = round(float(share[n]), 6)
        card.flagged_pairs = flagged_in[card.latent]
        label = auto.get(card.latent)
        if label is not None:
            card.label = card.label or label.label
            card.relevance, card.category = _rating(label)
            card.labelled_by = {"labeller": label.labeller, "model": label.model, "version": label.version,
                                "label": label.label}
    counts = {str(c): categories.count(c) for c in Category}
    run = RunInfo(
        tool_version=__version__, model=display_path(backend.identity, cache_dir), model_hash=backend.fingerprint,
        layer=layer,
        positions=config.activations.positions, max_length=config.activations.max_length,
        sae_path=display_path(sae_dir, cache_dir), sae_hash=TopKSAE.file_hash(sae_dir), sae_fvu=stats.fvu,
        n_features=len(features.features), ranking=ranking_name(config),
        thresholds={"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction},
        timings=dict(timings), pairs=len(pairs), counts=counts, data_source=display_path(source, cache_dir),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return Report(run, cards, findings)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 1 << 20  # bytes: blocks at least this large are mapped on their own and unmapped when freed


def freed_blocks_to_the_system() -> bool:
    """Have glibc map every block of LARGE_BLOCK bytes or more on its own (and unmap it when freed); process-wide.

    The report reads every pair's codes a range at a time (pair_batches, twice per feature_cards) into tensors of
    tens of MB. By default glibc raises its mmap threshold to the size of each such block freed (up to 32 MB), so
    the next ranges are carved from the heap, which fragments and is not given back: the driver's RSS rose with
    every range read, ~6 KB a pair in the report stage (issue 16, BENCHMARKS.md). Not from the scan's start: every
    forward pass's and SAE step's tensors are then mapped and faulted in afresh, and extraction and SAE training
    took ~20% longer (700 HH pairs, side by side). False where it does not apply (not glibc)."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
    except (OSError, AttributeError):
        return False


def _finding_maker(table: PairTable, order: torch.Tensor, top_columns: list[tuple], latents: list[int],
                   categories: list[str], ranked: torch.Tensor, signals: dict[str, torch.Tensor],
                   quality: dict[str, list[str]], shown: dict[str, str], describe):
    """``make(start, stop)`` for LazyFindings: the findings ranked start + 1 .. stop, from compact per-pair
    arrays (issue 16: no pair's Finding and texts are held until it is read). ``describe(latent)``: the
    latent's label, relevance and category."""
    top, chosen, rejected, positive = (torch.cat(parts) for parts in zip(*top_columns, strict=True))

    def make(start: int, stop: int) -> list[Finding]:
        index = order[start:stop]
        rows = table.take(index.tolist())
        # .tolist() gives each value as float(tensor[i]) does
        columns = zip(index.tolist(), ranked[index].tolist(), top[index].tolist(), chosen[index].tolist(),
                      rejected[index].tolist(), positive[index].tolist(),
                      *(signals[name][index].tolist() for name in SIGNALS), rows, strict=True)
        out = []
        for rank, (i, suspicion, top_i, chosen_i, rejected_i, positive_i, *values, row) in enumerate(columns,
                                                                                                     start + 1):
            contributions = []
            for j, c, r, keep in zip(top_i, chosen_i, rejected_i, positive_i, strict=True):
                if keep:
                    label, relevance, category = describe(latents[j])
                    contributions.append(FeatureContribution(latents[j], label, c, r, relevance, category))
            out.append(Finding(
                pair_id=row["pair_id"], source=shown[row["source"]], line=row["line"], rank=rank,
                category=categories[i], suspicion=suspicion, **dict(zip(SIGNALS, values, strict=True)),
                quality=list(quality.get(row["pair_id"], ())),
                chosen=row["chosen"], rejected=row["rejected"], context=row["context"], top_features=contributions))
        return out

    return make


def _labels_for(labelling: Labelling | None, card_latents: list[int], tops: list[list[tuple]],
                categories: list[str], config: ScanConfig) -> dict[int, FeatureLabel]:
    """Label the shown cards, then the latents behind the suspects, most frequent first."""
    if labelling is None or labelling.labeller is None:
        return {}
    frequency: dict[int, int] = {}
    for top, category in zip(tops, categories, strict=True):
        if category != "clean":
            for latent, _c, _r in top:
                frequency[latent] = frequency.get(latent, 0) + 1
    behind = sorted(frequency, key=lambda latent: (-frequency[latent], latent))
    wanted = list(dict.fromkeys(card_latents + behind))[:max(config.labels_for_findings, len(card_latents))]
    return labelling.label(wanted)


def _text(label: FeatureLabel | None) -> str | None:
    return None if label is None else label.label


def _rating(label: FeatureLabel | None) -> tuple[float | None, str | None]:
    return (None, None) if label is None else (label.relevance, label.category)


FLAGGED = (Category.FLIPPED, Category.NOISY)  # the pairs a card's contribution and flagged-pair count are over


def _render_cards(cards, texts: Sequence[PreparedText], pair_ids: list[str], backend, max_length: int,
                  with_contexts: int, n_contexts: int = 10) -> list[FeatureCard]:
    """Turn token ids and positions into strings and marked windows of text.

    Contexts are rendered for the first ``with_contexts`` cards (the report's are in order of
    contribution; those are "featured"): they hold ~130 tokens of text each, and a report with
    1024 features x 10 contexts would be megabytes of text nobody reads. A card shows at most
    one window per pair and no window twice: ``n_contexts`` of the strongest, then the
    lower-quantile samples.
    """
    tokenized: dict[int, tuple] = {}

    def tokenize(indices) -> None:
        needed = sorted(set(indices) - tokenized.keys())
        for special in (False, True):
            group = [i for i in needed if texts[i].has_special_tokens == special]
            if group:
                # the same left-truncated tokenization as extraction, so positions index it directly
                ids, offsets, specials = backend.tokenize([texts[i].text for i in group], max_length=max_length,
                                                          has_special_tokens=special)
                tokenized.update({i: (o, sp) for i, o, sp in zip(group, offsets, specials, strict=True)})

    # the texts shown unless a window repeats (the spare candidates are tokenized only when one does), in one call
    likely = []
    for card in cards[:with_contexts]:
        pairs_taken: set[int] = set()
        n_top = 0
        for ctx in card.contexts:
            if ctx.text_index // 2 not in pairs_taken and (ctx.sample != "top" or n_top < n_contexts):
                pairs_taken.add(ctx.text_index // 2)
                n_top += ctx.sample == "top"
                likely.append(ctx.text_index)
    tokenize(likely)
    out = []
    for n, card in enumerate(cards):
        contexts = []
        pairs_shown: set[int] = set()
        windows_shown: set[str] = set()
        for ctx in card.contexts if n < with_contexts else []:
            if ctx.text_index // 2 in pairs_shown or (ctx.sample == "top" and
                                                      sum(c.sample == "top" for c in contexts) >= n_contexts):
                continue
            text = texts[ctx.text_index].text
            if ctx.text_index not in tokenized:
                tokenize([ctx.text_index])
            offsets, special = tokenized[ctx.text_index]
            window = [i for i in range(max(ctx.position - CONTEXT_TOKENS, 0),
                                       min(ctx.position + CONTEXT_TOKENS + 1, len(offsets))) if not special[i]]
            s, e = offsets[ctx.position]
            lo, hi = offsets[window[0]][0], offsets[window[-1]][1]
            seen_text = " ".join(text[lo:hi].split())
            if seen_text in windows_shown:  # the same text in another pair (a template answer): shown once
                continue
            windows_shown.add(seen_text)
            pairs_shown.add(ctx.text_index // 2)
            contexts.append(FeatureContext(pair_ids[ctx.text_index // 2], ("chosen", "rejected")[ctx.text_index % 2],
                                           text[lo:s], text[s:e], text[e:hi], ctx.value, ctx.sample))
        tokens = backend.token_strings([t for t, _ in card.top_tokens])
        f = card.feature
        out.append(FeatureCard(latent=f.latent, label=f.label, salience=f.salience, chosen_total=card.chosen_total,
                               rejected_total=card.rejected_total, fire_rate=card.fire_rate,
                               sign="+" if f.sign > 0 else "-",
                               top_tokens=[(tok, c) for tok, (_, c) in zip(tokens, card.top_tokens, strict=True)],
                               contexts=contexts, chosen_fires=card.chosen_fires, rejected_fires=card.rejected_fires,
                               histogram=card.histogram, length_correlation=card.length_correlation,
                               length_driven=card.length_correlation is not None
                               and abs(card.length_correlation) >= LENGTH_DRIVEN,
                               featured=n < with_contexts))
    return out
