"""safer-audit feature-labeller plugin: ``llm`` labels features with any OpenAI-compatible chat endpoint.

Importing this module (which is all plugin loading does) sends nothing: requests go out
only when a labeller made by ``make_labeller`` is asked to ``label``.
"""

from __future__ import annotations

from safer_audit.hookspecs import hookimpl

from .client import Answer, AnswerError, ChatClient, DirCache, LLMError, Question, parse_json_object
from .labeller import CATEGORIES, NAME, VERSION, LLMLabeller, make_labeller

__all__ = [
    "Answer", "AnswerError", "CATEGORIES", "ChatClient", "DirCache", "LLMError", "LLMLabeller", "NAME",
    "Question", "VERSION", "make_labeller", "parse_json_object",
]


@hookimpl
def register_feature_labellers(register):
    register(NAME, make_labeller)
