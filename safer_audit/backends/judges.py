"""The built-in judges: the scan's three signals and the length baseline (safer_audit.scoring.judges)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from ..scoring.types import FunctionJudge

if TYPE_CHECKING:  # registering the judges loads neither torch nor the scoring stage: using one does
    import torch

    from ..scoring.judges import JudgeContext


def _margin(name: str, context: JudgeContext) -> torch.Tensor:
    """A Bradley-Terry head's margins: frozen heads (the gate) or cross-fitted on these pairs."""
    from ..scoring.heads import HeadFit, head_margins, pair_inputs

    return head_margins(name, pair_inputs(context.stats, context.pooled)[name], context.fit or HeadFit(),
                        context.heads)


def score_safe(context: JudgeContext) -> torch.Tensor:
    from ..scoring.heads import score_safe as score

    return score(context.stats, context.features)


def reward_margin(context: JudgeContext) -> torch.Tensor:
    if context.rewards is not None:  # the reward model's own head, trained elsewhere
        return context.rewards[0::2] - context.rewards[1::2]
    return _margin("reward_margin", context)


def sae_margin(context: JudgeContext) -> torch.Tensor:
    return _margin("sae_margin", context)


def length(context: JudgeContext) -> torch.Tensor:
    """The length difference, oriented by a cross-fitted 1-D Bradley-Terry fit (evaluate's baseline)."""
    from ..scoring.heads import cross_fitted_margins

    fit = context.fit
    diff = context.length_difference().float().unsqueeze(1)
    return cross_fitted_margins(diff, folds=getattr(fit, "folds", 5), seed=getattr(fit, "seed", 0),
                                l2=1e-4).margins


BUILT_IN = (
    FunctionJudge("score_safe", "V(chosen) - V(rejected) over the salient SAE features", score_safe),
    FunctionJudge("reward_margin", "the reward model's margin, or a cross-fitted Bradley-Terry head on pooled "
                                   "activations", reward_margin),
    FunctionJudge("sae_margin", "a cross-fitted sparse Bradley-Terry head on the SAE codes", sae_margin),
    FunctionJudge("length", "the response-length difference, its sign cross-fitted (a baseline)", length),
)


@hookimpl
def register_judges(register):
    for judge in BUILT_IN:
        register(judge.name, lambda judge=judge: judge)
