"""The data layer: every format and schema into one pairs table, pair ids, errors, findings."""

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from safer_audit import data
from safer_audit.data import (
    PAIR_SCHEMA,
    DataError,
    DataErrors,
    QualityFinding,
    find_quality_issues,
    iter_pairs,
    load_pairs,
    quality,
    sources,
    validate_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "fixtures" / "pairs"
HH_300 = ROOT / "fixtures" / "hh-harmless-300.jsonl"
HH_FULL = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def words(texts):
    """A stand-in tokenizer: one token per word."""
    return [len(text.split()) for text in texts]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_hh_gzip_fixture():
    result = load_pairs(PAIRS / "hh.jsonl.gz")
    assert (result.schema, result.records, result.skipped) == ("hh", 3, [])
    assert result.pairs.schema == pl.Schema(PAIR_SCHEMA)
    second = result.pairs.row(1, named=True)
    assert second["line"] == 2
    assert second["context"] == ("\n\nHuman: I want to get back at my neighbour.\n\nAssistant: What happened?"
                                 "\n\nHuman: His dog keeps barking at night.")
    assert second["rejected"] == "Play loud music at 3am every night until he moves."
    assert second["chosen_messages"][-1] == assistant(second["chosen"])
    assert second["chosen_messages"][:-1] == second["rejected_messages"][:-1]
    assert [m["role"] for m in second["chosen_messages"]] == ["user", "assistant", "user", "assistant"]


def test_plain_texts_are_pairs_with_an_empty_context():
    pairs = load_pairs(PAIRS / "plain.jsonl").pairs
    assert pairs["context"].to_list() == ["", ""]
    assert pairs.row(0, named=True)["chosen_messages"] == [assistant("Paris is the capital of France.")]


def test_prompt_csv_with_ids_and_a_multiline_cell():
    result = load_pairs(PAIRS / "prompt.csv")
    assert result.schema == "prompt"
    assert result.pairs["pair_id"].to_list() == ["q1", "q2", "q3"]
    assert result.pairs["line"].to_list() == [1, 2, 3]  # rows, the header not counted
    haiku = result.pairs.row(1, named=True)
    assert haiku["context"] == "\n\nHuman: Write a haiku about rain."
    assert haiku["chosen"].count("\n") == 2
    assert haiku["chosen_messages"] == [user("Write a haiku about rain."), assistant(haiku["chosen"])]


def test_messages_json_array_with_a_prompt_list():
    result = load_pairs(PAIRS / "messages.json")
    assert (result.schema, result.records) == ("messages", 2)
    first = result.pairs.row(0, named=True)
    assert first["context"] == "\n\nSystem: You are a careful assistant.\n\nHuman: How do I make my password stronger?"
    assert [m["role"] for m in first["chosen_messages"]] == ["system", "user", "assistant"]
    assert first["rejected"] == "Add a 1 at the end."
    assert result.pairs["line"].to_list() == [2, 26]  # where each element of the array starts


def test_json_array_read_in_tiny_chunks_is_the_same(monkeypatch):
    whole = load_pairs(PAIRS / "messages.json").pairs
    monkeypatch.setattr(sources, "_CHUNK", 7)
    assert load_pairs(PAIRS / "messages.json").pairs.equals(whole)


def test_ultrafeedback_parquet_does_not_repeat_the_prompt():
    result = load_pairs(PAIRS / "ultrafeedback.parquet")
    assert result.schema == "messages"
    first = result.pairs.row(0, named=True)
    assert first["chosen_messages"] == [user("Name a prime number above 10."), assistant("11 is prime.")]
    assert (first["context"], first["rejected"], first["line"]) == ("\n\nHuman: Name a prime number above 10.", "12 is prime.", 1)


def test_a_prompt_string_not_in_the_messages_is_prepended(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [{"prompt": "Hi?", "chosen": [assistant("Hello.")],
                                               "rejected": [assistant("Go away.")]}])
    pair = load_pairs(path).pairs.row(0, named=True)
    assert pair["chosen_messages"] == [user("Hi?"), assistant("Hello.")]


@pytest.mark.parametrize("preference, chosen, rejected", [
    ("better", "None really.", "Bleach and ammonia, bleach and vinegar: never mix them."),
    ("safer", "Bleach and ammonia, bleach and vinegar: never mix them.", "None really."),
])
def test_pku_preference_chooses_the_index(preference, chosen, rejected):
    result = load_pairs(PAIRS / "pku.jsonl", preference=preference)
    assert result.schema == "pku"
    pair = result.pairs.row(1, named=True)
    assert (pair["chosen"], pair["rejected"]) == (chosen, rejected)
    assert pair["context"] == "\n\nHuman: What household chemicals are dangerous together?"


def test_an_hh_prompt_field_is_parsed_as_a_transcript(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant: yes?\n\nHuman: well\n\nAssistant:",
                                              "chosen": " ok", "rejected": " no"}])
    pair = load_pairs(path).pairs.row(0, named=True)
    assert pair["chosen_messages"] == [user("hi"), assistant("yes?"), user("well"), assistant(" ok")]


def test_hh_fixture_is_the_head_of_the_real_file():
    if not HH_FULL.exists():
        pytest.skip(f"{HH_FULL} is not on this machine")
    full = load_pairs(HH_FULL)
    assert (full.schema, full.records, full.pairs.height) == ("hh", 2312, 2312)
    assert full.pairs["pair_id"].n_unique() == 2312
    head = load_pairs(HH_300).pairs
    assert head.drop("source").equals(full.pairs.head(300).drop("source"))
    with gzip.open(HH_FULL, "rt", encoding="utf-8") as lines:
        originals = [json.loads(line) for line in lines]
    for original, pair in zip(originals, full.pairs.iter_rows(named=True), strict=False):
        assert data.render_transcript(pair["chosen_messages"])[0] == original["chosen"]
        assert data.render_transcript(pair["rejected_messages"])[0] == original["rejected"]


def test_datasets_directory_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "c", "rejected": "r"}]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "one"))
    result = load_pairs(tmp_path / "one")
    assert (result.schema, result.pairs["line"].to_list()) == ("prompt", [1, 2])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[1:])}).save_to_disk(str(tmp_path / "two"))
    assert load_pairs(tmp_path / "two", split="test").pairs["context"].to_list() == ["\n\nHuman: q"]
    with pytest.raises(DataError, match="has splits train, test: choose one with --split"):
        load_pairs(tmp_path / "two")
    with pytest.raises(DataError, match='has no split "dev"'):
        load_pairs(tmp_path / "two", split="dev")


def test_a_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        load_pairs("hf://someone/some-dataset", split="train")
    assert str(caught.value) == "hf://someone/some-dataset: HF_HUB_OFFLINE is set, so hub datasets are not loaded"


def test_a_missing_path_that_looks_like_a_hub_id_is_not_looked_up(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError) as caught:
        load_pairs("someone/some-dataset")
    assert str(caught.value) == ("someone/some-dataset: no such file or directory; "
                                 "for a hub dataset write hf://someone/some-dataset")
    with pytest.raises(DataError, match="the hub was asked"):  # the explicit form still goes there
        load_pairs("hf://someone/some-dataset")


def test_pair_ids_from_content_and_from_id_fields_are_unique(tmp_path):
    pair = {"chosen": "a", "rejected": "b"}
    ids = load_pairs(write_jsonl(tmp_path / "d.jsonl", [pair, pair, {"chosen": "x", "rejected": "y"}, pair])).pairs["pair_id"]
    base = ids[0]
    assert len(base) == 16 and int(base, 16) >= 0
    assert ids.to_list() == [base, f"{base}-2", ids[2], f"{base}-3"]
    named = [{"id": 7, **pair}, {"id": "7", **pair}, {"id": "7-2", **pair}, {"id": None, **pair}]
    ids = load_pairs(write_jsonl(tmp_path / "e.jsonl", named)).pairs["pair_id"].to_list()
    assert ids == ["7", "7-2", "7-2-2", base]


def test_the_content_hash_depends_on_context_and_order(tmp_path):
    records = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
               {"prompt": "p", "chosen": "b", "rejected": "a"}]
    assert load_pairs(write_jsonl(tmp_path / "d.jsonl", records)).pairs["pair_id"].n_unique() == 3


def test_iter_pairs_streams_until_the_first_bad_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n{"chosen": 1, "rejected": "b"}\n')
    pairs = iter_pairs(path)
    assert next(pairs)["chosen"] == "a"
    with pytest.raises(DataErrors) as caught:
        next(pairs)
    assert [str(error) for error in caught.value.errors] == [
        f'{path}:2: field "rejected" is missing',
        f'{path}:3: field "chosen" must be a string, not a number',
    ]
    assert (caught.value.line, caught.value.field) == (2, "rejected")


def test_skip_invalid_keeps_the_rest_and_says_what_it_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": null, "rejected": "b"}\n[1]\n{"chosen": "c", "rejected": "d"}\n')
    result = load_pairs(path, skip_invalid=True)
    assert result.records == 4
    assert result.pairs["line"].to_list() == [1, 4]
    assert [(e.line, e.field, e.message) for e in result.skipped] == [
        (2, "chosen", "is null"), (3, None, "a record must be an object, not an array")]


def test_errors_stop_at_max_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"chosen": "a"}\n' * 30)
    with pytest.raises(DataErrors) as caught:
        load_pairs(path, max_errors=4)
    assert [error.line for error in caught.value.errors] == [1, 2, 3, 4]


@pytest.mark.parametrize("record, expected", [
    ({"chosen": [assistant("a")], "rejected": [{"role": "bot", "content": "b"}]},
     'field "rejected[0].role" must be one of user, assistant, system, not \'bot\''),
    ({"chosen": [assistant("a")], "rejected": [{"role": "assistant", "content": None}]},
     'field "rejected[0].content" is null'),
    ({"chosen": [user("a")], "rejected": [assistant("b")]}, 'field "chosen" must end with an assistant message'),
    ({"chosen": [assistant("a")], "rejected": "b"}, 'field "rejected" must be a list of messages, not a string'),
    ({"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 2},
     'field "better_response_id" must be 0 or 1, not 2'),
    ({"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": True},
     'field "better_response_id" must be 0 or 1, not a boolean'),
    ({"prompt": "p", "response_0": "a", "response_1": "b"}, 'field "better_response_id" is missing'),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a"},
     'field "rejected" must end with an Assistant turn'),
    ({"chosen": "a", "rejected": "b", "id": [1]}, 'field "id" must be a string or an integer, not an array'),
    ({"question": "a", "answer": "b"}, "cannot tell the schema from the fields (answer, question); expected "
     "chosen/rejected, prompt/chosen/rejected or prompt/response_0/response_1 (force one with --schema)"),
])
def test_record_errors_name_the_field(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert str(caught.value) == f"{path}:1: {expected}"


def test_a_forced_schema_is_used(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    pair = load_pairs(path, schema="hh").pairs.row(0, named=True)
    assert pair["context"] == ""  # the prompt is not a field of the hh schema
    with pytest.raises(DataError, match='field "response_0" is missing'):
        load_pairs(path, schema="pku")


def test_csv_message_lists_and_indices(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([user("hi"), assistant("hello")]).replace('"', '""')
    path.write_text(f'chosen,rejected\n"{messages}","[{{""role"": ""assistant"", ""content"": ""no""}}]"\n')
    result = load_pairs(path)
    assert result.schema == "messages"
    assert result.pairs.row(0, named=True)["rejected_messages"] == [assistant("no")]
    pku = tmp_path / "p.csv"
    pku.write_text("prompt,response_0,response_1,safer_response_id\np,a,b,1\nq,[laughs],d\n")
    with pytest.raises(DataErrors) as caught:
        load_pairs(pku, preference="safer")
    assert str(caught.value) == f'{pku}:2: field "safer_response_id" is missing'
    assert load_pairs(pku, preference="safer", skip_invalid=True).pairs["chosen"].to_list() == ["b"]


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"chosen": "a", "rejected": "b"}\r\n\r\n  \r\n{"chosen": "c"}\r\n')
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert str(caught.value) == f'{path}:4: field "rejected" is missing'
    assert load_pairs(path, skip_invalid=True).pairs["chosen"].to_list() == ["a"]
    array = tmp_path / "d.json"
    array.write_bytes(b'\xef\xbb\xbf\r\n[\r\n{"chosen": "a", "rejected": "b"},\r\n\r\n{"chosen": "c", "rejected": "d"}\r\n]\r\n')
    assert load_pairs(array).pairs["line"].to_list() == [3, 5]


def test_jsonl_under_a_json_name(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "d"}])
    assert load_pairs(path).pairs["line"].to_list() == [1, 2]


def test_findings_of_each_kind():
    findings = find_quality_issues(load_pairs(PAIRS / "findings.jsonl").pairs, max_length=20, count_tokens=words)
    assert [(f.kind, f.line, f.detail) for f in findings] == [
        ("duplicate", 2, "duplicate of line 1"),
        ("contradiction", 4, "line 3 has the same responses the other way round"),
        ("identical", 5, "chosen and rejected responses are identical"),
        ("empty_response", 6, "rejected response is empty"),
        ("context_mismatch", 7, "chosen and rejected contexts differ at message 1"),
        ("truncated", 8, "chosen response has 72 tokens (max_length 20)"),
    ]
    assert all(isinstance(f, QualityFinding) and f.source.endswith("findings.jsonl") for f in findings)


def test_findings_from_dicts_equal_findings_from_the_table():
    pairs = load_pairs(PAIRS / "findings.jsonl").pairs
    assert find_quality_issues(list(iter_pairs(PAIRS / "findings.jsonl"))) == find_quality_issues(pairs)


def test_truncation_needs_a_token_counter_and_counts_in_batches():
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return words(texts)

    checker = quality.QualityChecker(max_length=3, count_tokens=counting, batch_size=2)
    found = [f for pair in iter_pairs(PAIRS / "hh.jsonl.gz") for _, f in checker.add(pair)]
    found += [f for _, f in checker.flush()]
    assert calls == [8, 4]
    assert [f.line for f in found] == [1, 2, 3]
    assert checker.context_cut == 3
    with pytest.raises(ValueError, match="max_length needs count_tokens"):
        find_quality_issues([], max_length=5)


def test_validate_dataset_summary():
    summary = validate_dataset(PAIRS / "findings.jsonl", max_length=20, count_tokens=words, examples=1)
    assert (summary.schema, summary.schema_detected, summary.records, summary.pairs, summary.skipped) == ("hh", True, 8, 8, 0)
    assert summary.findings == dict.fromkeys(data.FINDING_KINDS, 1)
    assert summary.context_cut == 1
    as_dict = json.loads(json.dumps(summary.to_dict()))
    assert as_dict["findings"]["duplicate"] == {"count": 1, "first": [{
        "kind": "duplicate", "pair_id": summary.examples["duplicate"][0].pair_id,
        "source": str(PAIRS / "findings.jsonl"), "line": 2, "detail": "duplicate of line 1"}]}
    assert "truncated" not in validate_dataset(PAIRS / "findings.jsonl").findings


def test_the_embedded_tokenizer_counts_tokens():
    count = data.token_counter()
    short, long = count(["Sunny.", " ".join(["weather"] * 50)])
    assert short == 4  # [CLS] sunny . [SEP]
    assert long == 52
    with pytest.raises(ValueError, match="no such model directory"):
        data.token_counter("/nonexistent/model")
