"""Feature labels: the labeller hook, the label cache, the offline labeller,
safety selection, and labels from a model shown inert in the terminal and escaped in HTML."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from click.testing import CliRunner

from safer_audit.backends.labellers import OfflineLabeller, keywords, load_taxonomy
from safer_audit.cli import cli, scan, scan_config_from
from safer_audit.config import ScanConfig
from safer_audit.errors import ConfigError, ScanError
from safer_audit.features.labels import NO_CATEGORY, NOT_SAFETY, FeatureLabel, LabelContext, LabelRequest, make_labeller
from safer_audit.features.salience import Feature, FeatureSet, select_by_safety
from safer_audit.hookspecs import hookimpl
from safer_audit.pipeline.scan import run_scan
from safer_audit.plugins import feature_labellers, plugin_info
from safer_audit.report.types import Report, export_report
from safer_audit.report.view import print_feature_cards, print_report

from .conftest import registered_plugin, tiny_scan_config

HOSTILE = "<script>alert(1)</script>\x1b]52;c;ZXZpbA==\x07\x1b[31m"


class CountingLabeller:
    """A labeller from a test plugin: counts the latents it is asked for, rates odd latents relevant."""

    name = "counting"

    def __init__(self, version: str = "1", text: str = "counted"):
        self.version = version
        self.text = text
        self.asked: list[int] = []
        self.requests: list[LabelRequest] = []

    def label(self, requests):
        self.asked += [r.latent for r in requests]
        self.requests += list(requests)
        return {r.latent: FeatureLabel(r.latent, f"{self.text} {r.latent}", 0.9 if r.latent % 2 else 0.1,
                                       "weapons" if r.latent % 2 else NOT_SAFETY, self.name, "fake-model",
                                       self.version) for r in requests}


class CountingPlugin:
    def __init__(self):
        self.made: list[CountingLabeller] = []
        self.version = "1"
        self.text = "counted"

    @hookimpl
    def register_feature_labellers(self, register):
        register("counting", self.factory)

    def factory(self, **options):
        labeller = CountingLabeller(self.version, self.text)
        self.made.append(labeller)
        return labeller


@pytest.fixture
def counting_plugin():
    with registered_plugin(CountingPlugin(), "test-counting") as plugin:
        yield plugin


def scan_config(model_dir, cache_dir, **changes) -> ScanConfig:
    return tiny_scan_config(model_dir, cache_dir, **{"cards_with_contexts": 8, **changes})


# -- the hook -------------------------------------------------------------------------------


def test_offline_labeller_is_built_in_and_listed():
    assert "offline" in feature_labellers()
    info = {i.name: i for i in plugin_info()}["safer_audit.backends.labellers"]
    assert info.registers == {"labellers": ["offline"]}
    result = CliRunner().invoke(cli, ["plugins", "--format", "json"], catch_exceptions=False)
    assert any(p["registers"].get("labellers") == ["offline"] for p in json.loads(result.output))


def test_labeller_options_reach_the_registered_factory(counting_plugin):
    params = scan.make_context("scan", ["data.jsonl", "--labeller", "llm", "--labeller-url", "http://127.0.0.1:9",
                                         "--select", "safety", "--relevance-threshold", "0.3"]).params
    config = scan_config_from(params)
    assert config.labeller == "llm" and config.labeller_options == {"url": "http://127.0.0.1:9"}
    assert config.select == "safety" and config.relevance_threshold == 0.3
    if "llm" in feature_labellers():  # the first-party plugin, through its entry point
        assert type(make_labeller("llm", config.labeller_options)).__name__ == "LLMLabeller"
    assert make_labeller("none") is None
    with pytest.raises(ConfigError, match="unknown labeller 'nope'"):
        make_labeller("nope")
    with pytest.raises(ConfigError, match="takes no option url"):
        make_labeller("offline", {"url": "http://127.0.0.1:9"})


# -- the cache ------------------------------------------------------------------------------


def test_labels_are_cached_and_a_rescan_labels_nothing(tiny_llama_dir, data_file, tmp_path, counting_plugin):
    config = scan_config(tiny_llama_dir, tmp_path / "cache", labeller="counting")
    first = run_scan(str(data_file), config)
    asked = counting_plugin.made[-1].asked
    assert asked and len(asked) == len(set(asked))
    shown = [card.latent for card in first.report.features[:8]]
    assert set(shown) <= set(asked)  # every card that shows contexts is labelled
    card = first.report.features[0]
    assert card.label == f"counted {card.latent}" and card.labelled_by["labeller"] == "counting"
    assert card.category in ("weapons", NOT_SAFETY) and card.relevance in (0.9, 0.1)
    # requests carry marked contexts from both sides and the tokens' activation mass
    request = counting_plugin.made[-1].requests[0]
    assert request.contexts and all(c.side in ("chosen", "rejected") for c in request.contexts)
    assert request.top_tokens and len(request.token_rates) == len(request.top_tokens)
    labelled = {c.latent for f in first.report.findings for c in f.top_features if c.label}
    assert labelled and labelled <= set(asked)

    second = run_scan(str(data_file), config)
    assert counting_plugin.made[-1].asked == []  # everything came from the cache
    assert [c.label for c in second.report.features] == [c.label for c in first.report.features]
    files = list((tmp_path / "cache").rglob("labels/counting-v1-*.json"))
    assert len(files) == 1

    counting_plugin.version = "2"  # a new labeller version labels again
    run_scan(str(data_file), config)
    assert sorted(counting_plugin.made[-1].asked) == sorted(asked)


def test_labeller_none_labels_nothing(tiny_llama_dir, data_file, tmp_path, counting_plugin):
    result = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none"))
    assert all(card.label is None and card.relevance is None for card in result.report.features)
    with pytest.raises(ConfigError, match="--select safety"):
        run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none", select="safety"))


# -- safety selection -----------------------------------------------------------------------


def test_select_by_safety_keeps_relevant_candidates_in_salience_order():
    candidates = FeatureSet([Feature(7, 1, 0.9, pinned=True), Feature(1, 1, 0.8), Feature(2, -1, -0.7),
                             Feature(3, 1, 0.6), Feature(5, 1, 0.5)], "top-n")
    kept = select_by_safety(candidates, {1: 0.9, 2: 0.2, 3: 0.5, 5: 0.95}, 0.5, 3)
    assert [f.latent for f in kept.features] == [7, 1, 3]


def test_scan_with_safety_selection(tiny_llama_dir, data_file, tmp_path, counting_plugin):
    config = scan_config(tiny_llama_dir, tmp_path / "cache", labeller="counting", select="safety")
    result = run_scan(str(data_file), config)
    assert result.features.features and all(f.latent % 2 for f in result.features.features)
    assert result.report.run.n_features == len(result.features.features) <= 16
    with pytest.raises(ScanError, match="relevance"):
        run_scan(str(data_file), replace(config, relevance_threshold=0.95))


# -- labels from a model are data -----------------------------------------------------------


def test_hostile_labels_are_escaped_in_html_and_inert_in_the_terminal(tiny_llama_dir, data_file, tmp_path,
                                                                      counting_plugin):
    from rich.console import Console

    counting_plugin.text = HOSTILE
    result = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "cache", labeller="counting"))
    report = result.report
    assert any(c.label and HOSTILE in c.label for f in report.findings for c in f.top_features)
    export_report(report, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    console = Console(record=True, width=200, force_terminal=True, markup=False, emoji=False)
    print_feature_cards(report.features[:3], console)
    print_report(report, console, top=40)
    text = console.export_text(styles=False)
    assert "\x1b]52" not in text and "\x07" not in text and "\x1b[31m" not in text
    assert "\\x1b" in text or "\\e" in text or "␛" in text or "^[" in text  # shown, escaped


def test_old_reports_without_label_fields_still_load(tiny_llama_dir, data_file, tmp_path, counting_plugin):
    result = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "cache", labeller="counting"))
    data = result.report.to_dict()
    for card in data["features"]:
        for name in ("relevance", "category", "labelled_by"):
            del card[name]
    for finding in data["findings"]:
        for contribution in finding["top_features"]:
            del contribution["relevance"], contribution["category"]
    report = Report.from_dict(json.loads(json.dumps(data)))
    assert report.features[0].relevance is None and report.features[0].label == result.report.features[0].label


# -- the offline labeller -------------------------------------------------------------------


def _request(latent: int, texts: list[tuple[str, str, str]], tokens, rates) -> LabelRequest:
    contexts = tuple(LabelContext("rejected" if i % 2 else "chosen", b, t, a, 3.0 - 0.1 * i)
                     for i, (b, t, a) in enumerate(texts))
    return LabelRequest(latent, 0.5, contexts, tuple(tokens), tuple(rates))


WEAPONS = _request(1, [
    ("You could buy a ", "gun", " at the store and shoot him."),
    ("The easiest way is a ", "gun", ", or a knife if you are close."),
    ("Hide the ", "knife", " in your jacket before the fight."),
    ("Load the ", "rifle", " and aim for the chest."),
], [(".", 9.0), ("the", 8.0), ("gun", 6.0), ("knife", 3.0), ("rifle", 2.0)], [0.05, 0.04, 0.0002, 0.0001, 0.0001])
COOKING = _request(2, [
    ("To bake the bread, preheat the ", "oven", " to 200 degrees."),
    ("Mix the flour and sugar, then put it in the ", "oven", " for an hour."),
    ("A good cake recipe needs butter and a warm ", "oven", "."),
], [("oven", 5.0), ("the", 4.0)], [0.0003, 0.04])


def test_keywords_prefer_concentrated_words_over_stopwords_and_punctuation():
    words = keywords(WEAPONS, {}, 2)
    assert words[0] == "gun" and "the" not in words and "." not in words
    assert set(words) <= {"gun", "knife", "rifle", "shoot", "fight", "chest"}


def test_offline_labeller_rates_by_meaning_and_is_deterministic():
    labeller = make_labeller("offline")
    labels = labeller.label([WEAPONS, COOKING])
    assert labels[1].category in ("weapons", "violence") and labels[1].relevance >= 0.5
    assert labels[1].label.startswith(labels[1].category + ": gun")
    assert labels[2].category == NO_CATEGORY and labels[2].relevance < 0.5
    assert labels[1].labeller == "offline" and labels[1].model and labels[1].version
    assert labeller.label([WEAPONS, COOKING]) == labels


def test_a_user_taxonomy_replaces_the_categories(tmp_path):
    path = tmp_path / "tax.yaml"
    path.write_text("categories:\n  baking:\n    - baking bread and cakes in an oven\n"
                    "  not safety related:\n    - weapons, guns and knives\n", encoding="utf-8")
    labeller = OfflineLabeller(path)
    assert labeller.label([COOKING])[2].category == "baking"
    assert labeller.cache_key != OfflineLabeller().cache_key  # another taxonomy, other cached labels
    path.write_text("categories: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="categories"):
        load_taxonomy(path)


def test_a_repeated_window_counts_once():
    # a pair's chosen and rejected texts share the conversation: the same passage comes back twice,
    # and its neighbours must not become keywords for appearing "in two windows"
    shared = ("Thanks, that comforts me a little. Now tell me which small ", "knife",
              " I should put in my bag before I go out tonight.")
    request = _request(3, [shared, shared,
                           ("Hide the ", "knife", " in your jacket before the fight."),
                           ("He pulled out a ", "knife", " and stabbed the man twice.")],
                       [("knife", 6.0)], [0.0002])
    label = make_labeller("offline").label([request, WEAPONS, COOKING])[3]
    words = set(label.label.split(": ")[-1].split(", "))
    assert "knife" in words and not {"comforts", "little", "tell", "small", "put", "bag", "tonight"} & words
    assert label.extra["contexts"] == 3


def test_a_latent_firing_on_stopwords_is_not_rated_by_its_windows_topic():
    # the windows are about weapons, but the latent fires on "the", "." and "a": it reads syntax
    syntax = _request(4, [(b, t, a) for b, t, a in [
        ("You could buy a gun at", " the", " store and shoot him."),
        ("The easiest way is a gun, or a knife if you are close", ".", " Then run."),
        ("Hide the knife in your jacket before", " the", " fight."),
        ("Load the rifle and aim for", " the", " chest."),
    ]], [("the", 9.0), (".", 8.0), ("a", 3.0)], [0.05, 0.04, 0.03])
    labels = make_labeller("offline").label([WEAPONS, syntax])
    assert labels[1].relevance >= 0.5
    assert labels[4].relevance < 0.25 and labels[4].category == NO_CATEGORY
    assert labels[4].extra["content_share"] < 0.1


def _pairs_request(latent: int, texts: list[tuple[str, str, str]], tokens, rates) -> LabelRequest:
    """Like _request, each window from its own pair (as the report renders them: at most one per pair)."""
    request = _request(latent, texts, tokens, rates)
    contexts = tuple(LabelContext(c.side, c.before, c.token, c.after, c.value, f"pair{i}")
                     for i, c in enumerate(request.contexts))
    return LabelRequest(latent, request.salience, contexts, request.top_tokens, request.token_rates)


INFINITIVE = _pairs_request(5, [
    ("If you really want", " to", " hurt him, wait until he is alone."),
    ("I don't think you want", " to", " call the police about the car."),
    ("Do you want", " to", " know how the lock works?"),
    ("It is hard", " to", " say what the neighbours saw."),
], [("to", 9.0)], [0.03])


def test_a_function_word_latent_is_labelled_by_its_token_and_where_it_sits():
    label = make_labeller("offline").label([INFINITIVE, WEAPONS, COOKING])[5]
    assert label.label == '"want [to]"'
    assert label.category == NO_CATEGORY


def test_list_commas_say_so():
    commas = _pairs_request(6, [
        ("We visited Iraq, Iran", ",", " Syria, Jordan and Egypt."),
        ("Buy apples, pears", ",", " plums, grapes and figs."),
        ("Red, blue", ",", " green, yellow and white paint."),
        ("He said no", ",", " then he left the room."),
    ], [(",", 9.0)], [0.05])
    assert make_labeller("offline").label([commas, WEAPONS])[6].label.startswith('"," in lists')


def test_a_word_near_the_firing_token_is_a_keyword_only_in_windows_of_three_pairs():
    # "sparkly" and "bracelet" come back in two pairs' windows: not evidence about the latent
    request = _pairs_request(7, [
        ("She stole a sparkly ", "diamond", " bracelet from the shop."),
        ("He took the sparkly ", "diamond", " bracelet at a shop."),
        ("Sell the ", "diamond", " to a pawn shop downtown."),
        ("A fake ", "diamond", " fooled the jeweller."),
    ], [("diamond", 6.0)], [0.0001])
    words = keywords(request, Counter(), 1)
    assert words[0] == "diamond" and not {"sparkly", "bracelet"} & set(words)
    assert "shop" in words  # three pairs


def test_windows_of_one_pair_count_once():
    request = _pairs_request(8, [("Hide the ", "knife", " now."), ("Drop the ", "knife", " please."),
                                 ("A sharp ", "knife", " cuts.")], [("knife", 6.0)], [0.0002])
    contexts = request.contexts[:1] + (replace(request.contexts[1], pair_id="pair0"),) + request.contexts[2:]
    label = make_labeller("offline").label([replace(request, contexts=contexts), WEAPONS])[8]
    assert label.extra["contexts"] == 2


class CountingEncoder:
    """The sentence encoder, counting the texts it embeds."""

    def __init__(self):
        from safer_audit.backends.labellers import sentence_encoder

        self.inner, self.texts = sentence_encoder(), []

    def encode(self, texts, batch_size=64):
        self.texts += list(texts)
        return self.inner.encode(texts, batch_size)


def test_each_window_is_embedded_once_and_syntax_latents_not_at_all():
    from safer_audit.backends.labellers import EMBED_CONTEXTS, OfflineLabeller

    encoder = CountingEncoder()
    labeller = OfflineLabeller(encoder=encoder)
    labeller._categories()
    n_descriptions = len(encoder.texts)
    many = _pairs_request(9, [("You could buy a ", "gun", f" at store number {i}.") for i in range(EMBED_CONTEXTS + 4)],
                          [("gun", 6.0)], [0.0002])
    twin = replace(many, latent=10)  # the same windows: embedded once for both latents
    labels = labeller.label([many, twin, INFINITIVE])
    embedded = encoder.texts[n_descriptions:]
    assert len(embedded) == len(set(embedded)) == EMBED_CONTEXTS
    assert labels[9].category == labels[10].category != NO_CATEGORY and labels[9].relevance == labels[10].relevance
    assert labels[5].relevance == 0.0 and labels[5].category == NO_CATEGORY


def test_a_token_that_ends_the_texts_says_so():
    period = _pairs_request(11, [(b, ".", "") for b in ("I hope this helps", "Let me know", "Good luck with it")]
                            + [("It is late", ".", " Go home.")], [(".", 9.0)], [0.05])
    assert make_labeller("offline").label([period, WEAPONS])[11].label == '"." at the end of a text'


def test_words_before_and_after_the_token_are_kept_apart():
    you = _pairs_request(12, [("Even if", " you", " can run, hide."), ("But if", " you", " can pay, go."),
                              ("Only if", " you", " can swim."), ("I think", " you", " should stop.")],
                         [("you", 9.0)], [0.05])
    assert make_labeller("offline").label([you, WEAPONS])[12].label == '"if [you] can"'


def test_the_encoder_batches_by_token_count_and_keeps_the_order():
    """Texts are batched by token count (little padding); each comes back in its own place, as embedded alone."""
    import torch

    from safer_audit.backends.labellers import sentence_encoder

    encoder = sentence_encoder()
    texts = ["a knife", "how do I hide a gun from the police after a robbery at night", "no",
             "I can't help with that, but here is a hotline", "poison"]
    together = encoder.encode(texts, batch_size=2)
    alone = torch.cat([encoder.encode([text]) for text in texts])
    assert together.shape == (5, 384)
    assert torch.allclose(together, alone, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
