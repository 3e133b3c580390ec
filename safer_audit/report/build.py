"""Building a scan's Report: every pair as a Finding, every selected feature as a card."""

from __future__ import annotations

from datetime import datetime, timezone

import torch

from ..common.domain import SIGNALS, Category
from ..config import ScanConfig
from ..data import PairTable
from ..features.cards import feature_cards, render_cards
from ..features.labels import (
    FeatureLabel,
    Labelling,
)
from ..features.salience import FeatureSet
from ..sae import TopKSAE
from ..scoring.categories import categorise_scan, category_counts
from ..scoring.ranks import ranked_signals
from ..scoring.stack import ranking_description, ranking_weights
from ..version import __version__
from .types import (
    FeatureContribution,
    Finding,
    LazyFindings,
    Report,
    RunInfo,
    display_path,
)


def ranking_name(config: ScanConfig) -> str:
    return ranking_description(ranking_weights(config), config.aggregation)


def build_report(source: str, pairs: PairTable, model, activations, encoded, selection, scores,
                 quality: dict[str, list[str]], config: ScanConfig, timings: dict[str, float]) -> Report:
    """The Report of a scan: every pair as a Finding, every selected feature as a card, from the outputs of
    the scan's stages (pipeline.stages: Model, Activations, Codes, Selection, Scores) and its quality findings.

    With a labeller, the cards that show contexts and then the features behind the suspects
    (most frequent first, ``labels_for_findings`` latents in all) get the labeller's label, its
    relevance, category and provenance; a features file's own label wins over the labeller's.
    """
    backend, layer, texts = model.backend, model.layer, activations.texts
    stats, sae_dir = encoded.stats, encoded.sae_dir
    features, labelling = selection.features, selection.labelling
    signals, ranked = scores.signals, scores.suspicion
    pair_ids = pairs["pair_id"].to_list()
    per_pair_quality = [quality.get(pid, []) for pid in pair_ids]
    categories, flipped_rule = categorise_scan(
        ranked, signals, ranked_signals(signals, ranking_weights(config)), per_pair_quality,
        flipped_rule=config.flipped_rule, flipped_fraction=config.flipped_fraction, noisy_fraction=config.noisy_fraction)
    order = torch.argsort(-ranked, stable=True)  # rank r + 1 is pair order[r]
    latents = features.latents.tolist()
    # a report is shared: it names files relative to the working directory, never by absolute path
    cache_dir = config.activations.cache_dir
    shown = {name: display_path(name, cache_dir) for name in set(pairs["source"].to_list())}
    tops = []  # per pair: its top features (latent, chosen, rejected), for the pairs that are not clean
    top_columns = []  # per range of pairs: the top features' indices, chosen and rejected terms, and which are > 0
    flagged_mass = torch.zeros(len(latents), dtype=torch.float64)  # per feature: summed |term| over flagged pairs
    flagged_in = dict.fromkeys(latents, 0)  # per feature: flagged pairs it is a top feature of
    # every pair's terms a range of pairs at a time (scoring.heads.feature_contributions' values, bit for bit), each
    # range in a few tensor ops: one call per pair cost ~10 ms, most of a warm scan of HH
    for first, codes in stats.pair_batches(features.latents):
        terms = codes * features.signs
        chosen_all, rejected_all = terms[0::2], terms[1::2]
        net_all = (chosen_all - rejected_all).abs()
        # a copy of the first columns: the slice alone is a view that kept every range's whole argsort alive
        # (8 bytes x features per pair, ~4 KB a pair with 512 features)
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
    cards = render_cards(feature_cards(stats, ordered), texts, pair_ids, backend,
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
    counts = category_counts(categories)
    run = RunInfo(
        tool_version=__version__, model=display_path(backend.identity, cache_dir), model_hash=backend.fingerprint,
        layer=layer,
        positions=config.activations.positions, max_length=config.activations.max_length,
        sae_path=display_path(sae_dir, cache_dir), sae_hash=TopKSAE.file_hash(sae_dir), sae_fvu=stats.fvu,
        n_features=len(features.features), ranking=ranking_name(config),
        thresholds={"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction},
        timings=dict(timings), pairs=len(pairs), counts=counts, data_source=display_path(source, cache_dir),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), flipped_rule=flipped_rule)
    return Report(run, cards, findings)


def _finding_maker(table: PairTable, order: torch.Tensor, top_columns: list[tuple], latents: list[int],
                   categories: list[str], ranked: torch.Tensor, signals: dict[str, torch.Tensor],
                   quality: dict[str, list[str]], shown: dict[str, str], describe):
    """``make(start, stop)`` for LazyFindings: the findings ranked start + 1 .. stop, from compact per-pair
    arrays (no pair's Finding and texts are held until it is read). ``describe(latent)``: the
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
