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


@runtime_checkable
class Judge(Protocol):
    """A judge: ``name``, a one-line ``description``, and ``judge(context)`` -> a signed signal per pair.

    Optional: ``cost`` (a dict, e.g. requests and tokens of the last call) for a judge that spends.
    """

    name: str
    description: str

    def judge(self, context: Any) -> torch.Tensor:
        """``context``: a scoring.judges.JudgeContext. One signed float per pair (positive: chosen better), never learnt from that pair's label."""


@dataclass
class FunctionJudge:
    """A judge from a function of the context."""

    name: str
    description: str
    function: Any

    def judge(self, context: Any) -> torch.Tensor:
        return self.function(context)
