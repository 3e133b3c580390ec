"""The llm judge against a scripted chat-completions server started here on 127.0.0.1.

The server's verdict: the response containing "cannot" is safer (confidence 8); both or
neither: "same". It reports 100 prompt and 7 completion tokens per request and records
every request, so the tests see what was sent, what came from the cache and what it cost.
The plugin is imported from its source directory beside these tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "safer-audit-llm"))

from safer_audit_llm import LLMJudge, make_judge  # noqa: E402

from safer_audit.errors import ConfigError  # noqa: E402
from safer_audit.judges import Judge, JudgeContext  # noqa: E402

SERVER = textwrap.dedent(r'''
    import json, re, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    lock = threading.Lock()
    state = {"queue": [], "requests": []}

    def verdict(prompt):
        a = re.search(r"=== Response A ===\n(.*?)\n\n=== Response B ===", prompt, re.S).group(1)
        b = re.search(r"=== Response B ===\n(.*?)\n\nWhich", prompt, re.S).group(1)
        if ("cannot" in a) == ("cannot" in b):
            return {"safer": "same", "confidence": 5}
        return {"safer": "A" if "cannot" in a else "B", "confidence": 8}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/_requests":
                with lock:
                    return self.reply(200, json.dumps(state["requests"]))
            with lock:
                state["requests"].append({"path": self.path})
            if self.path == "/v1/models":
                return self.reply(200, json.dumps({"data": [{"id": "judge-model"}]}))
            self.reply(404, "{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if self.path == "/_control":
                with lock:
                    state["queue"], state["requests"] = body["queue"], []
                return self.reply(200, "{}")
            with lock:
                state["requests"].append({"path": self.path, "body": body})
                step = state["queue"].pop(0) if state["queue"] else {}
            content = step.get("content") or json.dumps(verdict(body["messages"][1]["content"]))
            self.reply(200, json.dumps({"model": "judge-model-q4", "usage": {"prompt_tokens": 100,
                                        "completion_tokens": 7},
                                        "choices": [{"message": {"role": "assistant", "content": content}}]}))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
''')


class FakeServer:
    def __init__(self, url):
        self.url = url

    def script(self, *steps):
        request = urllib.request.Request(self.url + "/_control", data=json.dumps({"queue": list(steps)}).encode(),
                                         method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def chat_requests(self):
        requests = json.loads(urllib.request.urlopen(self.url + "/_requests", timeout=5).read())
        return [r for r in requests if r["path"] == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    script = tmp_path_factory.mktemp("judge-server") / "server.py"
    script.write_text(SERVER, encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        yield FakeServer(f"http://127.0.0.1:{int(process.stdout.readline())}")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def server(server_process, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("SAFER_AUDIT_LLM_URL", "SAFER_AUDIT_LLM_MODEL", "SAFER_AUDIT_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    server_process.script()
    return server_process


def table(*rows):
    return pl.DataFrame({"context": [f"Human: question {i}?" for i in range(len(rows))],
                         "chosen": [c for c, _ in rows], "rejected": [r for _, r in rows]})


REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how to do it."


def test_the_judge_gives_a_signed_signal_and_its_cost(server, tmp_path):
    judge = make_judge(server.url, cache_dir=str(tmp_path / "verdicts"), concurrency=2)
    assert isinstance(judge, Judge) and isinstance(judge, LLMJudge)
    values = judge.judge(JudgeContext(table((REFUSE, COMPLY), (COMPLY, REFUSE), (COMPLY, COMPLY + "!"))))
    assert values.tolist() == pytest.approx([0.8, -0.8, 0.0])
    assert judge.cost == {"pairs": 3, "cached": 0, "unusable": 0, "requests": 3, "prompt_tokens": 300,
                          "completion_tokens": 21}
    sent = server.chat_requests()
    assert len(sent) == 3 and all(r["body"]["model"] == "judge-model" for r in sent)
    assert sent[0]["body"]["response_format"]["json_schema"]["name"] == "safer_response"


def test_verdicts_are_cached_by_pair_digest_and_a_flipped_pair_reuses_them(server, tmp_path):
    cache = str(tmp_path / "verdicts")
    make_judge(server.url, cache_dir=cache).judge(JudgeContext(table((REFUSE, COMPLY), (COMPLY, REFUSE + " No."))))
    server.script()
    judge = make_judge(server.url, cache_dir=cache)
    values = judge.judge(JudgeContext(table((COMPLY, REFUSE), (COMPLY, REFUSE + " No."))))  # the first flipped
    assert values.tolist() == pytest.approx([-0.8, -0.8])
    assert server.chat_requests() == []
    assert judge.cost["cached"] == 2 and judge.cost["requests"] == 0 and judge.cost["prompt_tokens"] == 0


def test_the_judge_uses_the_scan_cache_directory_when_given_none(server, tmp_path):
    context = JudgeContext(table((REFUSE, COMPLY)), cache_dir=tmp_path / "judges")
    make_judge(server.url).judge(context)
    assert list((tmp_path / "judges" / "llm").glob("*.json"))


def test_an_unusable_verdict_is_no_opinion(server, tmp_path):
    server.script({"content": '{"safer": "C", "confidence": 3}'}, {"content": '{"safer": "maybe"}'})
    judge = make_judge(server.url, cache_dir=str(tmp_path / "v"), concurrency=1, backoff=0.01)
    values = judge.judge(JudgeContext(table((REFUSE, COMPLY), (COMPLY, REFUSE))))
    assert math.isnan(values[0]) and values[1] == pytest.approx(-0.8)
    assert judge.cost["unusable"] == 1 and judge.cost["requests"] == 3


def test_making_and_listing_the_judge_sends_nothing_and_it_needs_an_endpoint(server):
    import safer_audit_llm

    from safer_audit import plugins

    make_judge(server.url)
    plugins.load_plugins()
    registered_here = plugins.pm.get_plugin("llm") is None
    if registered_here:  # not installed: register the source module as its entry point would
        plugins.pm.register(safer_audit_llm, name="llm")
    try:
        assert plugins.judges()["llm"] is make_judge
        assert {i.name: i for i in plugins.plugin_info()}["llm"].registers["judges"] == ["llm"]
    finally:
        if registered_here:
            plugins.pm.unregister(name="llm")
    assert server.chat_requests() == []
    with pytest.raises(ConfigError, match="SAFER_AUDIT_LLM_URL"):
        make_judge()
