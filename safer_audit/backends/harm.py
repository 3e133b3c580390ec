"""The built-in harm judge (safer_audit.scoring.harm) on the embedded sentence model: no network, no labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from ..scoring.types import HARM_JUDGE

if TYPE_CHECKING:  # loading the plugin (every command) must not load torch
    import torch

    from ..scoring.judges import JudgeContext

READ_PAIRS = 1024  # pairs whose texts are held at once


class HarmJudge:
    """harm(rejected) - harm(chosen) per pair, weighted by how harmful the conversation looks (scoring.harm)."""

    name = HARM_JUDGE
    description = ("how far each reply goes along with a harmful request (the embedded sentence model against "
                   "written examples of compliance, refusal and deflection), rejected minus chosen")

    def __init__(self, encoder=None):
        self._encoder = encoder  # anything with encode(texts) -> L2-normed rows; None: the embedded MiniLM

    def encode(self, texts: list[str]) -> torch.Tensor:
        if self._encoder is None:
            from .labellers import sentence_encoder

            self._encoder = sentence_encoder()
        return self._encoder.encode(texts)

    def judge(self, context: JudgeContext) -> torch.Tensor:
        from ..scoring.harm import Prototypes

        prototypes = Prototypes.embed(self.encode)
        parts, batch = [], []
        for row in context.pairs.iter_rows(named=True):  # a slice of texts at a time, never every text at once
            batch.append(row)
            if len(batch) == READ_PAIRS:
                parts.append(self._signal(batch, prototypes))
                batch = []
        if batch or not parts:
            parts.append(self._signal(batch, prototypes))
        import torch

        return torch.cat(parts)

    def evidence(self, contexts: list[str], chosen: list[str], rejected: list[str]) -> list[list]:
        """Per pair, the sentences the judge read its verdict from (scoring.harm.harm_evidence)."""
        from ..scoring.harm import Prototypes, harm_evidence

        return harm_evidence(chosen, rejected, self.encode, Prototypes.embed(self.encode))

    def _signal(self, rows: list[dict], prototypes) -> torch.Tensor:
        from ..scoring.harm import harm_scores

        return harm_scores([r["context"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                           self.encode, prototypes).signal


@hookimpl
def register_judges(register):
    register(HARM_JUDGE, HarmJudge)
