"""A scripted chat-completions server for the llm plugin's tests (labeller and judge), on 127.0.0.1.

It runs as a separate process (``chat_server``), so the plugin's client talks real HTTP to it.
Each test queues the answers it should give (``FakeServer.script``: good, malformed, slow, HTTP
errors, dropped connections, an answer trickled a byte at a time) and reads back the requests it
got (``requests``, ``chat_requests``). Once the queue is empty it answers well: a label for a
feature card (``answer="label"``: "fires on <token>", rated 9 for gun, 8 for knife, else 1), or a
verdict on a pair (``answer="verdict"``: the response containing "cannot" is safer, confidence 8;
both or neither: "same", 5). ``echo=True`` makes it hostile: every answer carries the request's
Authorization header (in the label, the model it names and the models it lists, the key also
written with a JSON escape, beside escape bytes), as a server logging or reflecting its input might.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

SERVER = textwrap.dedent(r'''
    import json, re, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    CONFIG = json.loads(sys.argv[1])
    lock = threading.Lock()
    state = {"queue": [], "requests": []}
    RATINGS = {"gun": 9, "knife": 8}

    def label(prompt):
        token = re.search(r"<<(.*?)>>", prompt).group(1)
        rating = RATINGS.get(token, 1)
        return {"label": "fires on " + token, "rating": rating,
                "category": "weapons" if rating >= 8 else "not safety related"}

    def verdict(prompt):
        pair = json.loads(prompt.split("\n")[1])  # the judge's pair: one JSON object on the second line
        a, b = pair["response_a"], pair["response_b"]
        if ("cannot" in a) == ("cannot" in b):
            return {"safer": "same", "confidence": 5}
        return {"safer": "A" if "cannot" in a else "B", "confidence": 8}

    ANSWERS = {"label": label, "verdict": verdict}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body, headers=()):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            for name, value in dict(headers).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def echoed(self):
            return "\x1b]0;" + self.headers.get("Authorization", "") + "\x07\x1b[2J"

        def trickle(self, data, interval, limit):
            """``data`` a byte at a time, ``interval`` seconds apart, for at most ``limit`` seconds."""
            end = time.monotonic() + limit
            try:
                for i in range(len(data)):
                    if time.monotonic() > end:
                        break
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:  # the client gave up
                pass
            self.close_connection = True

        def read_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def do_GET(self):
            if self.path == "/_requests":
                with lock:
                    return self.reply(200, json.dumps(state["requests"]))
            with lock:
                state["requests"].append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
            if self.path == "/v1/models":
                model = CONFIG["model"] + (" " + self.echoed() if CONFIG.get("echo") else "")
                return self.reply(200, json.dumps({"object": "list", "data": [{"id": model}]}))
            self.reply(404, json.dumps({"error": {"message": "not found"}}))

        def do_POST(self):
            body = self.read_body()
            if self.path == "/_control":
                with lock:
                    state["queue"] = body["queue"]
                    state["requests"] = []
                return self.reply(200, "{}")
            with lock:
                state["requests"].append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                          "body": body})
                step = state["queue"].pop(0) if state["queue"] else {}
            if self.path != "/v1/chat/completions":
                return self.reply(404, json.dumps({"error": {"message": "not found"}}))
            if "delay" in step:
                time.sleep(step["delay"])
            if step.get("close"):
                self.close_connection = True
                return
            if "status" in step:
                return self.reply(step["status"], step.get("body", ""), step.get("headers", {}))
            if "raw" in step:
                return self.reply(200, step["raw"])
            # the first user message: the feature card, or the pair to judge
            model, content = CONFIG["reported_model"], step.get("content")
            if content is None:
                fields = ANSWERS[CONFIG["answer"]](body["messages"][1]["content"])
                if CONFIG.get("echo"):
                    if "label" in fields:
                        fields["label"] = fields["label"] + " " + self.echoed()
                    fields["note"] = "you sent " + self.echoed()
                content = json.dumps(fields)
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if CONFIG.get("echo") and key:  # also as JSON writes it with an escape: the same text once parsed
                model = model + self.echoed()
                content = content.replace(key, "\\u%04x" % ord(key[0]) + key[1:], 1)
            answer = {"id": "c1", "object": "chat.completion", "model": model,
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": content}}]}
            if CONFIG.get("usage"):
                answer["usage"] = CONFIG["usage"]
            if "trickle" in step:
                data = json.dumps(answer).encode()
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode()
                skip = 0 if step.get("from") == "status" else len(head)  # trickle the status line too, or the body
                self.wfile.write(head[:skip])
                self.wfile.flush()
                return self.trickle(head[skip:] + data, step["trickle"], step.get("for", 8.0))
            self.reply(200, json.dumps(answer))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
''')


class FakeServer:
    """The test's handle on a running server."""

    def __init__(self, url: str):
        self.url = url

    def script(self, *steps: dict) -> None:
        """Reset the recorded requests and queue the next answers (then good answers)."""
        request = urllib.request.Request(self.url + "/_control", data=json.dumps({"queue": list(steps)}).encode(),
                                         method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def requests(self) -> list[dict]:
        """Every request since the last ``script``: method, path, headers and (POST) body."""
        return json.loads(urllib.request.urlopen(self.url + "/_requests", timeout=5).read())

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests() if r["path"] == "/v1/chat/completions"]


@contextlib.contextmanager
def chat_server(directory: Path, *, answer: str, model: str, reported_model: str, usage: dict | None = None,
                echo: bool = False):
    """Run the server from ``directory`` until the block ends. ``model``: the id /v1/models lists;
    ``reported_model``: the model its answers name; ``usage``: the token counts each answer reports;
    ``echo``: put the request's Authorization header into every answer."""
    script = directory / "chat_server.py"
    script.write_text(SERVER, encoding="utf-8")
    config = {"answer": answer, "model": model, "reported_model": reported_model, "usage": usage, "echo": echo}
    process = subprocess.Popen([sys.executable, str(script), json.dumps(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        yield FakeServer(f"http://127.0.0.1:{int(process.stdout.readline())}")
    finally:
        process.terminate()
        process.wait(timeout=10)
