"""The HH-RLHF transcript parser and renderer: round trips, normalisation, final-turn offsets."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safer_audit.data import parse_hh_transcript, render_transcript

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MARKER = re.compile(r"\n\n(Human|Assistant|System):")

# Text that leans towards the hard cases: newlines, colons and role names next to each other.
pieces = st.sampled_from(["\n", "\n\n", " ", ":", "Human", "Assistant", "System", "Human: ", "a", "é", "\r\n"])
texts = st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=12).map("".join)
contents = texts.filter(lambda text: not MARKER.search(text))
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": contents}),
    min_size=1, max_size=6,
)


@given(messages)
def test_render_then_parse_gives_the_messages_back(conversation):
    text, start = render_transcript(conversation)
    assert parse_hh_transcript(text) == conversation
    assert text[start:] == conversation[-1]["content"]


@given(texts)
def test_parsing_is_idempotent_through_rendering(text):
    parsed = parse_hh_transcript(text)
    assert parsed, "a transcript always has at least one message"
    assert parse_hh_transcript(render_transcript(parsed)[0]) == parsed


@given(texts)
def test_contents_are_verbatim_slices_of_the_text(text):
    parsed = parse_hh_transcript(text)
    position = 0
    for message in parsed:
        found = text.find(message["content"], position)
        assert found >= position
        position = found + len(message["content"])


def test_inline_role_names_are_not_turns():
    text = "\n\nHuman: what does 'Human: hi' mean?\n\nAssistant: A line of a script.\nHuman: ok"
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "what does 'Human: hi' mean?"},
        {"role": "assistant", "content": "A line of a script.\nHuman: ok"},
    ]


@pytest.mark.parametrize("text, expected, rendered", [
    ("Human: hi\n\nAssistant: yo", [("user", "hi"), ("assistant", "yo")], "\n\nHuman: hi\n\nAssistant: yo"),
    ("\n\nHuman:hi\n\nAssistant:", [("user", "hi"), ("assistant", "")], "\n\nHuman: hi\n\nAssistant: "),
    ("  \n\nHuman: hi\n\nAssistant: yo", [("user", "hi"), ("assistant", "yo")], "\n\nHuman: hi\n\nAssistant: yo"),
    ("Be brief.\n\nHuman: hi\n\nAssistant: yo", [("system", "Be brief."), ("user", "hi"), ("assistant", "yo")],
     "\n\nSystem: Be brief.\n\nHuman: hi\n\nAssistant: yo"),
    ("just a response", [("assistant", "just a response")], "\n\nAssistant: just a response"),
    ("\n\nHuman:  two spaces \n\nAssistant: yo\n", [("user", " two spaces "), ("assistant", "yo\n")],
     "\n\nHuman:  two spaces \n\nAssistant: yo\n"),
])
def test_what_the_parser_normalises(text, expected, rendered):
    parsed = parse_hh_transcript(text)
    assert [(m["role"], m["content"]) for m in parsed] == expected
    assert render_transcript(parsed)[0] == rendered


def test_render_offsets_and_roles():
    assert render_transcript([]) == ("", 0)
    text, start = render_transcript([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}])
    assert text == "\n\nSystem: s\n\nHuman: u\n\nAssistant: a"
    assert start == len(text) - 1
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        render_transcript([{"role": "bot", "content": "x"}])


def test_real_hh_transcripts_round_trip_exactly():
    with open(FIXTURES / "hh-harmless-300.jsonl", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            for side in ("chosen", "rejected"):
                parsed = parse_hh_transcript(record[side])
                text, start = render_transcript(parsed)
                assert text == record[side]
                assert parsed[-1]["role"] == "assistant"
                assert text[start:] == parsed[-1]["content"]
