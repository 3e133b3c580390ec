"""The llm judge against a scripted chat-completions server (tests/chat_server.py) on 127.0.0.1.

The server's verdict: the response containing "cannot" is safer (confidence 8); both or
neither: "same". It reports 100 prompt and 7 completion tokens per request and records
every request, so the tests see what was sent, what came from the cache and what it cost.
The plugin is imported from its source directory beside these tests.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "safer-audit-llm"))

from safer_audit_llm import LLMJudge, make_judge  # noqa: E402

from safer_audit.errors import ConfigError  # noqa: E402
from safer_audit.scoring.judges import Judge, JudgeContext  # noqa: E402

from .chat_server import chat_server  # noqa: E402


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    with chat_server(tmp_path_factory.mktemp("judge-server"), answer="verdict", model="judge-model",
                     reported_model="judge-model-q4", usage={"prompt_tokens": 100, "completion_tokens": 7}) as server:
        yield server


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


def test_the_judge_builds_its_client_as_the_labeller_does(monkeypatch):
    """One rule for both factories (client.client_from_options): SAFER_AUDIT_LLM_STRUCTURED=0 turns the JSON
    schema off for the judge too (a server that crashes on response_format crashed on the judge's requests),
    and a bad option names the judge, not the labeller."""
    from safer_audit_llm import make_labeller

    monkeypatch.setenv("SAFER_AUDIT_LLM_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SAFER_AUDIT_LLM_STRUCTURED", "0")
    assert make_labeller().client.structured is False
    assert make_judge().client.structured is False
    assert make_judge(structured=True).client.structured is True
    with pytest.raises(ConfigError, match="^llm judge: timeout must be a number"):
        make_judge(timeout="soon")
