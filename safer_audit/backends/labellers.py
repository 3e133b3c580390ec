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
  of that mass on content words, and its label says so: the token, the words right before or
  after it that recur in windows of >= 3 pairs, or "in lists" (``token "to" after want``,
  ``token "," in lists``), rather than neighbours from one or two texts.
- A word around the firing token becomes a keyword only if windows of >= 3 pairs have it.
- Only latents whose relevance could name a category are embedded: at most EMBED_CONTEXTS
  windows each, each distinct window once, batched by length (the first labelling of an SAE
  was minutes on a busy machine, nearly all of it embedding ~12 long windows per latent).
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
VERSION = "4"  # bump when the keyword or category rule changes: cached labels are then made again
DEFAULT_TAXONOMY = Path(__file__).resolve().parent.parent / "taxonomy.yaml"

KEYWORDS = 3  # words in a label
WINDOW_WORDS = 10  # words either side of the activating token that are embedded
EMBED_CONTEXTS = 6  # the strongest windows of a latent that are embedded (the rest only feed keywords)
NEIGHBOUR_WORDS = 4  # words either side that can become keywords
MIN_TEXTS = 3  # a word around the firing token is a keyword only if it occurs in windows of this many pairs
SYNTAX_SHARE = 0.5  # below this content-word share of its mass a latent is labelled by its token and position
TOKEN_SHARE = 0.2  # a token with this share of a syntax latent's activation mass is named in its label
LIST_MARKS = frozenset(",;*•-/|")  # punctuation that separates the items of a list
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
    """The request without windows that repeat a stronger one: from the same pair, or with the same firing
    word and the same words before or after (a pair's texts, or a template answer, repeat a passage)."""
    seen: set[tuple] = set()
    kept = []
    for ctx in request.contexts:  # strongest first
        if ctx.pair_id:
            if ("pair", ctx.pair_id) in seen:
                continue
            seen.add(("pair", ctx.pair_id))
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
        if count < MIN_TEXTS or _is_stop(word):  # a word of one or two passages says nothing about the latent
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


def _neighbour(text: str, last: bool) -> str:
    """The word (or punctuation mark) right before (``last``) or after the firing token."""
    parts = re.findall(r"[A-Za-z0-9][A-Za-z0-9'’-]*|[^\sA-Za-z0-9]", text)
    part = (parts[-1] if last else parts[0]) if parts else ""
    return part.lower().strip("'’-")


def _quoted(word: str) -> str:
    return '"' + word.replace('"', "'") + '"'


def syntax_label(request: LabelRequest, content: list[str]) -> str:
    """A label for a latent that fires on function words or punctuation: the token, where it sits
    (the words right before or after it that recur in windows of >= MIN_TEXTS pairs, or "in lists"),
    and content words that recur around it (``content``), e.g. ``token "to" after want, how``."""
    mass: Counter = Counter()
    for word, weight in _token_masses(request):
        mass[word] += weight
    total = sum(mass.values()) or 1.0
    tokens = [w for w, m in sorted(mass.items(), key=lambda item: (-item[1], item[0])) if m / total >= TOKEN_SHARE][:2]
    if not tokens:
        tokens = [w for w, _ in Counter(_activating_word(c.before, c.token, c.after) for c in request.contexts)
                  .most_common(1)]
    where = []
    before = Counter(_neighbour(c.before, True) for c in request.contexts)
    after = Counter(_neighbour(c.after, False) for c in request.contexts)
    shown_before = [w for w, n in before.most_common(2) if n >= MIN_TEXTS and w and w[0].isalnum()]
    shown_after = [w for w, n in after.most_common(2) if n >= MIN_TEXTS and w and w[0].isalnum()]
    ends = sum(1 for c in request.contexts if not c.after.strip())
    if ends >= max(MIN_TEXTS, (len(request.contexts) + 1) // 2):  # the window is the end of the text
        where.append("at the end of a text")
        shown_after = []
    if shown_before:
        where.append("after " + ", ".join(shown_before))
    if shown_after:
        where.append("before " + ", ".join(shown_after))
    marks = [t for t in tokens if t and t in LIST_MARKS]
    if marks:
        in_lists = sum(1 for c in request.contexts
                       if (c.before[-60:] + c.after[:60]).count(_clean_token(c.token) or marks[0]) >= 2)
        if in_lists >= max(MIN_TEXTS, (len(request.contexts) + 1) // 2):
            where.insert(0, "in lists")
    text = "token " + " / ".join(_quoted(t) for t in tokens) if tokens else "(no token)"
    if where:
        text += " " + "; ".join(where)
    if content:
        text += "; near " + ", ".join(content)
    return text


def _token_masses(request: LabelRequest) -> list[tuple[str, float]]:
    """(whole word, activation mass) per top token."""
    word_of: dict[str, Counter] = defaultdict(Counter)
    for ctx in request.contexts:
        word_of[ctx.token][_activating_word(ctx.before, ctx.token, ctx.after)] += 1
    return [(word_of[t].most_common(1)[0][0] if word_of.get(t) else _clean_token(t), m) for t, m in request.top_tokens]


def _recurring_content(request: LabelRequest, document_frequency: Counter, n_documents: int) -> list[str]:
    """Content words around the firing token that recur in windows of >= MIN_TEXTS pairs, rarest first."""
    near = Counter()
    for ctx in request.contexts:
        near.update(set(_window_words(ctx.before, True, NEIGHBOUR_WORDS)
                        + _window_words(ctx.after, False, NEIGHBOUR_WORDS)))
    scored = [(-count * math.log((1 + n_documents) / (1 + document_frequency[w])), w)
              for w, count in near.items() if count >= MIN_TEXTS and not _is_stop(w)]
    return [w for _, w in sorted(scored)[:2]]


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

    def _similarities(self, requests: list[LabelRequest], rated: list[bool]):
        """Per request, the mean over its embedded windows of each category's best-matching description
        (a [requests, categories] tensor; zeros for requests not rated), with the category names.

        Each distinct window is embedded once, in batches of similar length (little padding); the
        scoring is a handful of tensor operations whatever the number of latents.
        """
        import torch

        categories = self._categories()
        names = list(categories)
        rows: dict[str, int] = {}
        owner, row_of = [], []
        for i, request in enumerate(requests):
            if not rated[i]:
                continue
            strongest = [c for c in request.contexts if c.sample == "top"] or list(request.contexts)
            for ctx in strongest[:EMBED_CONTEXTS]:
                text = _embed_text(ctx)
                owner.append(i)
                row_of.append(rows.setdefault(text, len(rows)))
        scores = torch.zeros(len(requests), len(names))
        if not rows:
            return scores, names
        texts = sorted(rows, key=lambda t: (len(t), t))
        position = {t: n for n, t in enumerate(texts)}
        order = torch.tensor([position[t] for t in rows])
        vectors = self.encoder.encode(texts)[order]  # back in first-seen order
        sims = vectors @ torch.cat([categories[n] for n in names]).T  # [windows, descriptions]
        per_category, start = [], 0
        for name in names:  # the best-matching description of each category: one odd description cannot decide
            n = len(self.taxonomy.categories[name])
            per_category.append(sims[:, start:start + n].max(1).values)
            start += n
        per_window = torch.stack(per_category, 1)[torch.tensor(row_of)]  # [embedded windows, categories]
        owners = torch.tensor(owner)
        scores.index_add_(0, owners, per_window)  # mean over windows: one odd window cannot decide
        counts = torch.bincount(owners, minlength=len(requests)).clamp(min=1).unsqueeze(1)
        return scores / counts, names

    def label(self, requests: Sequence[LabelRequest]) -> dict[int, FeatureLabel]:
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
        shares = [content_share(r) for r in requests]
        # relevance is scaled by min(1, share / CONTENT_SHARE_FULL): below MIN_CATEGORY_RELEVANCE no category can
        # be named, so a syntax latent's windows are not embedded at all (most of the strongest latents are such)
        rated = [bool(r.contexts) and min(1.0, s / CONTENT_SHARE_FULL) >= MIN_CATEGORY_RELEVANCE
                 for r, s in zip(requests, shares, strict=True)]
        similarities, names = self._similarities(requests, rated)
        similarities = similarities.tolist()
        labels = {}
        for i, request in enumerate(requests):
            share = shares[i]
            if share < SYNTAX_SHARE:
                text = syntax_label(request, _recurring_content(request, document_frequency, len(requests)))
            else:
                text = ", ".join(keywords(request, document_frequency, len(requests))) or "(no words)"
            if rated[i]:
                scores = {name: round(s, 4) for name, s in zip(names, similarities[i], strict=True)}
                safety = {n: s for n, s in scores.items() if n != self.taxonomy.not_safety}
                best = min(safety, key=lambda n: (-safety[n], n))
                relevance = self.taxonomy.relevance(safety[best])
                category = best
                if scores[self.taxonomy.not_safety] >= safety[best]:
                    category, relevance = NOT_SAFETY, relevance / 2
                relevance *= min(1.0, share / CONTENT_SHARE_FULL)  # a syntax latent is not about its windows' topic
                if category != NOT_SAFETY and relevance < MIN_CATEGORY_RELEVANCE:  # too far (or syntactic) to name
                    category = NOT_SAFETY
                similarity = scores[category if category != NOT_SAFETY else self.taxonomy.not_safety]
            else:
                category, relevance, similarity = NOT_SAFETY, 0.0, None
            if category != NOT_SAFETY and relevance >= 0.5:
                text = f"{category}: {text}"
            labels[request.latent] = FeatureLabel(
                latent=request.latent, label=text, relevance=round(relevance, 3), category=category,
                labeller=NAME, model=self.model, version=VERSION,
                extra={"similarity": similarity, "content_share": round(share, 3), "contexts": len(request.contexts)})
        return labels


def make_offline_labeller(taxonomy: str | Path | None = None, **unknown) -> OfflineLabeller:
    if unknown:
        raise ConfigError(f"the offline labeller takes no option {', '.join(sorted(unknown))} "
                          "(--labeller-url is for a labeller with an endpoint, such as llm)")
    return OfflineLabeller(taxonomy)


@hookimpl
def register_feature_labellers(register):
    register(NAME, make_offline_labeller)
