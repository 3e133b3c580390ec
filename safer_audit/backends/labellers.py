"""Built-in feature labeller ``offline``: keyword labels and a safety category, with no network.

- The label's keywords are the words a latent fires on (and the words around them) whose
  weight is concentrated in this latent relative to how common they are: the activating
  tokens are weighed against their overall rate in the data, the words around them
  against how many of the labelled features share them; stopwords and punctuation are
  demoted, so a label reads ``weapons: gun, knife, shoot`` rather than ``the, .``.
- A window that repeats a stronger one (a pair's chosen and rejected texts share the
  conversation, so the same passage can come back) is dropped before anything is counted.
- A latent whose concentrated activation mass is mostly on stopwords and punctuation is
  about syntax, whatever its windows talk about: its relevance is scaled down by the share
  of that mass on content words.
- The category comes from meaning: the latent's strongest windows are embedded with the
  embedded sentence model (all-MiniLM-L6-v2: six layers, mean pooling, L2 norm) and
  compared with the descriptions of a safety taxonomy (``safer_audit/taxonomy.yaml``, or a
  user's file). The closest category's similarity gives the relevance.

Everything is deterministic: the same requests give the same labels.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..labelling import NOT_SAFETY, FeatureLabel, LabelRequest

NAME = "offline"
VERSION = "2"  # bump when the keyword or category rule changes: cached labels are then made again
DEFAULT_TAXONOMY = Path(__file__).resolve().parent.parent / "taxonomy.yaml"

KEYWORDS = 3  # words in a label
WINDOW_WORDS = 16  # words either side of the activating token that are embedded
NEIGHBOUR_WORDS = 4  # words either side that can become keywords
MIN_CATEGORY_RELEVANCE = 0.25  # below it the category is "not safety related"
STOP_FACTOR = 0.05  # weight kept by a stopword or punctuation
SAME_PASSAGE_WORDS = 6  # windows with these many words before (or after) the same firing word in common are one
CONTENT_SHARE_FULL = 0.5  # content-word share of the mass from which relevance is not scaled down

STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each few
for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself him
himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's like me more most
mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own really same
shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves
then there there's these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's whom
why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
yes okay ok well sure oh get got go going know think want one would also much many thing things something
anything maybe please thanks thank s t ll ve re d m human assistant
""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[A-Za-z]|[A-Za-z]")
_MARKERS = ("##", "Ġ", "▁", "Ċ")


def _clean_token(token: str) -> str:
    for marker in _MARKERS:
        token = token.replace(marker, " ")
    return token.strip().lower()


def _is_stop(word: str) -> bool:
    word = word.replace("’", "'")
    return word in STOPWORDS or not _WORD.fullmatch(word) or len(word) < 2


# ----------------------------------------------------------------------------- taxonomy

@dataclass(frozen=True)
class Taxonomy:
    categories: dict[str, tuple[str, ...]]  # category -> descriptions
    not_safety: str
    floor: float
    ceiling: float
    digest: str  # of the file's bytes: a changed taxonomy labels again

    def relevance(self, similarity: float) -> float:
        return min(max((similarity - self.floor) / (self.ceiling - self.floor), 0.0), 1.0)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """A taxonomy file: ``categories: {name: [description, ...]}``, ``not_safety``, ``floor``, ``ceiling``."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_TAXONOMY
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the taxonomy ({exc})") from exc
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, dict) or not categories:
        raise ConfigError(f'{path}: expected a "categories" mapping of category to descriptions')
    out = {}
    for name, descriptions in categories.items():
        if isinstance(descriptions, str):
            descriptions = [descriptions]
        if (not isinstance(name, str) or not isinstance(descriptions, list) or not descriptions
                or not all(isinstance(d, str) and d.strip() for d in descriptions)):
            raise ConfigError(f"{path}: category {name!r} needs a list of non-empty descriptions")
        out[name] = tuple(descriptions)
    not_safety = data.get("not_safety", NOT_SAFETY)
    if not_safety not in out:
        raise ConfigError(f"{path}: the not-safety category {not_safety!r} has no descriptions")
    if len(out) < 2:
        raise ConfigError(f"{path}: at least one safety category is needed besides {not_safety!r}")
    try:
        floor, ceiling = float(data.get("floor", 0.1)), float(data.get("ceiling", 0.45))
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: floor and ceiling must be numbers") from None
    if not -1 <= floor < ceiling <= 1:
        raise ConfigError(f"{path}: need -1 <= floor < ceiling <= 1, not floor {floor} and ceiling {ceiling}")
    return Taxonomy(out, not_safety, floor, ceiling, hashlib.sha256(raw).hexdigest()[:16])


# ---------------------------------------------------------------------------- embedding

class SentenceEncoder:
    """The embedded all-MiniLM-L6-v2 as a sentence encoder: all layers, mean pooling, L2 norm."""

    def __init__(self, directory: Path | None = None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .hf import embedded_model_path

        directory = directory or embedded_model_path()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory, use_safetensors=True).eval()

    def encode(self, texts: list[str], batch_size: int = 64):
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                       max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


@lru_cache(maxsize=1)
def sentence_encoder() -> SentenceEncoder:
    return SentenceEncoder()


# ------------------------------------------------------------------------------ keywords

def _window_words(text: str, last: bool, n: int) -> list[str]:
    words = [w.lower() for w in _WORD.findall(text)]
    return words[-n:] if last else words[:n]


def _activating_word(before: str, token: str, after: str) -> str:
    """The whole word the activating token is part of (subword tokens are completed)."""
    core = _clean_token(token)
    if not core or not core[0].isalnum():
        return core
    head = re.search(r"[A-Za-z'’-]*$", before).group() if token[:1].isalnum() or token.startswith("##") else ""
    tail = re.match(r"^[A-Za-z'’-]*", after).group()
    return (head + token.strip().lstrip("#") + tail).lower().strip("'’-") or core


def _token_weights(request: LabelRequest) -> list[tuple[str, float]]:
    """(whole word, activation share x lift over its overall rate) per top token: how concentrated it is here."""
    rates = {}
    if request.token_rates:
        rates = dict(zip((t for t, _ in request.top_tokens), request.token_rates, strict=True))
    total = sum(mass for _, mass in request.top_tokens) or 1.0
    word_of: dict[str, Counter] = defaultdict(Counter)
    for ctx in request.contexts:
        word_of[ctx.token][_activating_word(ctx.before, ctx.token, ctx.after)] += 1
    out = []
    for token, mass in request.top_tokens:
        share = mass / total
        rate = rates.get(token, 0.0)
        word = word_of[token].most_common(1)[0][0] if word_of.get(token) else _clean_token(token)
        lift = math.log1p(share / rate) if rate > 0 else math.log1p(share * 1e3)
        out.append((word, share * lift))
    return out


def content_share(request: LabelRequest) -> float:
    """The share of the latent's concentrated activation mass on content words (1.0 when no tokens are given)."""
    weights = _token_weights(request)
    total = sum(w for _, w in weights)
    if total <= 0:
        return 1.0
    return sum(w for word, w in weights if not _is_stop(word)) / total


def distinct_contexts(request: LabelRequest) -> LabelRequest:
    """The request without windows that repeat a stronger one (same firing word, same words before or after)."""
    seen: set[tuple] = set()
    kept = []
    for ctx in request.contexts:  # strongest first
        token = _clean_token(ctx.token)
        keys = set()
        for side, words in (("before", _window_words(ctx.before, True, SAME_PASSAGE_WORDS)),
                            ("after", _window_words(ctx.after, False, SAME_PASSAGE_WORDS))):
            if len(words) == SAME_PASSAGE_WORDS:  # a short edge of a text is too little to call it the same
                keys.add((side, token, tuple(words)))
        if keys & seen:
            continue
        seen |= keys
        kept.append(ctx)
    return replace(request, contexts=tuple(kept)) if len(kept) < len(request.contexts) else request


def keywords(request: LabelRequest, document_frequency: Counter, n_documents: int, k: int = KEYWORDS) -> list[str]:
    """The ``k`` words most concentrated in this latent, stopwords and punctuation demoted."""
    scores: dict[str, float] = defaultdict(float)
    for word, weight in _token_weights(request):
        scores[word] += weight * (STOP_FACTOR if _is_stop(word) else 1.0)
    # words around the firing token: weighed by how few of the other features share them (idf)
    n_ctx = max(len(request.contexts), 1)
    near = Counter()
    for ctx in request.contexts:
        near.update(set(_window_words(ctx.before, True, NEIGHBOUR_WORDS)
                        + _window_words(ctx.after, False, NEIGHBOUR_WORDS)))
    for word, count in near.items():
        if count < 2 or _is_stop(word):
            continue
        idf = math.log((1 + n_documents) / (1 + document_frequency[word]))
        scores[word] += 0.5 * (count / n_ctx) * idf
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    picked: list[str] = []
    for word, score in ranked:
        if score <= 0 or not word or any(word == p or word in p.split() for p in picked):
            continue
        picked.append(word)
        if len(picked) == k:
            break
    return picked


def _embed_text(ctx) -> str:
    """The window around the firing token, ``WINDOW_WORDS`` words each side, spacing kept."""
    before = re.search(r"(?:\S+\s+){0,%d}\S*$" % WINDOW_WORDS, ctx.before).group()
    after = re.match(r"^\S*(?:\s+\S+){0,%d}" % WINDOW_WORDS, ctx.after).group()
    return " ".join(f"{before}{ctx.token}{after}".split())


# ------------------------------------------------------------------------------ labeller

class OfflineLabeller:
    """Keyword labels and taxonomy categories from the embedded sentence model."""

    name = NAME
    version = VERSION

    def __init__(self, taxonomy: str | Path | None = None, encoder=None):
        self.taxonomy = load_taxonomy(taxonomy)
        self.model = "embedded:sentence-transformers/all-MiniLM-L6-v2"
        self.cache_key = self.taxonomy.digest  # labels depend on the taxonomy too
        self._encoder = encoder
        self._category_vectors = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = sentence_encoder()
        return self._encoder

    def _categories(self):
        """Per category, the embeddings of its descriptions."""
        if self._category_vectors is None:
            names = list(self.taxonomy.categories)
            texts = [d for name in names for d in self.taxonomy.categories[name]]
            vectors = self.encoder.encode(texts)
            out, start = {}, 0
            for name in names:
                n = len(self.taxonomy.categories[name])
                out[name] = vectors[start:start + n]
                start += n
            self._category_vectors = out
        return self._category_vectors

    def label(self, requests: Sequence[LabelRequest]) -> dict[int, FeatureLabel]:
        import torch

        requests = [distinct_contexts(r) for r in {r.latent: r for r in requests}.values()]
        if not requests:
            return {}
        document_frequency: Counter = Counter()
        for request in requests:
            words = set()
            for ctx in request.contexts:
                words.update(_window_words(ctx.before, True, NEIGHBOUR_WORDS))
                words.update(_window_words(ctx.after, False, NEIGHBOUR_WORDS))
            document_frequency.update(words)
        texts, owner = [], []
        for i, request in enumerate(requests):
            for ctx in request.contexts:
                texts.append(_embed_text(ctx))
                owner.append(i)
        vectors = self.encoder.encode(texts)
        categories = self._categories()
        names = list(categories)
        labels = {}
        for i, request in enumerate(requests):
            rows = [n for n, o in enumerate(owner) if o == i]
            words = keywords(request, document_frequency, len(requests))
            if rows:
                sims = vectors[rows] @ torch.cat([categories[n] for n in names]).T  # [contexts, descriptions]
                per_category, start = [], 0
                for name in names:
                    n = len(self.taxonomy.categories[name])
                    # mean over contexts of the best-matching description: one odd window cannot decide
                    per_category.append(float(sims[:, start:start + n].max(1).values.mean()))
                    start += n
                scores = {name: round(s, 4) for name, s in zip(names, per_category, strict=True)}
            else:
                scores = {name: 0.0 for name in names}
            safety = {n: s for n, s in scores.items() if n != self.taxonomy.not_safety}
            best = min(safety, key=lambda n: (-safety[n], n))
            relevance = self.taxonomy.relevance(safety[best])
            category = best
            if scores[self.taxonomy.not_safety] >= safety[best]:
                category, relevance = NOT_SAFETY, relevance / 2
            share = content_share(request)
            relevance *= min(1.0, share / CONTENT_SHARE_FULL)  # a syntax latent is not about its windows' topic
            if category != NOT_SAFETY and relevance < MIN_CATEGORY_RELEVANCE:  # too far (or too syntactic) to name one
                category = NOT_SAFETY
            text = ", ".join(words) or "(no words)"
            if category != NOT_SAFETY and relevance >= 0.5:
                text = f"{category}: {text}"
            labels[request.latent] = FeatureLabel(
                latent=request.latent, label=text, relevance=round(relevance, 3), category=category,
                labeller=NAME, model=self.model, version=VERSION,
                extra={"similarity": scores[category if category != NOT_SAFETY else self.taxonomy.not_safety],
                       "content_share": round(share, 3), "contexts": len(request.contexts)})
        return labels


def make_offline_labeller(taxonomy: str | Path | None = None, **unknown) -> OfflineLabeller:
    if unknown:
        raise ConfigError(f"the offline labeller takes no option {', '.join(sorted(unknown))} "
                          "(--labeller-url is for a labeller with an endpoint, such as llm)")
    return OfflineLabeller(taxonomy)


@hookimpl
def register_feature_labellers(register):
    register(NAME, make_offline_labeller)
