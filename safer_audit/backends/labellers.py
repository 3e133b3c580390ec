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
  of that mass on content words, and its label says the pattern around the token (v5):
  the phrase that recurs with it (the 1-2 words right before / after it in windows of >= 3
  pairs and >= a quarter of them, and at least twice as often as next to the other latents
  labelled with it), where it fires (the human turn, the opening or closing of a reply or a
  text), what the reply does there by simple cues (refusals, questions back, lists,
  instructions) and the side most of its windows are on: ``"if [you] can" in instructions``,
  ``"i'm [not] sure" opening refusals``, ``"," in lists; mostly rejected``. Labels are at
  most MAX_LABEL characters: later parts are dropped, never cut.
- A word around the firing token becomes a keyword only if windows of >= 3 pairs have it.
- Only latents whose relevance could reach 0.5 are embedded (content-word share >= EMBED_SHARE):
  at most EMBED_CONTEXTS windows of WINDOW_WORDS words either side, each distinct window once,
  batched by length (the first labelling of an SAE was minutes on a busy machine, nearly all
  of it embedding ~12 long windows per latent; v4's 6 windows of 10 words were still 38% of a
  warm scan).
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
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..common.files import read_bounded
from ..config import MAX_TAXONOMY_BYTES
from ..errors import ConfigError, ModelLoadError
from ..features.types import NO_CATEGORY, NOT_SAFETY, FeatureLabel, LabelRequest
from ..hookspecs import hookimpl

NAME = "offline"
VERSION = "7"  # bump when the keyword or category rule changes: cached labels are then made again
DEFAULT_TAXONOMY = Path(__file__).resolve().parent.parent / "taxonomy.yaml"

KEYWORDS = 3  # words in a label
WINDOW_WORDS = 6  # words either side of the activating token that are embedded
EMBED_CONTEXTS = 4  # the strongest windows of a latent that are embedded (the rest only feed keywords)
EMBED_SHARE = 0.25  # a latent with less content-word share is not embedded (its relevance could not reach 0.5)
NEIGHBOUR_WORDS = 4  # words either side that can become keywords
MIN_TEXTS = 3  # a word around the firing token is a keyword only if it occurs in windows of this many pairs
SYNTAX_SHARE = 0.5  # below this content-word share of its mass a latent is labelled by its token and position
TOKEN_SHARE = 0.2  # a token with this share of a syntax latent's activation mass is named in its label
LIST_MARKS = frozenset(",;*•-/|")  # punctuation that separates the items of a list
# the relevance from which a category is named: on fixtures/labelled-windows.jsonl (windows a person gave a
# category), the categories named from it are right >= 80% of the time (BENCHMARKS.md "Feature labels")
CATEGORY_EVIDENCE = 0.6
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
    raw = read_bounded(path, MAX_TAXONOMY_BYTES, lambda message: ConfigError(f"{path}: {message}"))
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
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

ENCODER_MAX_LENGTH = 128  # tokens of a text the sentence encoder reads (longer texts are cut)
ENCODER_FORMAT = "mean-pooled, L2-normed, v1"  # how token states become a text's embedding: in the fingerprint
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_TOKENIZER_BYTES = 64 << 20


def encoder_fingerprint(directory: Path | None = None) -> str:
    """What a sentence embedding depends on, without loading the weights: the model's fingerprint (its
    config, its weight files' names and sizes, as the activation cache keys it), the tokenizer files'
    bytes, the max length and the pooling. A cache of embeddings keyed by it is not read by another model."""
    from .hf import embedded_model_path, model_fingerprint

    directory = Path(directory or embedded_model_path())
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{ENCODER_FORMAT}\n{ENCODER_MAX_LENGTH}\n{model_fingerprint(directory)}\n".encode())
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.exists():
            content = read_bounded(path, MAX_TOKENIZER_BYTES, lambda message, p=path: ModelLoadError(f"{p}: {message}"))
            digest.update(f"{name}:{len(content)}\n".encode() + content)
    return digest.hexdigest()


class SentenceEncoder:
    """The embedded all-MiniLM-L6-v2 as a sentence encoder: all layers, mean pooling, L2 norm."""

    def __init__(self, directory: Path | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .hf import embedded_model_path, load_weights

        directory = directory or embedded_model_path()
        self.fingerprint = encoder_fingerprint(directory)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        # the same call as the hf backend's for this model on the CPU: a scan of the default model shares its weights
        self.model = load_weights(AutoModel, directory, torch.device("cpu"), trust_remote_code=False,
                                  dtype=torch.float32, use_safetensors=True)

    def encode(self, texts: list[str], batch_size: int = 64, tokens_per_batch: int | None = None):
        """L2-normed mean-pooled embeddings of ``texts``, in order. The texts are tokenized once and
        batched in order of token count, so a batch pads to little more than its own texts' length:
        ``batch_size`` texts a batch, or with ``tokens_per_batch`` as many as pad to at most that many
        tokens (short sentences then go in large batches: fewer, larger matrix products)."""
        import torch

        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        ids = self.tokenizer(list(texts), truncation=True, max_length=ENCODER_MAX_LENGTH)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        out = torch.empty(len(ids), self.model.config.hidden_size)
        with torch.inference_mode():
            for chunk in length_batches(order, [len(i) for i in ids], batch_size, tokens_per_batch):
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state.float()  # pooled in float32 under autocast too
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[torch.tensor(chunk)] = torch.nn.functional.normalize(pooled, dim=-1)
        return out


def length_batches(order: list[int], lengths: list[int], size: int, tokens: int | None) -> list[list[int]]:
    """``order`` (shortest first) cut into batches of ``size``, or of at most ``tokens`` padded tokens."""
    if tokens is None:
        return [order[start:start + size] for start in range(0, len(order), size)]
    batches, current = [], []
    for i in order:  # the longest text so far is this one: the batch pads to its length
        if current and lengths[i] * (len(current) + 1) > tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


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


def _quoted(word: str) -> str:
    return '"' + word.replace('"', "'") + '"'


# ----------------------------------------------------------------------------- patterns

# a turn marker in a conversation's text: HH's "\n\nHuman:" / "\n\nAssistant:", or a chat template's role header
_ROLE = re.compile(r"(?:^|\n)[ \t]*(human|user|assistant|system)[ \t]*:|<\|im_start\|>[ \t]*(user|assistant|system)",
                   re.IGNORECASE)
_ROLE_NAMES = {"human": "human", "user": "human", "assistant": "assistant", "system": "system"}
_A = "(?:'|’)"  # either apostrophe
_REFUSAL = re.compile(  # an apology, a "can't / won't", or not knowing: the cues of a refusal or a deflection
    rf"\b(?:i{_A}m sorry|i am sorry|sorry, (?:but|i)|i{_A}m (?:not (?:sure|comfortable|able|going to)|afraid)"
    rf"|i am not (?:sure|comfortable|able)|i (?:can{_A}t|cannot|won{_A}t|will not|shouldn{_A}t|don{_A}t think i)"
    rf"|i (?:don{_A}t|do not) (?:know|understand|feel comfortable|want to)|not (?:appropriate|something i))",
    re.IGNORECASE)
_STEP_WORDS = re.compile(r"\b(?:first|then|next|after that|finally|step|make sure|you{_A}ll need|you need to)\b"
                         .replace("{_A}", _A), re.IGNORECASE)
_LIST_LINE = re.compile(r"(?:^|\n)[ \t]*(?:\d{1,2}[.)]|[-*•])[ \t]+\S")
_SENTENCE_END = re.compile(r"[.!?\n]")
TURN_SHARE = 0.7  # a label names the turn (assistant / human) when this share of the windows is in it
KIND_SHARE = 0.4  # ... and the kind of response (refusals, questions, lists, instructions) at this share
SIDE_SHARE = 0.8  # ... and "mostly chosen / rejected" when this share of the windows is on one side
PHRASE_SHARE = 0.25  # a neighbour joins the phrase when this share of the windows has it (and >= MIN_TEXTS) ...
OPENER_SHARE = 0.3  # the first word of the token's sentence is named when this share of the windows has it
PHRASE_LIFT = 2.0  # ... and it is this many times more frequent next to this latent than next to the others
LIFT_REQUESTS = 8  # the lift is tested when at least this many latents are labelled together (the background)
MAX_LABEL = 60  # characters: further parts of a label are dropped rather than cut
_KINDS = ("refusals", "questions", "lists", "instructions")
KIND_NAMES = {"refusals": "refusals", "questions": "questions back", "lists": "lists", "instructions": "instructions"}


@dataclass(frozen=True)
class Turn:
    """Where a window's firing token sits: the turn's role, at its opening or closing, and the kind of turn."""

    role: str | None  # "assistant", "human", "system"; None when no turn marker is in the window
    opening: bool  # among the turn's (or the text's) first two words
    closing: bool  # the turn (or the text) ends right after the token
    kind: str | None  # one of _KINDS when a simple cue says so
    sentence_start: bool = False  # the token starts a sentence (or a line)
    opener: str = ""  # the first word of the token's sentence, when 2+ words stand between them ("if ... [,]")


def turn_of(ctx) -> Turn:
    """The turn the firing token is in, from the turn markers and cues visible in its window."""
    marks = list(_ROLE.finditer(ctx.before))
    role, head = None, ctx.before
    if marks:
        role = _ROLE_NAMES[(marks[-1].group(1) or marks[-1].group(2)).lower()]
        head = ctx.before[marks[-1].end():]
    following = _ROLE.search(ctx.after)
    tail = ctx.after[:following.start()] if following else ctx.after
    opening = (bool(marks) or not ctx.before.strip()) and len(_WORD.findall(head)) <= 2
    closing = (following is not None or not ctx.after.strip()) and not re.search(r"[A-Za-z0-9]", tail)
    text = head + ctx.token + tail
    end = _SENTENCE_END.search(ctx.token + tail)
    sentence = re.split(r"[.!?:\n]", _whole_word_before(ctx))[-1]
    words = [w.lower() for w in _WORD.findall(sentence)]
    sentence_start = not words and not opening
    kind = None
    if _REFUSAL.search(text):
        kind = "refusals"
    elif end is not None and end.group() == "?":
        kind = "questions"
    elif _LIST_LINE.search(text):
        kind = "lists"
    elif len({m.lower() for m in _STEP_WORDS.findall(text)}) >= 2:
        kind = "instructions"
    ends_sentence = _clean_token(ctx.token) in (".", "!", "?")  # a sentence's first word says little about its end
    return Turn(role, opening, closing, kind, sentence_start, words[0] if len(words) >= 2 and not ends_sentence else "")


def _whole_word_before(ctx) -> str:
    """``before`` without the start of the firing token's word when the token is a piece of it (I + ’m)."""
    if ctx.token[:1].isalnum() or ctx.token[:1] in "'’":
        return re.sub(r"[A-Za-z0-9'’]+$", "", ctx.before)
    return ctx.before


def _whole_word_after(ctx) -> str:
    """``after`` without the rest of the firing token's word when the token is a piece of it (you + 're)."""
    if ctx.token[-1:].isalnum():
        return re.sub(r"^[A-Za-z0-9'’]+", "", ctx.after)
    return ctx.after


def where_it_fires(contexts, *, list_commas: bool = False) -> tuple[str, str]:
    """(where, side) of a latent's windows: ``opening assistant refusals``, ``in human questions``,
    ``at the end of a text``; ``mostly rejected`` (or "") when one side has most of its windows."""
    n = len(contexts)
    if n == 0:
        return "", ""
    turns = [turn_of(c) for c in contexts]
    need = max(MIN_TEXTS, math.ceil(TURN_SHARE * n))
    roles = Counter(t.role for t in turns if t.role)
    role = next((r for r, k in roles.most_common(1) if k >= need), None)
    kinds = Counter(t.kind for t in turns if t.kind and (role is None or t.role == role))
    kind = next((k for k, m in sorted(kinds.items(), key=lambda item: (-item[1], _KINDS.index(item[0])))
                 if m >= max(MIN_TEXTS, math.ceil(KIND_SHARE * n))), None)
    if list_commas:
        kind = "lists"
    half = max(MIN_TEXTS, (n + 1) // 2)
    opening, closing = sum(t.opening for t in turns), sum(t.closing for t in turns)
    starts = sum(t.sentence_start or t.opening for t in turns)
    at = "opening" if opening >= half and opening >= closing else "closing" if closing >= half else "in"
    if at == "in" and starts >= half:
        at = "starting sentences"
    # a response is an assistant's turn: that is said only when it is not (human), or by what the reply does
    if role == "assistant":
        what = KIND_NAMES.get(kind, "replies" if at in ("opening", "closing") else "")
    elif role is not None:
        what = f"{role} " + ("questions" if kind == "questions" else "turns")
    else:
        what = KIND_NAMES.get(kind, "")
    if at == "starting sentences":
        where = at + (f" in {what}" if what else "")
    elif what:
        where = f"{at} {what}"
    else:
        where = {"opening": "at the start of a text", "closing": "at the end of a text"}.get(at, "")
    chosen = sum(c.side == "chosen" for c in contexts)
    side = ""
    if n >= 4 and chosen >= SIDE_SHARE * n:
        side = "mostly chosen"
    elif n >= 4 and n - chosen >= SIDE_SHARE * n:
        side = "mostly rejected"
    return where, side


def _neighbours(text: str, last: bool, k: int) -> tuple[str, ...]:
    """The ``k`` words (or punctuation marks) right before (``last``) or after the firing token, nearest last/first."""
    parts = [p.lower().strip("'’-") for p in re.findall(r"[A-Za-z0-9][A-Za-z0-9'’-]*|[^\sA-Za-z0-9]", text)]
    return tuple(parts[-k:]) if last else tuple(parts[:k])


def _neighbour(text: str, last: bool) -> str:
    """The word (or punctuation mark) right before (``last``) or after the firing token."""
    parts = _neighbours(text, last, 1)
    return parts[0] if parts else ""


@dataclass
class Background:
    """How often each word sits right before / after the firing token, over all the latents labelled together."""

    before: Counter
    after: Counter
    windows: int
    requests: int
    openers: Counter = field(default_factory=Counter)  # the first words of the token's sentences

    @classmethod
    def of(cls, requests: Sequence[LabelRequest]) -> Background:
        before, after, openers, windows = Counter(), Counter(), Counter(), 0
        for request in requests:
            for ctx in request.contexts:
                before[_neighbour(_whole_word_before(ctx), True)] += 1
                after[_neighbour(_whole_word_after(ctx), False)] += 1
                openers[turn_of(ctx).opener] += 1
                windows += 1
        return cls(before, after, windows, len(requests), openers)

    def lift(self, word: str, share: float, last: bool) -> float:
        """How many times more often ``word`` is next to this latent's token than next to the others'."""
        if self.requests < LIFT_REQUESTS or not self.windows:
            return math.inf  # too few latents to say what is usual: the share alone decides
        rate = (self.before if last else self.after)[word] / self.windows
        return share / rate if rate > 0 else math.inf

    def lift_opener(self, word: str, share: float) -> float:
        if self.requests < LIFT_REQUESTS or not self.windows:
            return math.inf
        rate = self.openers[word] / self.windows
        return share / rate if rate > 0 else math.inf


def phrase(request: LabelRequest, token: str, background: Background | None, *, after_too: bool = True) -> str:
    """The firing token with the 1-2 words right before and after it that recur with it (in windows of
    >= MIN_TEXTS pairs, >= PHRASE_SHARE of them) far more than next to other latents: ``"if [you] can"``."""
    n = len(request.contexts)
    need = max(MIN_TEXTS, math.ceil(PHRASE_SHARE * n))
    sides = []
    for last in (True, False) if after_too else (True,):
        grams = [_neighbours(_whole_word_before(c) if last else _whole_word_after(c), last, 2) for c in request.contexts]
        words = Counter(g[-1 if last else 0] for g in grams if g)
        nearest = [w for w, k in sorted(words.items(), key=lambda item: (-item[1], item[0]))
                   if k >= need and w[:1].isalnum()
                   and (background is None or background.lift(w, k / n, last) >= PHRASE_LIFT)][:2]
        if len(nearest) == 2:  # two words each recur next to it: "[,] and/or"
            sides.append("/".join(nearest))
            continue
        chosen: tuple[str, ...] = tuple(nearest)
        if chosen:  # one word: extended by the word beyond it when that recurs too ("want to [take]")
            counts = Counter((g[-2:] if last else g[:2]) for g in grams
                             if len(g) == 2 and g[-1 if last else 0] == chosen[0] and all(w[:1].isalnum() for w in g))
            best = [g for g, k in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if k >= need][:1]
            chosen = best[0] if best else chosen
        sides.append(" ".join(chosen))
    before, after = (sides + [""])[:2]
    openers = Counter(turn_of(c).opener for c in request.contexts)
    opener = next((w for w, k in sorted(openers.items(), key=lambda item: (-item[1], item[0]))
                   if w and k >= max(MIN_TEXTS, math.ceil(OPENER_SHARE * n)) and w not in before.split()
                   and (background is None or background.lift_opener(w, k / n) >= PHRASE_LIFT)), "")
    if opener:  # the sentence starts with it, 2+ words before the token: "if ... [,]"
        before = f"{opener} … {before}".strip()
    if not before and not after:
        return _quoted(token)
    return _quoted(" ".join(p for p in (before, f"[{token}]", after) if p))


def _join(parts: list[str], first_sep: str = " ") -> str:
    """The parts of a label, in order, each kept only while the label stays within MAX_LABEL characters."""
    text = parts[0]
    for i, part in enumerate(parts[1:]):
        if not part:
            continue
        candidate = text + (first_sep if i == 0 else "; ") + part
        if len(candidate) <= MAX_LABEL:
            text = candidate
    return text


def syntax_label(request: LabelRequest, content: list[str], background: Background | None = None) -> str:
    """A label for a latent that fires on function words or punctuation: the token in the phrase that recurs
    around it, where it fires (the turn, its opening or closing, the kind of response), the side most of its
    windows are on, and content words that recur around it, e.g. ``"if [you] can" in assistant instructions``."""
    mass: Counter = Counter()
    for word, weight in _token_masses(request):
        mass[word] += weight
    total = sum(mass.values()) or 1.0
    tokens = [w for w, m in sorted(mass.items(), key=lambda item: (-item[1], item[0])) if m / total >= TOKEN_SHARE][:2]
    if not tokens:
        tokens = [w for w, _ in Counter(_activating_word(c.before, c.token, c.after) for c in request.contexts)
                  .most_common(1)]
    marks = [t for t in tokens if t and t in LIST_MARKS]
    in_lists = False
    if marks:
        in_lists = sum(1 for c in request.contexts if (c.before[-60:] + c.after[:60]).count(
            _clean_token(c.token) or marks[0]) >= 2) >= max(MIN_TEXTS, (len(request.contexts) + 1) // 2)
    where, side = where_it_fires(request.contexts, list_commas=in_lists)
    if len(tokens) == 1:  # a token that ends texts or replies has no word after it worth naming
        ends = where.startswith(("closing", "at the end"))
        core = phrase(request, tokens[0], background, after_too=not ends)
    else:
        core = " / ".join(_quoted(t) for t in tokens) if tokens else "(no token)"
    if in_lists and not where:
        where = "in lists"
    near = "near " + ", ".join(content) if content else ""
    return _join([core, where, side, near])


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

        Each distinct window is embedded once (SentenceEncoder.encode batches by token count); the
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
        vectors = self.encoder.encode(list(rows))  # in first-seen order; the encoder batches by token count
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
        # relevance is scaled by min(1, share / CONTENT_SHARE_FULL): below EMBED_SHARE it cannot reach 0.5 (a label's
        # category prefix, --select safety's threshold), so a syntax latent's windows are not embedded at all
        # (most of the strongest latents are such; embedding was nearly all of the first labelling's time)
        rated = [bool(r.contexts) and s >= EMBED_SHARE for r, s in zip(requests, shares, strict=True)]
        background = Background.of(requests)
        similarities, names = self._similarities(requests, rated)
        similarities = similarities.tolist()
        labels = {}
        for i, request in enumerate(requests):
            share, where = shares[i], ""
            if share < SYNTAX_SHARE:
                text = syntax_label(request, _recurring_content(request, document_frequency, len(requests)), background)
            else:
                text = ", ".join(keywords(request, document_frequency, len(requests))) or "(no words)"
                where, _side = where_it_fires(request.contexts)
            closest, relevance, similarity = None, 0.0, None
            if rated[i]:
                scores = {name: round(s, 4) for name, s in zip(names, similarities[i], strict=True)}
                safety = {n: s for n, s in scores.items() if n != self.taxonomy.not_safety}
                best = min(safety, key=lambda n: (-safety[n], n))
                relevance = self.taxonomy.relevance(safety[best])
                closest = best
                if scores[self.taxonomy.not_safety] >= safety[best]:
                    closest, relevance = self.taxonomy.not_safety, relevance / 2
                relevance *= min(1.0, share / CONTENT_SHARE_FULL)  # a syntax latent is not about its windows' topic
                similarity = scores[closest]
            category = NO_CATEGORY  # too weak (or syntactic) evidence to name one: the label is the pattern alone
            if closest not in (None, self.taxonomy.not_safety) and relevance >= CATEGORY_EVIDENCE:
                category = closest
                text = f"{category}: {text}"
            text = _join([text, where], "; ")  # a content latent: its keywords, then where it fires if there is room
            labels[request.latent] = FeatureLabel(
                latent=request.latent, label=text, relevance=round(relevance, 3), category=category,
                labeller=NAME, model=self.model, version=VERSION,
                extra={"closest": closest, "similarity": similarity, "content_share": round(share, 3),
                       "contexts": len(request.contexts)})
        return labels


def make_offline_labeller(taxonomy: str | Path | None = None, **unknown) -> OfflineLabeller:
    if unknown:
        raise ConfigError(f"the offline labeller takes no option {', '.join(sorted(unknown))} "
                          "(--labeller-url is for a labeller with an endpoint, such as llm)")
    return OfflineLabeller(taxonomy)


@hookimpl
def register_feature_labellers(register):
    register(NAME, make_offline_labeller)
