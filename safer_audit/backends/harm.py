"""The built-in harm judge (safer_audit.scoring.harm) on the embedded sentence model: no network, no labels."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from ..scoring.types import HARM_JUDGE

if TYPE_CHECKING:  # loading the plugin (every command) must not load torch
    import torch

    from ..scoring.judges import JudgeContext

READ_PAIRS = 1024  # pairs whose texts are held at once
TOKENS_PER_BATCH = 2048  # padded tokens an encoder batch holds: measured fastest on HH sentences (16,384 was slower than 64 texts)
CACHE_SUBDIRECTORY = "harm"  # under the scan's judges/ cache: the sentence embeddings (model.embeddings)


class HarmJudge:
    """harm(rejected) - harm(chosen) per pair, weighted by how harmful the conversation looks (scoring.harm).

    What it costs is the sentence encoder: every text the maths reads (each reply's sentences, each
    conversation's last human turns, the written examples) is embedded once, however often it repeats, in
    large length-sorted batches, and kept in the scan's cache (model.embeddings), so a second scan of the
    same data encodes nothing and does not load the encoder."""

    name = HARM_JUDGE
    description = ("how far each reply goes along with a harmful request (the embedded sentence model against "
                   "written examples of compliance, refusal and deflection), rejected minus chosen")

    def __init__(self, encoder=None):
        self._encoder = encoder  # anything with encode(texts) -> L2-normed rows; None: the embedded MiniLM
        self._bfloat16 = False  # the embedded encoder under bfloat16 autocast (use_dtype)

    def use_dtype(self, dtype: str) -> None:
        """Compute as the scan's ``--dtype`` says: under bfloat16 autocast for ``bfloat16``, and for ``auto`` on a
        CPU with native bfloat16, where it is about twice as fast and ranks as float32 does (BENCHMARKS.md "The
        harm judge's cost"); float32 otherwise. Only the embedded encoder: an encoder given is used as it is."""
        if self._encoder is None or self._is_embedded():
            from ..pipeline.profiles import native_bfloat16

            self._bfloat16 = dtype in ("bfloat16", "bf16") or (dtype == "auto" and native_bfloat16())

    def _is_embedded(self) -> bool:
        from .labellers import SentenceEncoder

        return isinstance(self._encoder, SentenceEncoder)

    def encode(self, texts: list[str]) -> torch.Tensor:
        from .labellers import sentence_encoder

        if self._encoder is None:
            self._encoder = sentence_encoder()
        if self._is_embedded():
            import torch

            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bfloat16):
                return self._encoder.encode(texts, tokens_per_batch=TOKENS_PER_BATCH)
        return self._encoder.encode(texts)

    def fingerprint(self) -> str | None:
        """What the encoder's embeddings depend on (None: unknown, nothing is kept beyond the run): its files,
        and bfloat16 when it computes in it (the embeddings differ from float32's in the third digit)."""
        if self._encoder is None:
            from .labellers import encoder_fingerprint

            fingerprint = encoder_fingerprint()  # the embedded model's, without loading it
        else:
            fingerprint = getattr(self._encoder, "fingerprint", None)
        return f"{fingerprint}|bfloat16" if fingerprint is not None and self._bfloat16 else fingerprint

    @contextlib.contextmanager
    def embedder(self, cache_dir: Path | None):
        """texts -> embeddings through the cache under ``cache_dir``; without one (or without a fingerprint),
        through a cache of this run only, so a text met again in a later slice is read back as it is from
        a kept cache: a run gives the same signals, to the bit, with or without one."""
        from ..model.embeddings import EmbeddingCache

        fingerprint = self.fingerprint() if cache_dir is not None else None
        with contextlib.ExitStack() as stack:
            if fingerprint is None:
                cache_dir, fingerprint = stack.enter_context(tempfile.TemporaryDirectory()), "this run's encoder"
            cache = EmbeddingCache(Path(cache_dir) / CACHE_SUBDIRECTORY, fingerprint)
            yield lambda texts: cache.embed(texts, self.encode)

    def judge(self, context: JudgeContext) -> torch.Tensor:
        from ..scoring.harm import Prototypes

        self.use_dtype(getattr(context, "dtype", "float32"))
        parts, batch = [], []
        with self.embedder(context.cache_dir) as embed:
            prototypes = Prototypes.embed(embed)
            for row in context.pairs.iter_rows(named=True):  # a slice of texts at a time, never all at once
                batch.append(row)
                if len(batch) == READ_PAIRS:
                    parts.append(_signal(batch, prototypes, embed))
                    batch = []
            if batch or not parts:
                parts.append(_signal(batch, prototypes, embed))
        import torch

        return torch.cat(parts)

    def evidence(self, contexts: list[str], chosen: list[str], rejected: list[str],
                 cache_dir: Path | None = None, dtype: str = "float32") -> list[list]:
        """Per pair, the sentences the judge read its verdict from (scoring.harm.harm_evidence), on the
        embeddings the judge kept under ``cache_dir`` in the scan's ``dtype`` (a scan's flagged pairs: nothing
        is encoded again)."""
        from ..scoring.harm import Prototypes, harm_evidence

        self.use_dtype(dtype)
        with self.embedder(cache_dir) as embed:
            return harm_evidence(chosen, rejected, embed, Prototypes.embed(embed))


def _signal(rows: list[dict], prototypes, embed) -> torch.Tensor:
    """The signal of one slice of pairs: every text the maths will read embedded in one call first."""
    from ..scoring.harm import harm_scores, human_turns, sentences

    contexts, chosen, rejected = ([r[name] for r in rows] for name in ("context", "chosen", "rejected"))
    texts = [piece for text in chosen + rejected for piece in sentences(text)]
    texts += [turn for context in contexts for turn in human_turns(context)]
    return harm_scores(contexts, chosen, rejected, _Embedded(texts, embed), prototypes).signal


class _Embedded:
    """An encoder for one slice: ``texts`` embedded up front, any other text (none, while the harm maths
    reads what _signal lists) through ``embed``."""

    def __init__(self, texts: list[str], embed):
        self._position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        self._rows = embed(list(self._position)) if self._position else None
        self._embed = embed

    def __call__(self, texts: list[str]) -> torch.Tensor:
        import torch

        if texts and all(text in self._position for text in texts):
            return self._rows[torch.tensor([self._position[text] for text in texts], dtype=torch.long)]
        return self._embed(texts)


@hookimpl
def register_judges(register):
    register(HARM_JUDGE, HarmJudge)
