"""The record schemas: one record -> (chosen conversation, rejected conversation), and what a pair is.

Schemas (``config.Schema``), detected from the first record's fields unless forced:

- ``hh``: ``chosen`` / ``rejected`` HH-RLHF transcripts (``\\n\\nHuman: ...\\n\\nAssistant: ...``);
  texts without turn markers are single responses with an empty context;
- ``prompt``: ``prompt`` / ``chosen`` / ``rejected`` strings (a prompt with turn markers
  is parsed as a transcript);
- ``messages``: ``chosen`` / ``rejected`` as ``[{"role", "content"}, ...]`` lists, with an
  optional ``prompt`` list (TRL conversational) or string (UltraFeedback-binarized);
- ``pku``: ``prompt``, ``response_0``, ``response_1`` and ``better_response_id`` or
  ``safer_response_id`` (PKU-SafeRLHF), chosen by ``preference``.

The canonical pair (``PAIR_SCHEMA``) holds both conversations and their rendered context;
``pair_digest`` is what "the same pair" means everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import polars as pl

from ..common.digests import sha256_text, short_digest
from .transcripts import MARKER, ROLES, parse_hh_transcript

MESSAGES_TYPE = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))
PAIR_SCHEMA = {
    "pair_id": pl.Utf8,
    "source": pl.Utf8,
    "line": pl.Int64,
    "context": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_messages": MESSAGES_TYPE,
    "rejected_messages": MESSAGES_TYPE,
}


class Invalid(Exception):
    """A record-level problem; the reader adds the path and line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(field, message)
        self.field, self.message = field, message


# --- field checks ------------------------------------------------------------------


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def _present(record: dict, key: str, name: str | None = None) -> Any:
    name = name or key
    if key not in record:
        raise Invalid(name, "is missing")
    if record[key] is None:
        raise Invalid(name, "is null")
    return record[key]


def _string(record: dict, key: str, name: str | None = None) -> str:
    value = _present(record, key, name)
    if not isinstance(value, str):
        raise Invalid(name or key, f"must be a string, not {json_type(value)}")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise Invalid(name, f"must be a list of messages, not {json_type(value)}")
    messages = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise Invalid(where, f"must be an object, not {json_type(item)}")
        role = _string(item, "role", f"{where}.role")
        if role not in ROLES:
            raise Invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        messages.append({"role": role, "content": _string(item, "content", f"{where}.content")})
    return messages


def _ends_with_assistant(messages: list[dict[str, str]], name: str, what: str) -> list[dict[str, str]]:
    if not messages or messages[-1]["role"] != "assistant":
        raise Invalid(name, f"must end with {what}")
    return messages


def _prompt_context(prompt: str) -> list[dict[str, str]]:
    """A prompt string as context messages; a prompt with turn markers is a transcript."""
    if not prompt:
        return []
    if not MARKER.search(prompt):
        return [{"role": "user", "content": prompt}]
    messages = parse_hh_transcript(prompt)
    # "...\n\nAssistant:" at the end only cues the response; it is not a turn of its own.
    if messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


# --- schemas: a record -> (chosen conversation, rejected conversation) ------------------

Conversations = tuple[list[dict[str, str]], list[dict[str, str]]]


def _hh_pair(record: dict, preference: str) -> Conversations:
    chosen, rejected = (
        _ends_with_assistant(parse_hh_transcript(_string(record, key)), key, "an Assistant turn")
        for key in ("chosen", "rejected")
    )
    return chosen, rejected


def _prompt_pair(record: dict, preference: str) -> Conversations:
    context = _prompt_context(_string(record, "prompt"))
    chosen, rejected = (_string(record, key) for key in ("chosen", "rejected"))
    return (context + [{"role": "assistant", "content": chosen}],
            context + [{"role": "assistant", "content": rejected}])


def _messages_pair(record: dict, preference: str) -> Conversations:
    prompt = _present(record, "prompt") if "prompt" in record else None
    if prompt is not None and not isinstance(prompt, str):
        prompt = _messages(prompt, "prompt")
    sides = []
    for key in ("chosen", "rejected"):
        messages = _messages(_present(record, key), key)
        if isinstance(prompt, list):
            messages = prompt + messages
        elif prompt and messages[:1] != [{"role": "user", "content": prompt}]:
            # UltraFeedback-binarized repeats the prompt inside chosen/rejected; others do not.
            messages = [{"role": "user", "content": prompt}] + messages
        sides.append(_ends_with_assistant(messages, key, "an assistant message"))
    return sides[0], sides[1]


def _pku_pair(record: dict, preference: str) -> Conversations:
    context = _prompt_context(_string(record, "prompt"))
    responses = [_string(record, "response_0"), _string(record, "response_1")]
    key = f"{preference}_response_id"
    index = _present(record, key)
    if isinstance(index, bool) or not isinstance(index, int):
        raise Invalid(key, f"must be 0 or 1, not {json_type(index)}")
    if index not in (0, 1):
        raise Invalid(key, f"must be 0 or 1, not {index}")
    return (context + [{"role": "assistant", "content": responses[index]}],
            context + [{"role": "assistant", "content": responses[1 - index]}])


SCHEMA_PARSERS: dict[str, Callable[[dict, str], Conversations]] = {
    "hh": _hh_pair, "prompt": _prompt_pair, "messages": _messages_pair, "pku": _pku_pair,
}


def detect_schema(record: dict) -> str:
    if "response_0" in record or "response_1" in record:
        return "pku"
    if any(isinstance(record.get(key), list) for key in ("chosen", "rejected", "prompt")):
        return "messages"
    if "prompt" in record:
        return "prompt"
    if "chosen" in record or "rejected" in record:
        return "hh"
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise Invalid(None, f"cannot tell the schema from the fields ({fields}); expected chosen/rejected, "
                         "prompt/chosen/rejected or prompt/response_0/response_1 (force one with --schema)")


def record_id(record: dict) -> str | None:
    value = record.get("id")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid("id", f"must be a string or an integer, not {json_type(value)}")
    return str(value)


# An automatic pair id (a record without an ``id``) is this many hex digits of content_digest: an id that
# users see in reports and decisions, so it keeps its length; "the same pair" is pair_digest's business.
PAIR_ID_LENGTH = 16


def content_digest(context: str, chosen: str, rejected_context: str, rejected: str) -> str:
    return sha256_text("\x00".join((context, chosen, rejected_context, rejected)))


_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TEXT_FIELDS = ("id", "prompt", "chosen", "rejected", "response_0", "response_1")


def check_text(record: dict) -> None:
    """Lone surrogates (a JSON ``\\ud800`` escape, or bytes CSV could not decode) cannot be
    encoded as UTF-8: the tokenizer and every writer would fail later, far from the record."""
    for key in _TEXT_FIELDS:
        stack = [(key, record.get(key))]
        while stack:
            name, value = stack.pop()
            if isinstance(value, str):
                found = _SURROGATE.search(value)
                if found:
                    raise Invalid(name, f"holds a lone surrogate (\\u{ord(found.group()):04x}) at character "
                                         f"{found.start() + 1}: not valid Unicode text")
            elif isinstance(value, list):
                stack += [(f"{name}[{i}]", item) for i, item in reversed(list(enumerate(value)))]
            elif isinstance(value, dict):
                stack += [(f"{name}.{k}", v) for k, v in reversed(value.items()) if k in ("role", "content")]


def pair_digest(context: str, chosen: str, rejected: str) -> str:
    """The content digest of a pair: what "the same pair" means everywhere (clean, gate, decisions).

    Computed from the shared context and the two final responses, so a report's finding and
    a data row give the same digest, and moving a record to another line keeps it.
    """
    return short_digest(sha256_text("\x00".join((context, chosen, rejected))))
