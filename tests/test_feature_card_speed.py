"""Feature cards without per-element tensor indexing: the same numbers, computed once."""

from __future__ import annotations

import torch

from safer_audit.features import cards
from safer_audit.features.cards import feature_cards
from safer_audit.features.salience import feature_salience, select_features
from safer_audit.sae import stats as code_stats
from safer_audit.sae.stats import CodeStats


def random_stats(n_texts=40, n_latents=24, seed=0) -> CodeStats:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.rand(n_texts, n_latents, generator=generator)
    codes[torch.rand(n_texts, n_latents, generator=generator) < 0.6] = 0
    codes[:, 3] = 0  # a latent that never fires
    codes[5, 7] = codes[:, 7].max() + 1  # a bin's top edge
    top_values = torch.sort(torch.rand(code_stats.TOP_ACTIVATIONS, n_latents, generator=generator), dim=0,
                            descending=True).values
    top_values[30:, :5] = -1  # fewer than TOP_ACTIVATIONS firings
    shape = (code_stats.TOP_ACTIVATIONS, n_latents)
    return CodeStats(codes, torch.randint(0, 30, (n_texts,), generator=generator),
                     torch.randint(0, 100, (n_latents,), generator=generator), top_values,
                     torch.randint(0, n_texts, shape, generator=generator), torch.randint(0, 30, shape, generator=generator),
                     torch.randint(0, 50, shape, generator=generator), 0.1,
                     torch.randint(0, 9, (40,), generator=generator))


def test_bin_counts_are_what_histc_counts():
    generator = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 37.0):
        values = torch.rand(200, 6, generator=generator) * scale
        values[torch.rand(200, 6, generator=generator) < 0.3] = 0
        top = values.max(0).values
        # values on and next to every bin edge, where a different rounding would move a count
        edges = torch.stack([torch.linspace(0, float(t), cards.HISTOGRAM_BINS + 1) for t in top], dim=1)[1:]
        values = torch.cat([values, edges, torch.nextafter(edges, torch.zeros_like(edges))])
        values[:, 5] = 0  # a column that never fires
        top = values.max(0).values
        counts = cards.bin_counts(values, top)
        for n in range(values.shape[1]):
            column = values[:, n]
            expected = (torch.histc(column[column > 0], bins=cards.HISTOGRAM_BINS, min=0, max=float(top[n])).long()
                        if top[n] > 0 else torch.zeros(cards.HISTOGRAM_BINS, dtype=torch.long))
            assert counts[n].tolist() == expected.tolist(), (scale, n)


def test_cards_read_the_totals_once_and_agree_over_one_and_several_ranges(monkeypatch):
    stats = random_stats()
    features = select_features(feature_salience(*stats.totals()), 12)
    passes = []
    original = CodeStats.pair_batches

    def counted(self, columns=None, rows=None):
        passes.append(columns is None)
        return original(self, columns, rows)

    monkeypatch.setattr(CodeStats, "pair_batches", counted)
    one_range = [c.to_dict() for c in feature_cards(stats, features)]
    assert passes == [False]  # the selected columns only: the totals salience summed are not summed again
    monkeypatch.setattr(code_stats, "STREAM_PAIRS", 3)  # several ranges: the streamed summaries
    several = [c.to_dict() for c in feature_cards(random_stats(), features)]
    for a, b in zip(one_range, several, strict=True):
        assert a["histogram"] == b["histogram"] and a["contexts"] == b["contexts"]
        assert a["top_tokens"] == b["top_tokens"] and a["token_mass"] == b["token_mass"]
        assert a["chosen_fires"] == b["chosen_fires"]
