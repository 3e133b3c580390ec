"""Evidence in the text: the spans of each response that drive a pair's score_safe.

score_safe = V(chosen) - V(rejected), and V(t) is the mean over the read positions of t of
v(p) = the selected features' codes at p, signed by their salience (docs/method.md section 5).
So each read position p of a text has an exact share of score_safe: v(p) / |P(t)|, negated on
the rejected side; the shares of every position of both texts add up to score_safe. Here
those shares are recomputed for a few texts (a scan's suspects) from the cached activations
and the SAE, placed on the characters of the response each position stands for, and merged
into a few spans per side: the strongest positions pulling the score the way it went, grown
over their neighbours that pull the same way, widened to whole words.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..common.files import read_bounded, write_atomic
from ..errors import CacheError
from ..model.activations import ActivationStore, tokenize_prepared
from ..model.texts import PreparedText
from .salience import FeatureSet
from .types import SIDES, EvidenceSpan

MAX_SPANS = 3  # per side: more reads as a highlighted response, not as evidence
SEED = 0.5  # a position pulling at least this share of its side's strongest starts a span ...
SEED_OF_PAIR = 0.25  # ... when it also pulls this share of the pair's strongest: a weak side gets none
GROW = 0.2  # a span grows over neighbours pulling the same way with at least this share of its side's strongest
MAX_SPAN_POSITIONS = 12  # read positions in one span: a phrase, not a paragraph
SPAN_LATENTS = 3  # features named per span
_WORD = re.compile(r"\w")
_SENTENCE_END = re.compile(r"[.?!]\W*$")
_APOSTROPHES = "'’"
_LEADING = ".,;:!?)]}"  # punctuation that closes what came before a span, not part of it


@dataclass(frozen=True)
class Share:
    """One read position's share of score_safe, on the response characters [start, end) it stands for."""

    start: int
    end: int
    share: float
    terms: tuple[tuple[int, float], ...] = ()  # (latent, its part of share) of the selected latents firing there


def response_offset(prepared: PreparedText, response: str) -> int | None:
    """Where ``response`` (the final message) starts in the model's input text; None when it is not there as is."""
    start = prepared.response_start
    if prepared.text[start:start + len(response)] == response:
        return start
    found = prepared.text.rfind(response) if response else -1
    return found if found >= 0 else None


def position_shares(prepared: PreparedText, response: str, offsets: Sequence[tuple[int, int]],
                    positions: Sequence[int], terms: Sequence[Sequence[tuple[int, float]]],
                    scale: float) -> list[Share]:
    """The shares of the read positions ``positions`` (token indices into ``offsets``, the tokenizer's
    character offsets into ``prepared.text``), placed on ``response``'s characters: at each, the sum of its
    ``terms`` (latent, signed code) times ``scale``.

    A read position stands for the text since the previous one (a clause end with ``punctuation``
    positions, its own token with the others); offsets index the full text even when the model saw only
    its end (left truncation). Positions outside the response (its conversation) are left out.
    """
    base = response_offset(prepared, response)
    if base is None:
        return []
    end_of_response = base + len(response)
    shares, previous_end = [], None
    for p, position_terms in zip(positions, terms, strict=True):
        start, end = offsets[p]
        covered = start if previous_end is None else min(start, previous_end)
        previous_end = end
        lo, hi = max(covered, base), min(end, end_of_response)
        scaled = tuple((latent, value * scale) for latent, value in position_terms if value)
        if hi > lo and scaled:
            shares.append(Share(lo - base, hi - base, sum(value for _, value in scaled), scaled))
    return shares


def _ends_sentence(text: str, share: Share) -> bool:
    return bool(_SENTENCE_END.search(text[share.start:share.end])) or "\n" in text[share.start:share.end]


def _inside_word(text: str, at: int) -> bool:
    """Whether ``at`` (0 < at < len(text)) falls inside a word: between two word characters, or next to an
    apostrophe between two ("don't", "it’s")."""
    def word(i: int) -> bool:
        return 0 <= i < len(text) and bool(_WORD.match(text[i]))

    if word(at - 1) and word(at):
        return True
    if text[at] in _APOSTROPHES:
        return word(at - 1) and word(at + 1)
    return text[at - 1] in _APOSTROPHES and word(at - 2) and word(at)


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) grown to whole words, without the whitespace and the closing punctuation of the text before it
    at its start, nor the whitespace at its end."""
    while start > 0 and _inside_word(text, start):
        start -= 1
    while end < len(text) and _inside_word(text, end):
        end += 1
    while start < end and (text[start].isspace() or text[start] in _LEADING):
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def side_spans(side: str, response: str, shares: list[Share], direction: float, pair_peak: float) -> list[EvidenceSpan]:
    """At most MAX_SPANS spans of one response pulling score_safe in ``direction`` (-1 or +1), strongest first."""
    pull = [direction * s.share for s in shares]
    peak = max(pull, default=0.0)
    if peak <= 0:
        return []
    seed, grow = max(SEED * peak, SEED_OF_PAIR * pair_peak), GROW * peak
    taken = [False] * len(shares)
    runs = []
    for i in sorted(range(len(shares)), key=lambda n: (-pull[n], n)):
        if pull[i] < seed:
            break
        if taken[i]:
            continue
        lo = hi = i
        taken[i] = True
        while hi - lo + 1 < MAX_SPAN_POSITIONS:  # grow toward the stronger free neighbour, within the sentence
            left = (pull[lo - 1] if lo > 0 and not taken[lo - 1] and pull[lo - 1] >= grow
                    and not _ends_sentence(response, shares[lo - 1]) else None)
            right = (pull[hi + 1] if hi + 1 < len(shares) and not taken[hi + 1] and pull[hi + 1] >= grow
                     and not _ends_sentence(response, shares[hi]) else None)
            if left is None and right is None:
                break
            if right is None or (left is not None and left > right):
                lo -= 1
                taken[lo] = True
            else:
                hi += 1
                taken[hi] = True
        runs.append((lo, hi))
    spans = []
    for lo, hi in runs:
        start, end = _widen(response, min(s.start for s in shares[lo:hi + 1]), max(s.end for s in shares[lo:hi + 1]))
        if end > start:
            spans.append(EvidenceSpan(side, start, end, response[start:end],
                                      round(sum(s.share for s in shares[lo:hi + 1]), 6),
                                      _strongest(shares[lo:hi + 1], direction)))
    spans = _merge_overlaps(response, spans)
    return sorted(spans, key=lambda s: (-direction * s.weight, s.start))[:MAX_SPANS]


def _strongest(shares: list[Share], direction: float) -> list[int]:
    """The latents that pull ``shares`` most in ``direction``, at most SPAN_LATENTS."""
    total: dict[int, float] = {}
    for share in shares:
        for latent, value in share.terms:
            total[latent] = total.get(latent, 0.0) + direction * value
    return [latent for latent in sorted(total, key=lambda n: (-total[n], n)) if total[latent] > 0][:SPAN_LATENTS]


def _merge_overlaps(response: str, spans: list[EvidenceSpan]) -> list[EvidenceSpan]:
    """Spans that overlap once widened to words (two pieces of one word) as one."""
    merged: list[EvidenceSpan] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            end = max(last.end, span.end)
            merged[-1] = EvidenceSpan(last.side, last.start, end, response[last.start:end],
                                      round(last.weight + span.weight, 6),
                                      list(dict.fromkeys(last.latents + span.latents))[:SPAN_LATENTS])
        else:
            merged.append(span)
    return merged


def pair_evidence(chosen: str, rejected: str, chosen_shares: list[Share], rejected_shares: list[Share],
                  score_safe: float) -> list[EvidenceSpan]:
    """The evidence of one pair, strongest first: the spans pulling score_safe the way it went (toward the
    rejected response when it is negative or zero), or, when no position pulls that way, the other way."""
    direction = 1.0 if score_safe > 0 else -1.0
    everything = chosen_shares + rejected_shares
    if not any(direction * s.share > 0 for s in everything):
        direction = -direction
    pair_peak = max((direction * s.share for s in everything), default=0.0)
    spans = (side_spans("chosen", chosen, chosen_shares, direction, pair_peak)
             + side_spans("rejected", rejected, rejected_shares, direction, pair_peak))
    return sorted(spans, key=lambda s: (-direction * s.weight, SIDES.index(s.side), s.start))


# -- per-position codes of a few texts, from the cached activations ----------------------


class TextTerms(NamedTuple):
    """One text's read positions, their token ids and their terms, in arrays: the terms of position ``j`` are
    ``latents[row_starts[j]:row_starts[j + 1]]`` with ``values`` alike. A Python tuple per code held ~1.7 KB a
    position: the evidence stage of a 100k-pair scan (the tiny test model) peaked at 12.3 GB, with these 2.1 GB."""

    positions: np.ndarray
    token_ids: np.ndarray
    row_starts: np.ndarray
    latents: np.ndarray
    values: np.ndarray

    def rows(self) -> list[list[tuple[int, float]]]:
        """(latent, signed code) of each position, as position_shares reads them."""
        latents, values, starts = self.latents.tolist(), self.values.tolist(), self.row_starts.tolist()
        return [list(zip(latents[a:b], values[a:b], strict=True)) for a, b in zip(starts, starts[1:], strict=False)]


@torch.inference_mode()
def position_terms(store: ActivationStore, sae, features: FeatureSet, indices: Iterable[int]) -> dict[int, TextTerms]:
    """For each text index its TextTerms, where the terms of a position are (latent, code x its sign in v) of the
    selected latents firing there: the codes computed again by ``sae`` from ``store``'s cached activations, for
    those texts only."""
    wanted = sorted(set(indices))
    keys = list(dict.fromkeys(store.keys[t] for t in wanted))
    try:
        by_key = _terms_by_key(store, keys, sae, features)
    except CacheError:
        store.ensure_verified()  # a shard went bad since the scan read it: computed again, then read
        by_key = _terms_by_key(store, keys, sae, features)
    return {t: by_key[store.keys[t]] for t in wanted}


def _terms_by_key(store: ActivationStore, keys: list[str], sae, features: FeatureSet) -> dict[str, TextTerms]:
    out: dict[str, TextTerms] = {}
    if not keys:
        return out
    signed = torch.zeros(sae.cfg.n_latents)  # each latent's sign in v(p): +1 in F+, -1 in F-, 0 when not selected
    signed[features.latents] = features.signs
    device = next(sae.parameters()).device
    sub = ActivationStore(store.cache, keys, store.d_model, store.backend_identity)
    for texts, offsets, tensors in sub.iter_chunks():
        acts = tensors["acts"]
        starts = torch.zeros(len(acts) + 1, dtype=torch.long)
        latents = values = np.zeros(0)
        if len(acts):
            # the codes alone: the built-in SAE's encode, else any SAE's forward (hookspecs.SaeBackend)
            codes, picked = sae.encode(acts.to(device)) if hasattr(sae, "encode") else _forward_codes(sae, acts, device)
            picked = picked.cpu().long()
            codes = codes.float().cpu() * signed[picked]
            kept = codes != 0  # as ``if value`` kept them: a NaN stays
            starts[1:] = kept.sum(dim=1).cumsum(0)
            latents, values = picked[kept].numpy(), codes[kept].numpy()  # row by row, each row's order kept
        positions, token_ids, starts = tensors["positions"].numpy(), tensors["token_ids"].numpy(), starts.numpy()
        for row, text in enumerate(texts.tolist()):
            lo, hi = int(offsets[row]), int(offsets[row + 1])
            a, b = starts[lo], starts[hi]
            out[keys[text]] = TextTerms(positions[lo:hi], token_ids[lo:hi], starts[lo:hi + 1] - a,
                                        latents[a:b], values[a:b])
    return out


def _forward_codes(sae, acts: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    out = sae(acts.to(device))
    return out.top_vals, out.top_idx


TOKENIZE_BLOCK = 256  # texts tokenized at once as their shares are read


class TextShares(Mapping):
    """Text index -> its shares (texts_shares), made when read: only the compact TextTerms of every text are held,
    and the token offsets of a block of texts ahead in the order they were asked for."""

    def __init__(self, terms: dict[int, TextTerms], texts: Sequence[PreparedText], wanted: dict[int, str], backend,
                 max_length: int):
        self._terms, self._texts, self._wanted = terms, texts, wanted
        self._backend, self._max_length = backend, max_length
        self._order = list(wanted)
        self._place = {t: n for n, t in enumerate(self._order)}
        self._encoded: dict[int, tuple] = {}

    def __getitem__(self, t: int) -> list[Share]:
        terms = self._terms[t]
        if t not in self._encoded:
            ahead = self._order[self._place[t]:self._place[t] + TOKENIZE_BLOCK]
            block = [u for u in ahead if u not in self._encoded]
            encoded = tokenize_prepared([self._texts[u] for u in block], self._backend, self._max_length)
            self._encoded.update(zip(block, encoded, strict=True))
        ids, offsets, _special = self._encoded.pop(t)
        positions = terms.positions.tolist()
        if any(p >= len(ids) or ids[p] != token for p, token in zip(positions, terms.token_ids.tolist(), strict=True)):
            return []  # another tokenizer than the one the activations were read with: no place to put them
        return position_shares(self._texts[t], self._wanted[t], offsets, positions, terms.rows(),
                               1.0 / max(len(positions), 1))

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def texts_shares(store: ActivationStore, texts: Sequence[PreparedText], sae, features: FeatureSet, backend,
                 max_length: int, wanted: dict[int, str]) -> TextShares:
    """``wanted``: text index -> its final response. Each text's read positions' shares of its V(t) (v(p) / |P(t)|),
    on that response's characters; a text whose tokens no longer match its cached ones gets none. Each text's
    shares are made when read (best in ``wanted``'s order), so a scan's flagged pairs never hold them all."""
    return TextShares(position_terms(store, sae, features, wanted), texts, wanted, backend, max_length)


def flip(shares: list[Share]) -> list[Share]:
    """A rejected text's shares of V(rejected) as shares of score_safe (which subtracts it)."""
    return [Share(s.start, s.end, -s.share, tuple((latent, -value) for latent, value in s.terms)) for s in shares]


EVIDENCE_VERSION = "1"  # of the spans' rules above: a change makes every cached entry a miss
MAX_ENTRY_BYTES = 1 << 20


class EvidenceCache:
    """A flagged pair's spans, cached beside its activations, so a warm scan reads no activation shard.

    Keyed by everything the spans depend on: both texts' activation keys, both responses, the SAE's file
    hash, the selected latents and their signs, the pair's score_safe and the rules' version. An entry is
    read bounded and checked span by span (side, offsets, exact slice, finite weight, latent ids) before
    use; anything else is a miss, computed again and written over.
    """

    def __init__(self, directory: Path | None, sae_hash: str | None, features: FeatureSet):
        # no SAE hash (an SAE that cannot be hashed): nothing can tell two SAEs apart, so no cache
        self.directory = directory / "evidence" if directory is not None and sae_hash else None
        self._scope = json.dumps([EVIDENCE_VERSION, sae_hash, [int(f.latent) for f in features.features],
                                  [float(f.sign) for f in features.features]])

    def key(self, text_keys: tuple[str, str], chosen: str, rejected: str, score_safe: float) -> str:
        payload = json.dumps([self._scope, list(text_keys), chosen, rejected, repr(float(score_safe))])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:40]

    def get(self, key: str, chosen: str, rejected: str) -> list[EvidenceSpan] | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        if not path.is_file():
            return None
        try:
            items = json.loads(read_bounded(path, MAX_ENTRY_BYTES, CacheError))
            return [_checked_span(item, {"chosen": chosen, "rejected": rejected}) for item in items]
        except (CacheError, ValueError, TypeError, KeyError, AttributeError):
            return None  # damaged or foreign: computed again

    def put(self, key: str, spans: list[EvidenceSpan]) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / f"{key}.json", json.dumps([asdict(span) for span in spans]))


def _checked_span(item: dict, responses: dict[str, str]) -> EvidenceSpan:
    side, start, end, text, weight = item["side"], item["start"], item["end"], item["text"], item["weight"]
    latents = item.get("latents", [])
    if side not in responses or any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)):
        raise ValueError("side or offsets")
    if not 0 <= start < end <= len(responses[side]) or responses[side][start:end] != text:
        raise ValueError("offsets or text")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError("weight")
    if not isinstance(latents, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in latents):
        raise ValueError("latents")
    return EvidenceSpan(side, start, end, text, float(weight), list(latents))
