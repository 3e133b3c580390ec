"""Why a pair is a suspect, in words a curator can check: the judges that prefer the rejected response, how
strongly (each judge's percentile among the scan's pairs), and the strongest evidence span in the text.

``explain_suspects`` gives a finished scan's suspects their evidence (features.evidence: the spans of
each response that drive score_safe, recomputed for the flipped and noisy pairs only) and their ``why``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..common.domain import Category
from ..errors import inert
from ..features.evidence import EvidenceCache, EvidenceSpan, flip, pair_evidence, texts_shares
from ..scoring.judges import available_judges, make_judge
from ..scoring.types import HARM_JUDGE, JudgeEvidence
from .build import FLAGGED  # the pairs that get evidence; every suspect gets a why
from .types import Finding, LazyFindings, Report

JUDGE_NAMES = {"score_safe": "score_safe", "reward_margin": "reward margin", "sae_margin": "SAE-head margin"}
SPAN_CHARS = 60  # of a span's text quoted in a why line


def judge_name(name: str) -> str:
    """How a judge is named to a person: ``reward margin``, ``smollm2/reward margin``."""
    prefix, _, own = name.rpartition("/")
    return (f"{prefix}/" if prefix else "") + JUDGE_NAMES.get(own, own)


def low_percentiles(values: torch.Tensor) -> torch.Tensor:
    """Each value's place from the low end among the finite values: the fraction of them at or below it
    (1/n for the lowest, 1 for the highest); NaN where the value is not finite."""
    v = values.double()
    finite = torch.isfinite(v)
    ordered = v[finite].sort().values
    out = torch.full(v.shape, math.nan, dtype=torch.float64)
    if len(ordered):
        out[finite] = torch.searchsorted(ordered, v[finite], right=True).double() / len(ordered)
    return out


def _lowest(fraction: float) -> str:
    """``lowest 2%``: the percentile rounded up, so the lowest pair of 300 is in the lowest 1%, never 0%."""
    return f"lowest {max(1, math.ceil(100 * fraction - 1e-9))}%"


def quoted(text: str, limit: int = SPAN_CHARS) -> str:
    """A span's text as a why line quotes it: one line, control characters written out, at most ``limit``
    characters (cut at a word when one ends near the limit)."""
    text = inert(re.sub(r"\s+", " ", text).strip())
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        text = text[:cut if cut > limit // 2 else limit - 1].rstrip() + "…"
    return f'"{text}"'


READINGS = {"comply": "reads like going along", "decline": "reads like declining", "question": "asks back"}
EXAMPLE_CHARS = 40  # of a judge's written example quoted in a why line


def judge_reading(evidence: Sequence[JudgeEvidence]) -> str | None:
    """What a judge read, in a why line, when it found the chosen reply the one going along: that reply's
    sentence and the written example it is nearest, then the rejected reply's opening and how it reads."""
    if not evidence or evidence[0].side != "chosen" or evidence[0].kind != "comply":
        return None
    parts = []
    for item in evidence:
        reading = f"{item.side} {quoted(item.text, SPAN_CHARS // 2)} {READINGS[item.kind]}"
        if item.kind != "question":
            reading += f" (nearest example {quoted(item.example, EXAMPLE_CHARS)}, {item.similarity:.2f})"
        parts.append(reading)
    return f"{judge_name(evidence[0].judge)} judge: " + ", ".join(parts)


def why_line(category: str, judges: Sequence[tuple[str, float | None, float | None]], quality: Sequence[str],
             evidence: Sequence[EvidenceSpan], judge_evidence: Sequence[JudgeEvidence] = ()) -> str:
    """The why of one suspect. ``judges``: (name, its value for the pair, its low-end percentile) of each
    ranked judge; a negative value prefers the rejected response. ``judge_evidence``: what judges that explain
    themselves read (the harm judge's sentences and nearest examples)."""
    known = [(name, value, pct) for name, value, pct in judges if value is not None and math.isfinite(value)]
    against = [(name, pct) for name, value, pct in known if value < 0]
    others = [(name, pct) for name, value, pct in known if value >= 0]

    def listed(items, named: bool = True):
        if len(items) == 1 and not named:  # the judge is named just before
            return _lowest(items[0][1])
        return ", ".join(f"{judge_name(name)} {_lowest(pct)}" for name, pct in items)

    parts = []
    if category == Category.QUALITY and quality:
        parts.append(f"a data problem: {inert(', '.join(quality))}")
    if against and not others:
        who = ("the judge" if len(against) == 1 else "both judges" if len(against) == 2
               else f"all {len(against)} judges")
        verb = "prefers" if len(against) == 1 else "prefer"
        parts.append(f"{who} {verb} the rejected response ({listed(against)})")
    elif against:
        verb = "prefers" if len(against) == 1 else "prefer"
        names = " and ".join(judge_name(name) for name, _ in against)
        other = " and ".join(judge_name(name) for name, _ in others)
        parts.append(f"{names} {verb} the rejected response ({listed(against, named=False)}); {other} "
                     f"{'prefers' if len(others) == 1 else 'prefer'} the chosen one ({listed(others, named=False)})")
    elif others:
        parts.append(f"no judge prefers the rejected response, but the pair ranks low ({listed(others)})")
    reading = judge_reading(judge_evidence)
    if reading:
        parts.append(reading)
    if evidence:
        parts.append(f"strongest evidence in {evidence[0].side}: {quoted(evidence[0].text)}")
    return "; ".join(parts) or "no judge could score this pair"


def explain_suspects(report: Report, pair_ids: Sequence[str], texts, store, sae, features, backend, max_length: int,
                     signals: Mapping[str, torch.Tensor], weights: Mapping[str, float], *,
                     judges_cache: Path | None = None, judges_dtype: str = "float32") -> int:
    """Give ``report``'s suspects their ``why`` and its flipped and noisy pairs their ``evidence``.

    ``pair_ids``, ``texts`` (two a pair: chosen, rejected), ``signals``: in table order, as the scan holds
    them; ``store``, ``sae``, ``features``, ``backend``: the scan's (its first model's, for a profile). The
    per-position codes are computed again for the flagged pairs' texts only. ``judges_cache``: where the judges
    keep what they computed (a judge whose ``evidence`` takes ``cache_dir`` reads it), ``judges_dtype`` the scan's
    ``--dtype`` (for a judge whose ``evidence`` takes ``dtype``). Returns the pairs given evidence.
    """
    index = {pair_id: i for i, pair_id in enumerate(pair_ids)}
    suspects: dict[int, Finding] = {}
    for finding in report.findings:  # a scan's findings are made as they are read: only the suspects are kept
        if finding.category != Category.CLEAN:
            suspects[index[finding.pair_id]] = finding
    flagged = {i: f for i, f in suspects.items() if f.category in FLAGGED}
    cache = EvidenceCache(getattr(store.cache, "directory", None), report.run.sae_hash, features)
    keys = {i: cache.key((store.keys[2 * i], store.keys[2 * i + 1]), f.chosen, f.rejected, f.score_safe)
            for i, f in flagged.items()}
    cached = {i: spans for i, f in flagged.items() if (spans := cache.get(keys[i], f.chosen, f.rejected)) is not None}
    wanted = {t: response for i, f in flagged.items() if i not in cached
              for t, response in ((2 * i, f.chosen), (2 * i + 1, f.rejected))}
    shares = texts_shares(store, texts, sae, features, backend, max_length, wanted) if wanted else {}
    ranked = [name for name, weight in weights.items() if weight and name in signals]
    if HARM_JUDGE in signals and HARM_JUDGE not in ranked:  # run for the flipped rule: its verdict is a reason too
        ranked.append(HARM_JUDGE)
    percentiles = {name: low_percentiles(signals[name]) for name in ranked}
    read = judges_evidence(ranked, flagged, judges_cache, judges_dtype)
    found: dict[str, tuple[list[EvidenceSpan], list[JudgeEvidence], str]] = {}
    for i, finding in suspects.items():
        evidence = []
        if i in cached:
            evidence = cached[i]
        elif i in flagged:
            evidence = pair_evidence(finding.chosen, finding.rejected, shares[2 * i], flip(shares[2 * i + 1]),
                                     finding.score_safe)
            cache.put(keys[i], evidence)
        judges = [(name, float(signals[name][i]), float(percentiles[name][i])) for name in ranked]
        own = read.get(i, [])
        found[finding.pair_id] = (evidence, own, why_line(finding.category, judges, finding.quality, evidence, own))
    del suspects

    def change(finding: Finding) -> None:
        if finding.pair_id in found:
            finding.evidence, finding.judge_evidence, finding.why = found[finding.pair_id]

    if isinstance(report.findings, LazyFindings):
        report.findings.update(change)  # a scan's findings stay lazy: set as each is made
    else:
        for finding in report.findings:
            change(finding)
    return len(flagged)


def judges_evidence(ranked: Sequence[str], flagged: Mapping[int, Finding],
                    cache_dir: Path | None = None, dtype: str = "float32") -> dict[int, list[JudgeEvidence]]:
    """What the ranked judges that explain themselves (``evidence``) read, for the flagged pairs: the harm
    judge first, since ``flipped`` rests on it."""
    out: dict[int, list[JudgeEvidence]] = {}
    if not flagged:
        return out
    order = list(flagged)
    registered = set(available_judges())  # a profile's other models' judges (smollm2/NAME) explain nothing here
    for name in sorted((name for name in ranked if name in registered), key=lambda name: name != HARM_JUDGE):
        judge = make_judge(name)
        if not callable(getattr(judge, "evidence", None)):
            continue
        accepted = inspect.signature(judge.evidence).parameters  # both optional in the Judge protocol
        options = {key: value for key, value in (("cache_dir", cache_dir), ("dtype", dtype)) if key in accepted}
        read = judge.evidence([flagged[i].context for i in order], [flagged[i].chosen for i in order],
                              [flagged[i].rejected for i in order], **options)
        for i, items in zip(order, read, strict=True):
            out.setdefault(i, []).extend(items)
    return out
