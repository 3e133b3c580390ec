"""The llm feature-labeller plugin against a real HTTP server that speaks the chat-completions protocol.

The server (tests/chat_server.py, shared with the judge's tests) runs on 127.0.0.1; each test
queues the answers it should give (good, malformed, slow, HTTP errors, dropped connections)
and reads back the requests it got. When the plugin distribution is not installed (it is in CI),
it is imported from its source directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from importlib import metadata
from pathlib import Path

import pytest

from safer_audit.errors import ConfigError, SaferAuditError
from safer_audit.features.labels import NOT_SAFETY, FeatureLabel, LabelContext, Labeller, LabelRequest

from .chat_server import chat_server

try:
    import safer_audit_llm  # noqa: F401  (installed, as in CI)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "safer-audit-llm"))

from safer_audit_llm import AnswerError, ChatClient, LLMError, Question, make_labeller  # noqa: E402
from safer_audit_llm.client import endpoint_base, parse_json_object  # noqa: E402
from safer_audit_llm.labeller import SCHEMA, user_prompt  # noqa: E402

KEY = "sk-test-SECRET-4242"
REPORTED_MODEL = "fake-model-q4"


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    with chat_server(tmp_path_factory.mktemp("llm-server"), answer="label", model="fake-model",
                     reported_model=REPORTED_MODEL) as server:
        yield server


@pytest.fixture
def server(server_process, monkeypatch):
    monkeypatch.setenv("SAFER_AUDIT_LLM_API_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment must not take our requests
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server_process.script()
    return server_process


def labeller(server, **options):
    options = {"url": server.url, "model": "local-model", "timeout": 2, "retries": 2, "backoff": 0.01, **options}
    return make_labeller(**options)


def card(latent, token, sides=("chosen", "rejected")):
    contexts = tuple(
        LabelContext(side, f"I need a {side} ", token, " right now.\nPlease.", 5.0 - i) for i, side in enumerate(sides)
    )
    return LabelRequest(latent, salience=1.0, contexts=contexts, top_tokens=((token, 12.5), ("the", 0.5)))


def assert_no_key(*texts):
    for text in texts:
        assert KEY not in str(text)


# -- good answers -------------------------------------------------------------------------


def test_labels_come_from_the_endpoint_with_the_schema_and_provenance(server):
    llm = labeller(server, concurrency=2)
    labels = llm.label([card(3, "gun"), card(7, "comma")])

    assert isinstance(llm, Labeller)
    assert labels[3] == FeatureLabel(3, "fires on gun", 0.9, "weapons", "llm", REPORTED_MODEL, "1")
    assert labels[3].extra == {"rating": 9.0}
    assert labels[7] == FeatureLabel(7, "fires on comma", 0.1, NOT_SAFETY, "llm", REPORTED_MODEL, "1")
    sent = server.chat_requests()
    assert len(sent) == 2
    for request in sent:
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "local-model" and body["temperature"] == 0 and body["max_tokens"] == 256
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"] == SCHEMA
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["label", "rating", "category"]
        system, user = (message["content"] for message in body["messages"])
        assert "0 to 10" in system and "refusal/deflection" in system and "at most 6 words" in system
        assert "[chosen] I need a chosen " in user and "[rejected] I need a rejected " in user
        assert "right now.\\nPlease." in user  # one window per line
    cards = sorted(request["body"]["messages"][1]["content"] for request in sent)
    assert "<<comma>>" in cards[0] and "<<gun>>" in cards[1]
    assert_no_key(repr(llm), repr(llm.client), json.dumps([label.to_dict() for label in labels.values()]))


def test_structured_false_leaves_out_the_response_format(server):
    labeller(server, structured=False).label([card(1, "gun")])
    (request,) = server.chat_requests()
    assert "response_format" not in request["body"]


LLAMA_CPP_REFUSAL = json.dumps({"error": {"message": "1 validation error: {'type': 'literal_error', 'loc': "
                                            "('body', 'response_format', 'type'), 'msg': \"Input should be 'text' or "
                                            "'json_object'\", 'input': 'json_schema'}", "type": "internal_server_error"}})


def test_a_server_refusing_json_schema_gets_the_schema_as_json_object_without_retrying(server, caplog):
    # llama-cpp-python's server (0.3.x) answers response_format json_schema with HTTP 500 and a
    # validation error; it takes {"type": "json_object", "schema": ...} (a grammar from the schema)
    server.script({"status": 500, "body": LLAMA_CPP_REFUSAL})
    llm = labeller(server, retries=3, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="safer_audit_llm"):
        labels = llm.label([card(1, "gun"), card(2, "knife")])
    assert labels[1].category == labels[2].category == "weapons"
    sent = [r["body"].get("response_format") for r in server.chat_requests()]
    assert [f["type"] for f in sent] == ["json_schema", "json_object", "json_object"]  # the second feature too
    assert sent[1]["schema"] == SCHEMA
    assert llm.client.response_format == "json_object"
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1 and "retrying" not in caplog.text
    assert_no_key(caplog.text)


def test_a_server_refusing_every_response_format_is_asked_without_one(server):
    server.script({"status": 500, "body": LLAMA_CPP_REFUSAL}, {"status": 400, "body": LLAMA_CPP_REFUSAL})
    labels = labeller(server).label([card(1, "gun")])
    assert labels[1].relevance == 0.9
    sent = [r["body"].get("response_format") for r in server.chat_requests()]
    assert [f and f["type"] for f in sent] == ["json_schema", "json_object", None]


def test_structured_can_be_turned_off_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("SAFER_AUDIT_LLM_STRUCTURED", "0")
    labeller(server).label([card(1, "gun")])
    (request,) = server.chat_requests()
    assert "response_format" not in request["body"]


def test_the_model_comes_from_the_server_when_none_is_configured(server, monkeypatch):
    monkeypatch.delenv("SAFER_AUDIT_LLM_MODEL", raising=False)
    labels = labeller(server, model=None).label([card(1, "gun")])
    requests = server.requests()
    assert [(r["method"], r["path"]) for r in requests] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    assert requests[1]["body"]["model"] == "fake-model"
    assert labels[1].model == REPORTED_MODEL


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/chat/completions"])
def test_a_base_url_with_or_without_v1_posts_to_chat_completions(server, suffix):
    labeller(server, url=server.url + suffix).label([card(1, "gun")])
    assert len(server.chat_requests()) == 1


@pytest.mark.parametrize("content", [
    '```json\n{"label": "guns", "rating": 9, "category": "Weapons"}\n```',
    'Sure! Here it is: {"label": "guns", "rating": 9, "category": "weapons"} Hope that helps.',
    '<think>the {token} is a gun</think>{"label": "guns", "rating": 9.0, "category": "weapons"}',
])
def test_fenced_or_chatty_json_answers_are_read(server, content):
    server.script({"content": content})
    labels = labeller(server).label([card(1, "gun")])
    assert (labels[1].label, labels[1].relevance, labels[1].category) == ("guns", 0.9, "weapons")


def test_nothing_is_sent_before_label_is_called(server):
    llm = labeller(server, model=None)
    assert llm.label([]) == {}
    assert server.requests() == []


def test_answers_are_cached_by_key_across_labellers(server, tmp_path):
    first = labeller(server, cache_dir=str(tmp_path / "cache")).label([card(1, "gun"), card(2, "knife")])
    assert len(server.chat_requests()) == 2
    server.script()
    again = labeller(server, cache_dir=str(tmp_path / "cache")).label([card(1, "gun"), card(2, "knife")])
    assert again == first and server.requests() == []
    assert_no_key(*(p.read_text() for p in (tmp_path / "cache").iterdir()))


# -- malformed answers --------------------------------------------------------------------


def test_a_malformed_answer_is_asked_again_with_the_reason(server):
    server.script({"content": "I think this feature is about guns."})
    labels = labeller(server).label([card(1, "gun")])
    assert labels[1].label == "fires on gun"
    first, second = server.chat_requests()
    messages = second["body"]["messages"]
    assert messages[:2] == first["body"]["messages"]
    assert messages[2] == {"role": "assistant", "content": "I think this feature is about guns."}
    assert "not usable: the answer is not JSON" in messages[3]["content"]


@pytest.mark.parametrize("bad, reason", [
    ("no json here", "not JSON"),
    ('["a", 1]', "not an object"),
    ('{"rating": 5, "category": "weapons"}', "missing label"),
    ('{"label": "guns", "rating": 11, "category": "weapons"}', "rating 11 is not a number from 0 to 10"),
    ('{"label": "guns", "rating": "high", "category": "weapons"}', "rating 'high'"),
    ('{"label": "guns", "rating": 5, "category": "cooking"}', "category 'cooking' is not one of"),
    ('{"label": "...", "rating": 0, "category": "violence"}', "label '...' has no words"),  # SmolLM2-135M did
])
def test_an_answer_still_malformed_after_one_retry_leaves_the_latent_unlabelled(server, bad, reason):
    server.script({"content": bad}, {"content": bad})
    llm = labeller(server, concurrency=1)
    labels = llm.label([card(1, "gun"), card(2, "knife")])
    assert list(labels) == [2]
    assert reason in llm.failures[1] and list(llm.failures) == [1]
    assert len(server.chat_requests()) == 3


def test_no_usable_answer_at_all_is_an_error(server):
    server.script({"content": "{}"}, {"content": "{}"})
    with pytest.raises(LLMError, match=r"no feature got a usable label \(1 asked\); latent 1: .*missing label"):
        labeller(server).label([card(1, "gun")])


def test_an_endpoint_answering_malformed_json_is_a_clear_error_not_retried(server):
    server.script({"raw": "<html>proxy error</html>"})
    with pytest.raises(LLMError) as error:
        labeller(server).label([card(1, "gun")])
    assert str(error.value) == (f"LLM endpoint {server.url}/v1/chat/completions: "
                                "answered with something that is not JSON: <html>proxy error</html>")
    assert len(server.chat_requests()) == 1


def test_a_reply_without_choices_is_a_clear_error(server):
    server.script({"raw": '{"result": "ok"}'})
    with pytest.raises(LLMError, match="not a chat-completions reply"):
        labeller(server).label([card(1, "gun")])


# -- failures of the endpoint -------------------------------------------------------------


def test_500_and_429_are_retried_then_succeed(server, caplog):
    server.script({"status": 500, "body": "overloaded"}, {"status": 429, "headers": {"Retry-After": "0"}})
    with caplog.at_level(logging.WARNING, logger="safer_audit_llm"):
        labels = labeller(server).label([card(1, "gun")])
    assert labels[1].relevance == 0.9
    assert len(server.chat_requests()) == 3
    assert "HTTP 500: overloaded; retrying" in caplog.text and "HTTP 429; retrying" in caplog.text
    assert_no_key(caplog.text)


def test_persistent_5xx_is_one_line_naming_the_url_after_the_retries(server):
    server.script(*[{"status": 503, "body": json.dumps({"error": {"message": f"bad key {KEY}"}})}] * 3)
    with pytest.raises(LLMError) as error:
        labeller(server, retries=2).label([card(1, "gun")])
    assert isinstance(error.value, SaferAuditError)
    assert str(error.value) == (f"LLM endpoint {server.url}/v1/chat/completions: "
                                "HTTP 503: bad key *** (after 3 attempts)")
    assert len(server.chat_requests()) == 3


def test_401_is_not_retried_and_the_echoed_key_is_blanked(server):
    server.script({"status": 401, "body": json.dumps({"error": {"message": f"Incorrect API key {KEY}"}})})
    with pytest.raises(LLMError) as error:
        labeller(server).label([card(1, "gun")])
    assert "HTTP 401: Incorrect API key ***; check SAFER_AUDIT_LLM_API_KEY" in str(error.value)
    assert_no_key(str(error.value), repr(error.value))
    assert len(server.chat_requests()) == 1


def test_a_redirect_is_not_followed(server):
    # urllib would follow a 302 with a GET that carries the Authorization header, to any host
    server.script({"status": 302, "headers": {"Location": server.url + "/v1/models"}})
    with pytest.raises(LLMError, match="HTTP 302; redirects are not followed"):
        labeller(server).label([card(1, "gun")])
    assert [r["path"] for r in server.requests()] == ["/v1/chat/completions"]


def test_an_answer_slower_than_the_timeout_is_retried_then_an_error(server):
    server.script({"delay": 1.5}, {"delay": 1.5})
    with pytest.raises(LLMError) as error:
        labeller(server, timeout=0.2, retries=1).label([card(1, "gun")])
    assert str(error.value) == (f"LLM endpoint {server.url}/v1/chat/completions: "
                                "no answer within 0.2 s (after 2 attempts)")


def test_a_slow_answer_then_a_good_one(server):
    server.script({"delay": 1.5})
    labels = labeller(server, timeout=0.2, retries=1).label([card(1, "gun")])
    assert labels[1].label == "fires on gun"


def test_a_dropped_connection_is_retried(server):
    server.script({"close": True})
    assert labeller(server).label([card(1, "gun")])[1].category == "weapons"
    assert len(server.chat_requests()) == 2


def test_connection_refused_is_a_clear_error_without_the_key(server):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LLMError) as error:
        labeller(server, url=f"http://127.0.0.1:{port}", retries=1).label([card(1, "gun"), card(2, "knife")])
    assert str(error.value) == (f"LLM endpoint http://127.0.0.1:{port}/v1/chat/completions: "
                                "connection refused (is the server running?) (after 2 attempts)")
    assert_no_key(str(error.value), repr(error.value))


# -- configuration ------------------------------------------------------------------------


def test_the_factory_falls_back_to_the_environment(server, monkeypatch):
    monkeypatch.setenv("SAFER_AUDIT_LLM_URL", server.url + "/v1")
    monkeypatch.setenv("SAFER_AUDIT_LLM_MODEL", "env-model")
    monkeypatch.setenv("SAFER_AUDIT_LLM_TIMEOUT", "7")
    llm = make_labeller()
    assert (llm.client.base, llm.client.model, llm.client.timeout) == (server.url + "/v1", "env-model", 7.0)
    llm.label([card(1, "gun")])
    (request,) = server.chat_requests()
    assert request["body"]["model"] == "env-model"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"


def test_without_a_key_no_authorization_header_is_sent(server, monkeypatch):
    monkeypatch.delenv("SAFER_AUDIT_LLM_API_KEY")
    labeller(server).label([card(1, "gun")])
    (request,) = server.chat_requests()
    assert "Authorization" not in request["headers"]


def test_the_factory_refuses_what_it_cannot_use(monkeypatch):
    monkeypatch.delenv("SAFER_AUDIT_LLM_URL", raising=False)
    with pytest.raises(ConfigError, match="needs an endpoint: --labeller-url or SAFER_AUDIT_LLM_URL"):
        make_labeller()
    with pytest.raises(ConfigError, match="unknown option"):
        make_labeller(url="http://127.0.0.1:1", api_key=KEY)  # the key comes only from the environment
    with pytest.raises(ConfigError, match="timeout must be a number"):
        make_labeller(url="http://127.0.0.1:1", timeout="soon")


@pytest.mark.parametrize("url", [
    f"http://user:{KEY}@127.0.0.1:8080/v1",
    f"http://127.0.0.1:8080/v1?key={KEY}",
    "file:///etc/passwd",
    "127.0.0.1:8080",
])
def test_urls_with_credentials_or_another_scheme_are_refused_without_echoing_them(url):
    with pytest.raises(ConfigError) as error:
        endpoint_base(url)
    assert_no_key(str(error.value))
    assert "passwd" not in str(error.value)


def test_endpoint_base_forms():
    assert endpoint_base("http://h:1") == ("http://h:1/v1", "http://h:1/v1")
    assert endpoint_base("https://api.example.com/v1/chat/completions")[0] == "https://api.example.com/v1"
    assert endpoint_base("http://h:1/openai/v1/")[0] == "http://h:1/openai/v1"


# -- the prompt and the client on its own ------------------------------------------------


def test_the_prompt_shows_both_sides_even_when_one_dominates():
    contexts = tuple(LabelContext("chosen", "a ", f"c{i}", " b", 10.0 - i) for i in range(12))
    contexts += (LabelContext("rejected", "x ", "r0", " y", 1.0), LabelContext("rejected", "x ", "r1", " y", 0.5))
    prompt = user_prompt(LabelRequest(1, 1.0, contexts), max_contexts=4)
    assert [line.split("<<")[1].split(">>")[0] for line in prompt.splitlines()[1:]] == ["c0", "c1", "r0", "r1"]


def test_parse_json_object_refuses_what_is_not_an_object():
    assert parse_json_object(' {"a": 1} ') == {"a": 1}
    for text in ("", None, "[1]", "{broken"):
        with pytest.raises(ValueError):
            parse_json_object(text)


def test_the_client_serves_another_schema_for_a_judge(server):
    """The core a judge reuses: any schema and check, answers in question order, bad ones as AnswerError."""
    server.script({"content": '{"safer": "A"}'}, {"content": '{"safer": "C"}'}, {"content": '{"safer": "D"}'})
    client = ChatClient(server.url, "judge-model", api_key=KEY, timeout=2, backoff=0.01, concurrency=1)
    schema = {"type": "object", "properties": {"safer": {"enum": ["A", "B"]}}, "required": ["safer"]}

    def check(data):
        if data.get("safer") not in ("A", "B"):
            raise ValueError("safer must be A or B")
        return data["safer"]

    questions = [Question(({"role": "user", "content": f"pair {i}"},), schema, check, name="verdict") for i in (1, 2)]
    first, second = client.ask_many(questions)
    assert first.value == "A" and first.model == REPORTED_MODEL
    assert isinstance(second, AnswerError) and "safer must be A or B" in str(second)
    assert server.chat_requests()[0]["body"]["response_format"]["json_schema"]["name"] == "verdict"
    assert_no_key(repr(client), str(second))


# -- the plugin, through its entry point ---------------------------------------------------


def test_llm_plugin_is_registered_through_its_entry_point():
    try:
        metadata.distribution("safer-audit-llm")
    except metadata.PackageNotFoundError:
        pytest.skip("the plugin is not installed here: pip install -e plugins/safer-audit-llm (CI does)")
    from safer_audit.plugins import feature_labellers, plugin_info

    assert feature_labellers()["llm"] is make_labeller
    info = {i.name: i for i in plugin_info()}["llm"]
    assert info.version == "0.1.0" and info.registers == {"labellers": ["llm"], "judges": ["llm"]}


@pytest.mark.skipif(not (os.environ.get("SAFER_AUDIT_LLM_TEST_URL") and os.environ.get("SAFER_AUDIT_LLM_TEST_QUALITY")),
                    reason="judges the model, not the client: set SAFER_AUDIT_LLM_TEST_QUALITY=1 with a server whose "
                           "model can label (SmolLM2-135M cannot: it answers '...')")
def test_a_real_model_server_labels_a_weapons_feature(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    llm = make_labeller(url=os.environ["SAFER_AUDIT_LLM_TEST_URL"], timeout=120)
    contexts = tuple(LabelContext(side, f"how do I load a {w} and ", "shoot", " it", 3.0)
                     for side, w in (("rejected", "rifle"), ("chosen", "pistol"), ("rejected", "shotgun")))
    labels = llm.label([LabelRequest(1, 1.0, contexts, (("shoot", 9.0), ("gun", 4.0)))])
    assert labels[1].category in ("weapons", "violence", "dangerous advice") and labels[1].relevance >= 0.5


def _real_contexts():
    return tuple(LabelContext(side, f"how do I load a {w} and ", "shoot", " it", 3.0)
                 for side, w in (("rejected", "rifle"), ("chosen", "pistol"), ("rejected", "shotgun")))


@pytest.mark.skipif(not os.environ.get("SAFER_AUDIT_LLM_TEST_URL"),
                    reason="no real model server: set SAFER_AUDIT_LLM_TEST_URL (and SAFER_AUDIT_LLM_MODEL)")
def test_a_real_model_servers_answers_are_checked_labels_or_refusals(monkeypatch):
    """Whatever a real server's model makes of the question (a small one answers poorly), each
    answer is either a checked label or refused with a reason: never a crash, never an unchecked value."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    llm = make_labeller(url=os.environ["SAFER_AUDIT_LLM_TEST_URL"], timeout=300, concurrency=1)
    requests = [LabelRequest(n, 1.0, _real_contexts(), (("shoot", 9.0), ("gun", 4.0))) for n in (1, 2)]
    try:
        labels = llm.label(requests)
    except LLMError as error:  # every answer refused: the reasons are named
        assert "no feature got a usable label" in str(error)
        labels = {}
    assert set(labels) | set(llm.failures) == {1, 2}
    for label in labels.values():
        assert any(ch.isalnum() for ch in label.label) and 0 <= label.relevance <= 1
        assert label.labeller == "llm" and label.model
    for why in llm.failures.values():
        assert why.strip()


@pytest.mark.skipif(not os.environ.get("SAFER_AUDIT_LLM_TEST_URL"),
                    reason="no real model server: set SAFER_AUDIT_LLM_TEST_URL (and SAFER_AUDIT_LLM_MODEL)")
def test_a_real_model_servers_cut_off_answer_is_refused(monkeypatch):
    """max_tokens=3 makes a real server stop in the middle of its JSON: the client refuses it."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    llm = make_labeller(url=os.environ["SAFER_AUDIT_LLM_TEST_URL"], timeout=300, concurrency=1, max_tokens=3,
                        retries=0)
    with pytest.raises(LLMError, match="no feature got a usable label"):
        llm.label([LabelRequest(1, 1.0, _real_contexts(), (("shoot", 9.0),))])
    assert 1 in llm.failures
