"""Feature cards worth reading: per-side firing, a histogram, length correlation,
contribution to the flagged pairs, one example per pair (no duplicates) plus weaker ones, the HTML's
top --cards, and a features file sorted by contribution with labels."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from safer_audit.backends.exporters import render_html
from safer_audit.cli import cli
from safer_audit.common.domain import Category
from safer_audit.config import ScanConfig
from safer_audit.features.cards import feature_cards
from safer_audit.features.labels import NOT_SAFETY, FeatureLabel
from safer_audit.features.salience import select_features
from safer_audit.hookspecs import hookimpl
from safer_audit.pipeline.scan import run_scan
from safer_audit.report.types import Report
from safer_audit.sae.stats import TOP_ACTIVATIONS, CodeStats

from .conftest import registered_plugin, tiny_scan_config

HOSTILE = "<script>alert(1)</script>"
NEW_CARD_FIELDS = ("chosen_fires", "rejected_fires", "histogram", "length_correlation", "length_driven",
                   "contribution", "flagged_pairs", "featured")


class HostileLabeller:
    """Labels every latent with markup, so the page must escape it."""

    name = "hostile"
    version = "1"

    def label(self, requests):
        return {r.latent: FeatureLabel(r.latent, f"{HOSTILE} {r.latent}", 0.7, NOT_SAFETY, self.name, None, "1")
                for r in requests}


class HostilePlugin:
    @hookimpl
    def register_feature_labellers(self, register):
        register("hostile", lambda **options: HostileLabeller())


@pytest.fixture
def hostile_plugin():
    with registered_plugin(HostilePlugin(), "test-hostile") as plugin:
        yield plugin


def scan_config(model_dir, cache_dir, **changes) -> ScanConfig:
    return tiny_scan_config(model_dir, cache_dir,
                            **{"cards_with_contexts": 5, "labeller": "none", "noisy_fraction": 0.2, **changes})


# -- card statistics from CodeStats ----------------------------------------------------------


def test_card_statistics_come_from_the_per_text_codes():
    # 6 pairs (12 texts), 2 latents: latent 0 follows the text length exactly, latent 1 fires on chosen only
    lengths = torch.tensor([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    codes = torch.zeros(12, 2)
    codes[:, 0] = lengths * 0.1
    codes[0::2, 1] = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0, 2.0])
    top = torch.full((TOP_ACTIVATIONS, 2), -1.0)
    texts = torch.full((TOP_ACTIVATIONS, 2), -1, dtype=torch.long)
    # latent 1's strongest: three in pair 0 (texts 0 and 1), then one in each of pairs 1..5
    strongest = [(9.0, 0), (8.0, 0), (7.0, 1), (6.0, 2), (5.0, 4), (4.0, 6), (3.0, 8), (2.0, 10)]
    for r, (value, text) in enumerate(strongest):
        top[r, 1], texts[r, 1] = value, text
    stats = CodeStats(codes, lengths, torch.tensor([12, 5]), top, texts,
                      torch.arange(TOP_ACTIVATIONS).unsqueeze(1).expand(-1, 2).clone(),
                      torch.zeros(TOP_ACTIVATIONS, 2, dtype=torch.long))
    features = select_features(torch.tensor([0.1, 0.9]), 2)
    length_card, chosen_card = sorted(feature_cards(stats, features, n_contexts=3), key=lambda c: c.feature.latent)

    assert length_card.length_correlation == pytest.approx(1.0)
    assert (length_card.chosen_fires, length_card.rejected_fires) == (1.0, 1.0)
    assert chosen_card.chosen_fires == pytest.approx(5 / 6) and chosen_card.rejected_fires == 0.0
    hist = chosen_card.histogram
    assert len(hist["edges"]) == 13 and hist["edges"][-1] == pytest.approx(3.0)
    assert sum(hist["chosen"]) == 5 and sum(hist["rejected"]) == 0  # texts where it fires, per side
    assert hist["chosen"][-1] == 1  # the one text at the largest mean code, 3.0

    # one example per pair: pair 0's three strongest give one; then weaker ones from lower quantiles
    tops = [c for c in chosen_card.contexts if c.sample == "top"]
    assert [c.value for c in tops[:3]] == [9.0, 6.0, 5.0]
    lower = [c for c in chosen_card.contexts if c.sample != "top"]
    assert [c.sample for c in lower] == ["p50", "p25"]
    shown_pairs = [c.text_index // 2 for c in tops[:3] + lower]
    assert len(shown_pairs) == len(set(shown_pairs))
    assert all(c.value < 5.0 for c in lower)


# -- a scan's cards -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scanned(tiny_llama_dir, data_file, tmp_path_factory):
    return run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path_factory.mktemp("cache")))


def test_report_cards_carry_the_new_fields_sorted_by_contribution(scanned):
    report = scanned.report
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["features"]) == 16  # the JSON keeps every selected feature
    for card in data["features"]:
        for name in NEW_CARD_FIELDS:
            assert name in card
    contributions = [c.contribution for c in report.features]
    assert contributions == sorted(contributions, reverse=True)
    assert sum(contributions) == pytest.approx(1.0, abs=1e-4)
    assert [c.featured for c in report.features] == [True] * 5 + [False] * 11
    # flagged_pairs counts the flagged pairs whose top features include the latent
    flagged = [f for f in report.findings if f.category in (Category.FLIPPED, Category.NOISY)]
    assert flagged
    for card in report.features:
        assert card.flagged_pairs == sum(any(c.latent == card.latent for c in f.top_features) for f in flagged)
        assert card.length_driven == (card.length_correlation is not None and abs(card.length_correlation) >= 0.5)
    # at most one example per pair, and no window of text twice
    for card in report.features:
        pairs = [c.pair_id for c in card.contexts]
        assert len(pairs) == len(set(pairs))
        windows = [" ".join((c.text_before + c.token + c.text_after).split()) for c in card.contexts]
        assert len(windows) == len(set(windows))
    assert any(c.sample != "top" for card in report.features for c in card.contexts)


def test_html_cards_show_the_top_cards_with_an_escaped_histogram(tiny_llama_dir, data_file, tmp_path, hostile_plugin):
    result = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "cache", labeller="hostile",
                                                   cards_with_contexts=3))
    page = render_html(result.report)
    section = page[page.index('<details id="features">'):page.index("</details>", page.index('<details id="features">'))]
    assert section.count('<article class="card">') == 3
    svgs = re.findall(r"<svg\b.*?</svg>", section, flags=re.S)
    assert len(svgs) == sum(1 for c in result.report.features[:3] if any(c.histogram["chosen"] + c.histogram["rejected"]))
    assert svgs and all("<script" not in svg.lower() and "href" not in svg for svg in svgs)
    assert "<script" not in section.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert "labeller" in section and "length" in section


def test_old_reports_without_the_card_fields_still_load(scanned):
    data = json.loads(json.dumps(scanned.report.to_dict()))
    for card in data["features"]:
        for name in NEW_CARD_FIELDS:
            del card[name]
        for context in card["contexts"]:
            del context["sample"]
    report = Report.from_dict(data)
    assert report.features[0].histogram is None and report.features[0].featured
    page = render_html(report)  # an old report: every card shown, no histogram
    assert page.count('<article class="card">') == len(report.features) and "<svg" not in page


# -- the command line -------------------------------------------------------------------------


CLI_ARGS = ["--layer", "1", "--max-length", "64", "--latents", "64", "--k", "4", "--n-features", "16", "--quiet"]


def test_scan_cards_option_and_features_file_sorted_by_contribution(tiny_llama_dir, data_file, tmp_path,
                                                                     hostile_plugin):
    runner = CliRunner()
    common = [str(data_file), "--model", str(tiny_llama_dir), "--cache-dir", str(tmp_path / "cache"), *CLI_ARGS,
              "--labeller", "hostile"]
    html, report_json = tmp_path / "r.html", tmp_path / "r.json"
    result = runner.invoke(cli, ["scan", *common, "--cards", "4", "-o", str(html), "-o", str(report_json)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert html.read_text(encoding="utf-8").count('<article class="card">') == 4
    cards = json.loads(report_json.read_text(encoding="utf-8"))["features"]
    assert len(cards) == 16 and sum(c["featured"] for c in cards) == 4

    out = tmp_path / "features.yaml"
    result = runner.invoke(cli, ["features", *common, "--top", "3", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "unlabelled" not in result.output and "flagged pair" in result.output
    entries = yaml.safe_load(out.read_text(encoding="utf-8"))["features"]
    assert len(entries) == 16
    contributions = [e["contribution"] for e in entries]
    assert contributions == sorted(contributions, reverse=True)
    assert [e["latent"] for e in entries] == [c["latent"] for c in cards]  # the report's order
    assert all(e["label"] == f"{HOSTILE} {e['latent']}" and e["labelled_by"] == "hostile" for e in entries[:3])
