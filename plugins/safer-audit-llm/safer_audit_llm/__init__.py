"""safer-audit LLM plugin: the ``llm`` feature labeller and the ``llm`` judge, over any OpenAI-compatible
chat endpoint.

Importing this module (which is all plugin loading does) sends nothing: requests go out
only when a labeller made by ``make_labeller`` is asked to ``label``, or a judge made by
``make_judge`` (only when chosen with ``--judge llm``) is asked to ``judge``.
"""

from __future__ import annotations

from safer_audit.hookspecs import hookimpl

from .client import Answer, AnswerError, ChatClient, DirCache, LLMError, Question, parse_json_object
from .judge import LLMJudge, make_judge
from .labeller import CATEGORIES, NAME, VERSION, LLMLabeller, make_labeller

__all__ = [
    "Answer", "AnswerError", "CATEGORIES", "ChatClient", "DirCache", "LLMError", "LLMJudge", "LLMLabeller", "NAME",
    "Question", "VERSION", "make_judge", "make_labeller", "parse_json_object",
]


@hookimpl
def register_feature_labellers(register):
    register(NAME, make_labeller)


@hookimpl
def register_judges(register):
    from .judge import NAME as JUDGE_NAME

    register(JUDGE_NAME, make_judge)
