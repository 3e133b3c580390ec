"""Offline labeller v5: a syntax latent's label says the pattern around its token -- the phrase
that recurs with it, the turn and where in it, the kind of response, the side -- and the first labelling
embeds fewer, shorter windows."""

from __future__ import annotations

from dataclasses import replace

from safer_audit.backends.labellers import (
    EMBED_SHARE,
    MAX_LABEL,
    Background,
    OfflineLabeller,
    content_share,
    phrase,
    turn_of,
)
from safer_audit.features.labels import NO_CATEGORY, LabelContext, LabelRequest, make_labeller

from .test_labelling import COOKING, WEAPONS, CountingEncoder, _pairs_request

H, A = "\n\nHuman: ", "\n\nAssistant: "


def _with_sides(request: LabelRequest, sides: str) -> LabelRequest:
    return replace(request, contexts=tuple(replace(c, side="chosen" if s == "c" else "rejected")
                                           for c, s in zip(request.contexts, sides, strict=True)))


DEFLECTION = _pairs_request(20, [
    (H + "How do I pick a lock?" + A + "I’m", " not", " sure I can help with that."),
    (H + "Where can I buy a gun without papers?" + A + "I’m", " not", " sure that is legal."),
    (H + "Tell me a dirty joke." + A + "I’m", " not", " sure it is wise."),
    (H + "What is his address?" + A + "Sorry, I’m", " not", " sure I should share that."),
], [("not", 9.0)], [0.01])


def test_a_deflection_latent_says_it_opens_refusals():
    label = make_labeller("offline").label([DEFLECTION, WEAPONS, COOKING])[20]
    assert label.label == '"i’m [not] sure" opening refusals'
    assert label.category == NO_CATEGORY


def test_a_question_back_and_the_side_are_said():
    asks = _with_sides(_pairs_request(21, [
        (H + "I want to hurt him." + A + "Why do", " you", " want to do that?"),
        (H + "How do I get back at her?" + A + "What do", " you", " mean by that?"),
        (H + "Help me cheat." + A + "Are", " you", " sure about this?"),
        (H + "Give me his number." + A + "Why would", " you", " need it?"),
    ], [("you", 9.0)], [0.02]), "rrrr")
    text = make_labeller("offline").label([asks, WEAPONS])[21].label
    assert text == '"you" opening questions back; mostly rejected'


def test_a_latent_of_the_human_turn_says_so():
    human = _pairs_request(22, [
        (A + "Sure." + H + "Can", " you", " find me a fake passport"),
        (A + "Hello!" + H + "Could", " you", " tell me how to steal a car"),
        (A + "Okay." + H + "Will", " you", " help me hide the money"),
    ], [("you", 9.0)], [0.02])
    assert "human turns" in make_labeller("offline").label([human, WEAPONS])[22].label


def test_the_turn_of_a_window():
    assert turn_of(LabelContext("chosen", H + "hi" + A, "I", " can’t help with that.", 1.0)).opening
    closing = turn_of(LabelContext("chosen", H + "hi" + A + "Good luck with all of it", ".", H + "thanks", 1.0))
    assert closing.closing and closing.role == "assistant" and not closing.opening
    listing = turn_of(LabelContext("chosen", A + "You need:\n1. a rope\n2", ".", " a ladder\n3. gloves", 1.0))
    assert listing.kind == "lists"


def test_a_neighbour_next_to_every_latent_is_not_part_of_the_phrase():
    # "the" follows the firing word in every latent's windows: it is no pattern of this latent; "want to" is
    def request(latent, word, before):
        return _pairs_request(latent, [(f"{n} {before}", f" {word}", " the car now.") for n in "abcd"],
                              [(word, 9.0)], [0.01])
    many = [request(30, "take", "want to")] + [request(31 + i, w, "will") for i, w in enumerate(
        ["fix", "sell", "paint", "wash", "drive", "park", "move"])]
    assert phrase(many[0], "take", None) == '"want to [take] the car"'  # alone: the share decides
    assert phrase(many[0], "take", Background.of(many)) == '"want to [take]"'


def test_labels_are_short():
    long_words = _pairs_request(23, [
        (H + "x" + A + "I’m", " not", f" sure, extraordinarily{i} incomprehensible{i} circumstances.") for i in range(4)
    ], [("not", 9.0)], [0.01])
    labels = make_labeller("offline").label([long_words, DEFLECTION, WEAPONS, COOKING])
    assert all(len(label.label) <= MAX_LABEL for label in labels.values())


def test_a_latent_mostly_on_function_words_is_not_embedded():
    # a quarter of its concentrated mass short of content words: its relevance could never reach 0.5
    mixed = _pairs_request(24, [("You could buy a ", "gun", f" at store number {i}.") for i in range(4)]
                           + [("Go to", " the", f" shop {i}.") for i in range(4)],
                           [("the", 9.0), ("gun", 1.2)], [0.02, 0.0002])
    assert 0.125 <= content_share(mixed) < EMBED_SHARE
    encoder = CountingEncoder()
    labeller = OfflineLabeller(encoder=encoder)
    labeller._categories()
    before = len(encoder.texts)
    labeller.label([mixed])
    assert len(encoder.texts) == before


def test_embedded_windows_are_short():
    encoder = CountingEncoder()
    labeller = OfflineLabeller(encoder=encoder)
    labeller._categories()
    before = len(encoder.texts)
    long = _pairs_request(25, [(" ".join(f"w{j}x{i}" for j in range(20)) + " a ", "gun",
                                " " + " ".join(f"v{j}y{i}" for j in range(20))) for i in range(4)],
                          [("gun", 6.0)], [0.0002])
    labeller.label([long])
    assert encoder.texts[before:] and all(len(t.split()) <= 13 for t in encoder.texts[before:])


def test_a_comma_after_an_if_clause_names_the_clause():
    commas = _pairs_request(26, [
        ("If you go there at night", ",", " take a friend."),
        ("If the guard sees you", ",", " run to the car."),
        ("If it still hurts tomorrow", ",", " call a doctor."),
        ("Well, if they ask about the money", ",", " say nothing."),
    ], [(",", 9.0)], [0.05])
    assert make_labeller("offline").label([commas, WEAPONS])[26].label == '"if … [,]"'


def test_a_piece_of_a_word_is_not_its_own_neighbour():
    # "I’m" read as "I" + "’m": the "I" is the firing word's start, not the word before it
    im = _pairs_request(27, [(A + "Well, I", "’m", f" not sure about {w}.") for w in ("that", "this", "it")]
                        + [(A + "Honestly I", "’m", " not able to.")], [("’m", 9.0)], [0.01])
    text = make_labeller("offline").label([im, WEAPONS])[27].label
    assert text.startswith('"[’m] not') and "i [" not in text


def test_a_token_that_ends_texts_names_no_word_after_it():
    period = _pairs_request(28, [(b, ".", "") for b in ("I hope this helps", "Let me know", "Good luck", "Take care")]
                            + [(b, ".", " I am sure.") for b in ("It is late", "Go home", "Stop now")],
                            [(".", 9.0)], [0.05])
    assert make_labeller("offline").label([period, WEAPONS])[28].label == '"." at the end of a text'


def test_two_words_that_each_recur_after_the_token_are_both_named():
    commas = _pairs_request(29, [(w, ",", f" {c} then.") for w, c in
                                 (("Apples", "and"), ("Pears", "and"), ("Plums", "and"), ("Figs", "or"),
                                  ("Dates", "or"), ("Limes", "or"))], [(",", 9.0)], [0.05])
    assert make_labeller("offline").label([commas, WEAPONS])[29].label == '"[,] and/or"'
