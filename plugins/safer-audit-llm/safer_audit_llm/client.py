"""A small client for OpenAI-compatible chat-completions endpoints that answer in JSON.

Shared by the feature labeller and the LLM judge. ``ChatClient.ask`` sends one
conversation with a JSON schema, parses and checks the answer, retries what can be
retried and caches the parsed answer by key; ``ask_many`` asks several questions on a
small thread pool. Standard library only (urllib). Nothing is sent until a question is
asked: constructing a client opens no connection.

The API key is kept in a private attribute and only ever put in the Authorization
header; error messages, logs and ``repr`` never show it, and every text an endpoint sends
back (answers, the model it names, error bodies) has it blanked out before it is used,
cached or shown.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safer_audit.common.files import read_bounded, write_atomic
from safer_audit.errors import ConfigError, SaferAuditError, inert

log = logging.getLogger("safer_audit_llm")

FORMATS = ("json_schema", "json_object", None)  # response_format forms, tried in this order
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a chat answer bounded by max_tokens is far smaller
MAX_ERROR_BYTES = 64 * 1024  # of an error's body read for its message (scrubbed whole, then cut)
MAX_NAME = 200  # characters kept of a model name an endpoint gives
MAX_RETRY_DELAY = 30.0  # seconds; also the most a Retry-After header can make us wait
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class LLMError(SaferAuditError):
    """The endpoint could not be used: unreachable, too slow, refusing, or not speaking the protocol."""


class AnswerError(LLMError, ValueError):
    """An answer that is not what was asked for (not JSON, missing fields, out of range), even after a retry."""


# ------------------------------------------------------------------- URLs


def endpoint_base(url: str) -> tuple[str, str]:
    """``(base, shown)``: the ``.../v1`` base to post to, and the same without anything secret.

    Accepts ``http://host:port``, ``http://host:port/v1`` or the full
    ``.../v1/chat/completions``. Credentials or a query in the URL are refused: the key
    belongs in the environment, never in a URL that ends up in logs and error messages.
    """
    url = str(url).strip()
    bad = next((i for i, ch in enumerate(url) if ch.isspace() or inert(ch) != ch), None)
    if bad is not None:  # urllib would drop some (tab, newline) and choke on others only when sending
        raise ConfigError(f"LLM endpoint URL: character {bad + 1} is a control character or a space; "
                          "give a plain http:// or https:// URL")
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
        host = ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"LLM endpoint URL must be http:// or https:// with a host and port, not {inert(parts.scheme or '')}://"
            f"{inert(netloc)}..."
        )
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ConfigError(
            f"LLM endpoint URL {parts.scheme}://{inert(netloc)}/...: no credentials, query or fragment in the URL; "
            "put an API key in SAFER_AUDIT_LLM_API_KEY"
        )
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    if not path.endswith("/v1"):
        path += "/v1"
    base = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
    return base, inert(base)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: urllib would follow them with the Authorization header to any host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# ------------------------------------------------------------------- the deadline of an attempt


class _Deadline:
    """The end of one attempt: connecting, sending, the status line, the headers and the body together.

    A socket timeout bounds each read, and a server sending a byte every few seconds restarts it
    for ever; so when the deadline passes, the attempt's sockets are shut down, which ends any
    read blocked on them, and ``expired`` says why the attempt failed.
    """

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return max(self.end - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


class _Deadlined:
    """A connection that connects within what is left of its attempt's deadline, then hands that deadline its
    socket (for TLS, once the handshake is done: until then each of its reads is bounded by what was left)."""

    def __init__(self, host, *, deadline: _Deadline, **kwargs):
        kwargs["timeout"] = deadline.left()
        super().__init__(host, **kwargs)
        self.deadline = deadline

    def connect(self):
        self.timeout = self.deadline.left()
        super().connect()
        self.deadline.watch(self.sock)


class _Watched(_Deadlined, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Deadlined, http.client.HTTPSConnection):
    pass


class _DeadlineHTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_Watched, req, deadline=req.deadline)


class _DeadlineHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPS, req, deadline=req.deadline)


# ------------------------------------------------------------------- answers


_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.S)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def parse_json_object(text: str | None) -> dict:
    """The JSON object in a model's answer: plain JSON, JSON in a ```json fence, or the
    outermost ``{...}`` of a chattier answer (after dropping any ``<think>`` block)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the answer is empty")
    text = _THINK.sub("", text).strip()
    candidates = [text]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            continue
        if isinstance(data, dict):
            return data
        raise ValueError("the answer is JSON but not an object")
    raise ValueError(f"the answer is not JSON: {_excerpt(text)}")


def _excerpt(text: object, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return inert(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class Answer:
    """A checked answer, the model the endpoint says produced it, and whether it came from the cache."""

    value: Any
    model: str | None
    cached: bool = False


@dataclass(frozen=True)
class Question:
    """One conversation to send; ``check(parsed_json)`` returns the value or raises ValueError."""

    messages: tuple[dict, ...]
    schema: dict
    check: Callable[[dict], Any]
    name: str = "answer"
    key: str | None = None  # cache key; derived from the request when None


class _Unusable(Exception):
    """A cached answer that cannot be read (missing, not a regular file, too large): it is asked again."""


class DirCache:
    """Parsed answers as JSON files, one per key, in a directory (each written atomically)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def get(self, key: str, default=None):
        try:  # bounded: an answer is at most MAX_RESPONSE_BYTES, so a larger file is not one we wrote
            return json.loads(read_bounded(self._path(key), MAX_RESPONSE_BYTES, _Unusable))
        except (_Unusable, ValueError, RecursionError):  # missing or damaged: ask again
            return default

    def __setitem__(self, key: str, value) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(key), json.dumps(value, ensure_ascii=False))


class _FormatRefused(Exception):
    """The server refused the request's ``response_format``: try the next form, not the same again."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _Transient(Exception):
    """A failure worth another attempt; ``what`` says what happened, without secrets."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.what, self.retry_after = what, retry_after


# ------------------------------------------------------------------- the client


class ChatClient:
    """Chat completions with JSON-schema-constrained answers: retried, timed out, cached by key.

    ``timeout`` bounds each attempt as a whole (connecting, sending, the whole answer), in seconds,
    however slowly the server sends. ``retries``
    more attempts follow a connection error, a timeout, HTTP 408/429 or 5xx, waiting
    ``backoff * 2**n`` seconds (or what Retry-After says, at most 30 s). An answer that
    fails its check is asked again ``answer_retries`` times, telling the model what was
    wrong.

    The answer is constrained by the JSON schema where the server can: first the OpenAI form
    (``response_format: {type: json_schema}``: vLLM, Ollama, hosted APIs), and if the server
    refuses that, llama-cpp-python's (``{type: json_object, schema}``, a grammar from the
    schema), then no ``response_format`` at all (the prompt asks for JSON; the answer is
    checked either way). ``structured=False`` starts without it. ``response_format`` says
    which form is in use.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        answer_retries: int = 1,
        max_tokens: int = 256,
        concurrency: int = 4,
        structured: bool = True,
        cache=None,
    ):
        self.base, self.shown_url = endpoint_base(url)
        self.model = model or None
        self.__api_key = api_key or None
        if not (timeout > 0 and retries >= 0 and backoff >= 0 and answer_retries >= 0):
            raise ConfigError("LLM client: timeout must be > 0, retries, backoff and answer retries >= 0")
        if not (max_tokens >= 1 and concurrency >= 1):
            raise ConfigError("LLM client: max_tokens and concurrency must be at least 1")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.answer_retries, self.max_tokens = int(answer_retries), int(max_tokens)
        self.concurrency, self.structured = int(concurrency), bool(structured)
        self.response_format = "json_schema" if self.structured else None  # see FORMATS
        self.cache = {} if cache is None else cache
        self._opener = urllib.request.build_opener(_NoRedirect, _DeadlineHTTP, _DeadlineHTTPS)
        self._model_lock = threading.Lock()
        self._stop = threading.Event()
        self._usage_lock = threading.Lock()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}  # chat requests sent, and their cost

    def __repr__(self) -> str:
        key = "set" if self.__api_key else "none"
        return f"ChatClient(url={self.shown_url!r}, model={self.model_name!r}, api_key={key})"

    # -- HTTP

    def _scrub(self, text: str) -> str:
        """``text`` with the API key blanked out, should an endpoint or a library echo it. Whatever is cut
        short for a message is cut after this, so no part of the key survives at a cut."""
        return text.replace(self.__api_key, "***") if self.__api_key else text

    def _scrub_data(self, value):
        """A parsed answer with the key blanked out of every string in it (keys of objects too); ValueError
        when it is nested too deeply to walk."""
        def walk(item):
            if isinstance(item, str):
                return self._scrub(item)
            if isinstance(item, dict):
                return {self._scrub(str(k)): walk(v) for k, v in item.items()}
            if isinstance(item, list):
                return [walk(v) for v in item]
            return item

        try:
            return walk(value)
        except RecursionError:
            raise ValueError("the answer is nested too deeply") from None

    def endpoint_text(self, value: object) -> str | None:
        """A name an endpoint gives (the ``model`` of an answer, a listed model id) as text safe to keep and show:
        the key blanked out, control characters written out, at most MAX_NAME characters; None if not text."""
        if not isinstance(value, str) or not value.strip():
            return None
        return inert(self._scrub(value))[:MAX_NAME]

    @property
    def model_name(self) -> str | None:
        """The configured or listed model, as endpoint_text keeps it (what labels record)."""
        return self.endpoint_text(self.model)

    def _fail(self, path: str, what: str) -> LLMError:
        return LLMError(self._scrub(f"LLM endpoint {self.shown_url}{path}: {what}"))

    def _once(self, path: str, body: dict | None) -> dict:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        request.deadline = _Deadline(self.timeout)  # read by _DeadlineHTTP(S)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            self._http_error(path, exc, request.deadline)
        except urllib.error.URLError as exc:
            raise _Transient(_describe(exc.reason, self.timeout, request.deadline.expired)) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts and drops while reading
            raise _Transient(_describe(exc, self.timeout, request.deadline.expired)) from None
        finally:
            request.deadline.cancel()
        if request.deadline.expired:  # the answer was cut short when its sockets were shut
            raise _Transient(_describe(None, self.timeout, True))
        if len(raw) > MAX_RESPONSE_BYTES:
            raise self._fail(path, f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            text = self._scrub(raw.decode("utf-8", "replace"))
            raise self._fail(path, f"answered with something that is not JSON: {_excerpt(text)}") from None
        if not isinstance(reply, dict):
            raise self._fail(path, "answered JSON that is not an object")
        return reply

    def _http_error(self, path: str, exc: urllib.error.HTTPError, deadline: _Deadline):
        try:
            text = self._scrub(exc.read(MAX_ERROR_BYTES).decode("utf-8", "replace"))
        except Exception:  # the body is only for the message
            text = ""
        finally:
            exc.close()
        if deadline.expired:
            raise _Transient(_describe(None, self.timeout, True))
        try:
            detail = json.loads(text).get("error", text)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, AttributeError, RecursionError):
            detail = text
        what = f"HTTP {exc.code}" + (f": {_excerpt(self._scrub(str(detail)), 200)}" if str(detail).strip() else "")
        if exc.code in (400, 422, 500) and "response_format" in text:
            # llama-cpp-python answers an unknown response_format with a validation error (as HTTP 500)
            raise _FormatRefused(what)
        if exc.code in RETRY_STATUSES:
            raise _Transient(what, _retry_after(exc.headers.get("Retry-After"))) from None
        hint = {
            401: "; check SAFER_AUDIT_LLM_API_KEY",
            403: "; check SAFER_AUDIT_LLM_API_KEY",
            404: "; give the server's base URL (e.g. http://127.0.0.1:8080) and a model it serves",
        }.get(exc.code, "")
        if 300 <= exc.code < 400:
            hint = "; redirects are not followed, give the final URL"
        raise self._fail(path, what + hint) from None

    def _send(self, path: str, body: dict | None = None) -> dict:
        attempts = self.retries + 1
        last = None
        for attempt in range(attempts):
            if self._stop.is_set():
                raise self._fail(path, "stopped after another request failed")
            try:
                return self._once(path, body)
            except _Transient as exc:
                last = exc
                if attempt + 1 < attempts:
                    delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2**attempt
                    log.warning("%s", self._scrub(f"LLM endpoint {self.shown_url}{path}: {exc.what}; retrying"))
                    time.sleep(min(delay, MAX_RETRY_DELAY))
        raise self._fail(path, f"{last.what} (after {attempts} attempt{'s' if attempts > 1 else ''})")

    # -- models

    def resolve_model(self) -> str:
        """The configured model, else the first one the server lists (llama.cpp and vLLM serve one)."""
        with self._model_lock:
            if self.model is None:
                reply = self._send("/models")
                models = reply.get("data") if isinstance(reply.get("data"), list) else []
                ids = [m.get("id") for m in models if isinstance(m, dict) and self.endpoint_text(m.get("id"))]
                if not ids:
                    raise self._fail("/models", "lists no model; set SAFER_AUDIT_LLM_MODEL")
                self.model = ids[0]
            return self.model

    # -- questions

    def request_body(self, messages: Sequence[dict], schema: dict, name: str = "answer") -> dict:
        body = {
            "model": self.resolve_model(),
            "messages": list(messages),
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "strict": True, "schema": schema},
            }
        elif self.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema}
        return body

    def _refused(self, refused: str | None, what: str) -> None:
        """The server refused ``response_format`` form ``refused``: fall back to the next one (once, for all threads)."""
        with self._model_lock:
            if self.response_format != refused:
                return  # another thread fell back already
            if refused is None:
                raise self._fail("/chat/completions", what)
            self.response_format = FORMATS[FORMATS.index(refused) + 1]
            log.warning("%s", self._scrub(f"LLM endpoint {self.shown_url}: response_format {refused} refused "
                                          f"({what}); using {self.response_format or 'none'}"))

    def ask(self, question: Question) -> Answer:
        """Send one question; return its checked answer, or raise AnswerError (bad answers) or LLMError."""
        messages = list(question.messages)
        body = self.request_body(messages, question.schema, question.name)
        # the endpoint is part of the key: the same request to another server is another answer
        key = question.key or hashlib.sha256(json.dumps([self.base, body], sort_keys=True).encode()).hexdigest()
        hit = self.cache.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("data"), dict):
            try:  # checked as a fresh answer is: a cache written by hand or by an older version is data too
                return Answer(question.check(self._scrub_data(hit["data"])), self.endpoint_text(hit.get("model")),
                              cached=True)
            except ValueError:
                pass  # a cached answer the check now refuses: ask again
        problem = ""
        for _ in range(self.answer_retries + 1):
            while True:
                try:
                    reply = self._send("/chat/completions", body)
                    break
                except _FormatRefused as exc:
                    self._refused(body.get("response_format", {}).get("type"), exc.what)
                    body = self.request_body(body["messages"], question.schema, question.name)
            self._count(reply)
            model = self.endpoint_text(reply.get("model"))
            try:
                content = _content(reply)
            except (LookupError, TypeError):
                what = "answered without choices[0].message: not a chat-completions reply"
                raise self._fail("/chat/completions", what) from None
            if isinstance(content, str):
                content = self._scrub(content)  # before anything quotes or cuts it
            try:
                data = self._scrub_data(parse_json_object(content))  # also the key written with JSON escapes
                value = question.check(data)
            except ValueError as exc:
                problem = str(exc)
                # Say what was wrong: at temperature 0 the same prompt would give the same answer.
                body = self.request_body(
                    messages + [
                        {"role": "assistant", "content": content if isinstance(content, str) else ""},
                        {"role": "user", "content": f"That answer is not usable: {problem}. "
                                                    "Answer again with only the JSON object asked for."},
                    ],
                    question.schema, question.name,
                )
                continue
            self.cache[key] = {"data": data, "model": model}
            return Answer(value, model)
        tries = self.answer_retries + 1
        raise AnswerError(self._scrub(
            f"LLM endpoint {self.shown_url}/chat/completions: no usable answer in {tries} attempt"
            f"{'s' if tries > 1 else ''}: {inert(problem)}"
        ))

    def _count(self, reply: dict) -> None:
        """Add one answered request and the tokens its ``usage`` reports (servers that omit it count 0)."""
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        with self._usage_lock:
            self.usage["requests"] += 1
            for name in ("prompt_tokens", "completion_tokens"):
                value = usage.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    self.usage[name] += value

    def ask_many(self, questions: Sequence[Question]) -> list[Answer | AnswerError]:
        """Ask every question, ``concurrency`` at a time, answers in question order.

        A question whose answer stays unusable gives its AnswerError in its place; an
        endpoint failure (unreachable, timing out, HTTP error) stops the rest and is raised.
        """
        if not questions:
            return []
        self.resolve_model()  # once, before the threads
        self._stop.clear()
        results: list = [None] * len(questions)

        def one(question):
            try:
                return self.ask(question)
            except AnswerError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions))) as pool:
            futures = {pool.submit(one, q): i for i, q in enumerate(questions)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
            except BaseException:
                self._stop.set()  # requests still retrying give up at their next attempt
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results


def _content(reply: dict):
    choice = reply["choices"][0]
    message = choice["message"]
    if not isinstance(message, dict):
        raise LookupError("message")
    return message.get("content")


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None  # an HTTP date, or absent: use our own backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _describe(reason: object, timeout: float, expired: bool = False) -> str:
    if expired or isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(reason, socket.gaierror):
        return "host not found"
    if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError)):
        return "the server closed the connection"
    return _excerpt(f"{type(reason).__name__}: {reason}" if isinstance(reason, Exception) else reason, 200)


# ------------------------------------------------------------------- the factories' client

ENV_URL = "SAFER_AUDIT_LLM_URL"
ENV_MODEL = "SAFER_AUDIT_LLM_MODEL"
ENV_API_KEY = "SAFER_AUDIT_LLM_API_KEY"
ENV_TIMEOUT = "SAFER_AUDIT_LLM_TIMEOUT"
ENV_STRUCTURED = "SAFER_AUDIT_LLM_STRUCTURED"  # 0/false/no: send no response_format (a server that crashes on it)


def option_number(who: str, name: str, value, kind=float):
    """``value`` as a finite number >= 0, or a ConfigError naming ``who`` (``llm labeller``) and the option."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: {name} must be a number, not {inert(repr(value))[:40]}") from None
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"{who}: {name} must be a finite number >= 0, not {inert(repr(value))[:40]}")
    return number


def client_from_options(who: str, *, url: str | None, model: str | None, timeout, concurrency, retries, backoff,
                        max_tokens, structured, cache_dir: str | None, url_option: str = "") -> ChatClient:
    """The ChatClient of the ``llm`` labeller or judge (``who``), one rule for both: ``url``, ``model``,
    ``timeout`` and ``structured`` default to SAFER_AUDIT_LLM_URL, _MODEL, _TIMEOUT (60 s) and _STRUCTURED
    (0/false/no: off; else on); the API key comes only from SAFER_AUDIT_LLM_API_KEY; ``cache_dir`` keeps
    answers across runs. ``url_option`` names the command-line option that gives the URL, if there is one.
    Sends nothing."""
    url = url or os.environ.get(ENV_URL)
    if not url:
        raise ConfigError(f"the {who} needs an endpoint: {url_option + ' or ' if url_option else ''}{ENV_URL} "
                          "(e.g. http://127.0.0.1:8080 for a local llama.cpp server)")
    timeout = timeout if timeout is not None else os.environ.get(ENV_TIMEOUT) or 60.0
    structured = structured if structured is not None else os.environ.get(ENV_STRUCTURED, True)
    return ChatClient(
        url,
        model or os.environ.get(ENV_MODEL) or None,
        api_key=os.environ.get(ENV_API_KEY) or None,
        timeout=option_number(who, "timeout", timeout),
        retries=int(option_number(who, "retries", retries)),
        backoff=option_number(who, "backoff", backoff),
        max_tokens=int(option_number(who, "max_tokens", max_tokens)),
        concurrency=int(option_number(who, "concurrency", concurrency)),
        structured=structured if isinstance(structured, bool) else str(structured).lower() not in ("0", "false", "no"),
        cache=DirCache(cache_dir) if cache_dir else None,
    )
