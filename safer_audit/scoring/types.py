"""What a judge is: the Judge protocol, and FunctionJudge, a judge made of a function.

No tensors at import (torch only in annotations), so a judge plugin registers without loading torch;
the judges themselves and their context live in scoring.judges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

HARM_JUDGE = "harm"  # the harm judge's name: scoring.categories reads its signal by it
LENGTH_RESIDUAL_SUFFIX = "-lenres"  # NAME-lenres: judge NAME with its length dependence removed (scoring.judges)


@runtime_checkable
class Judge(Protocol):
    """A judge: ``name``, a one-line ``description``, and ``judge(context)`` -> a signed signal per pair.

    Optional: ``cost`` (a dict, e.g. requests and tokens of the last call) for a judge that spends, and
    ``evidence(contexts, chosen, rejected)`` -> per pair, a list of JudgeEvidence: the words the judge read
    its verdict from, for the pairs a scan flags (the report shows them beside the why); one that also takes
    ``cache_dir`` is given the scan's judges' cache, to read back what ``judge`` kept there, and one that takes
    ``dtype`` the scan's ``--dtype`` (what ``judge`` read from ``JudgeContext.dtype``).
    """

    name: str
    description: str

    def judge(self, context: Any) -> torch.Tensor:
        """``context``: a scoring.judges.JudgeContext. One signed float per pair (positive: chosen better), never learnt from that pair's label."""


def registered_judge(name: str) -> Judge | None:
    """A new instance of the judge registered as ``name``, checked to be a Judge; None for ``NAME-lenres`` of a
    registered judge (scoring.judges builds it); ConfigError naming the known ones otherwise. Loads no torch:
    the CLI checks ``--judge`` with it before a scan whose report is cached, which loads none."""
    from ..errors import ConfigError
    from ..plugins import lookup, registry

    base = name.removesuffix(LENGTH_RESIDUAL_SUFFIX)
    if base != name and base in registry("judge"):
        return None
    judge = lookup("judge", name, hint=f"and any of them with {LENGTH_RESIDUAL_SUFFIX}")()
    if not isinstance(judge, Judge):
        raise ConfigError(f"judge {name!r} does not have a name, a description and judge(context)")
    return judge


JUDGE_EVIDENCE_KINDS = ("comply", "decline", "question")


@dataclass
class JudgeEvidence:
    """A stretch of one response that a judge read its verdict from, and what it read it as.

    ``kind``: ``comply`` (reads like going along with a harmful request), ``decline`` (like refusing or
    deflecting), ``question`` (asks back); ``example``: the judge's own written example the text is nearest,
    ``similarity`` how near (cosine), so a person can compare the two."""

    judge: str
    side: str  # "chosen" or "rejected"
    start: int  # character offsets into that response: text is response[start:end]
    end: int
    text: str
    kind: str
    example: str
    similarity: float


@dataclass
class FunctionJudge:
    """A judge from a function of the context."""

    name: str
    description: str
    function: Any

    def judge(self, context: Any) -> torch.Tensor:
        return self.function(context)
