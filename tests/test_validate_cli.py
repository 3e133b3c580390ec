"""``safer-audit validate``: the summary, the JSON, exit statuses and one-line errors for bad input."""

import gzip
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "fixtures" / "pairs"
GOOD = b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: go away"}\n'


def validate(*args):
    # Wide enough that rich does not wrap the table cells the tests look for.
    return CliRunner().invoke(cli, ["validate", *map(str, args)], env={"COLUMNS": "200"})


def test_summary_of_a_clean_file():
    result = validate(ROOT / "fixtures" / "hh-harmless-300.jsonl")
    assert result.exit_code == 0, result.output
    assert "│ records read │ 300 " in result.stdout
    assert "│ schema       │ hh (detected) " in result.stdout
    assert "truncated" in result.stdout and "not checked (give --max-length)" in result.stdout
    assert result.stderr == ""


def test_findings_are_counted_and_located():
    result = validate(PAIRS / "findings.jsonl")
    assert result.exit_code == 0
    assert "line 2: duplicate of line 1" in result.stdout
    assert "line 7: chosen and rejected contexts differ at message 1" in result.stdout


def test_json_summary():
    result = validate(PAIRS / "pku.jsonl", "--format", "json", "--preference", "safer", "--schema", "pku")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert {key: summary[key] for key in ("schema", "schema_detected", "records", "pairs", "skipped", "usable")} == {
        "schema": "pku", "schema_detected": False, "records": 2, "pairs": 2, "skipped": 0, "usable": True}
    assert set(summary["findings"]) == {"duplicate", "contradiction", "identical", "empty_response", "context_mismatch"}


def test_max_length_with_a_model_counts_truncation(tiny_bert_dir):
    result = validate(PAIRS / "findings.jsonl", "--format", "json", "--max-length", "40", "--model", tiny_bert_dir)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["max_length"] == 40
    assert summary["findings"]["truncated"]["count"] == 1
    assert summary["findings"]["truncated"]["first"][0]["line"] == 8
    assert summary["context_cut"] == 1


def test_model_without_max_length_is_a_usage_error():
    result = validate(PAIRS / "plain.jsonl", "--model", "somewhere")
    assert result.exit_code == 2
    assert "--model only counts tokens for --max-length" in result.stderr


def test_a_missing_model_directory_is_one_line(tmp_path):
    result = validate(PAIRS / "plain.jsonl", "--max-length", "8", "--model", tmp_path / "none")
    assert result.exit_code == 2
    assert result.stderr == f"Error: cannot load the tokenizer of {tmp_path / 'none'}: {tmp_path / 'none'}: no such model directory\n"


def gz(content: bytes) -> bytes:
    return gzip.compress(content, mtime=0)


MALFORMED = [
    ("data.jsonl", GOOD + b'{"chosen": "a"}\n', 'data.jsonl:2: field "rejected" is missing'),
    ("data.jsonl", b'{"chosen": null, "rejected": "b"}\n', 'data.jsonl:1: field "chosen" is null'),
    ("data.jsonl", b'{"chosen": ["a"], "rejected": "b"}\n',
     'data.jsonl:1: field "chosen[0]" must be an object, not a string'),
    ("data.jsonl", b'{"chosen": 3, "rejected": "b"}\n', 'data.jsonl:1: field "chosen" must be a string, not a number'),
    ("data.jsonl", GOOD + b'{"chosen": "a", "rejec', 'data.jsonl:2: invalid JSON: Unterminated string starting at (column 17)'),
    ("data.jsonl", b'{"chosen": "caf\xe9", "rejected": "b"}\n', "data.jsonl:1: invalid UTF-8 at byte 16"),
    ("data.jsonl", b"", "data.jsonl: contains no records"),
    ("data.jsonl", b"\n  \r\n\n", "data.jsonl: contains no records"),
    ("data.jsonl", b'"just a string"\n', "data.jsonl:1: a record must be an object, not a string"),
    ("data.jsonl.gz", b"not gzip at all", "data.jsonl.gz: corrupt gzip file (Not a gzipped file (b'no'))"),
    ("data.jsonl.gz", gz(GOOD * 200)[:-30],
     "data.jsonl.gz: corrupt gzip file (Compressed file ended before the end-of-stream marker was reached)"),
    ("data.json", b'[\n' + GOOD + b',\n{"chosen": "a"', "data.json:4: invalid JSON: Expecting ',' delimiter"),
    ("data.json", b'[' + GOOD + b'} ]', "data.json:2: invalid JSON: expected ',' or ']'"),
    ("data.json", b'[' + GOOD + b'] [', "data.json:2: invalid JSON: extra data after the array"),
    ("data.json", b'[]', "data.json: contains no records"),
    ("data.json", b'[{"chosen": "a", "rejected": "\xff"}]', "data.json:1: invalid UTF-8"),
    ("data.parquet", b"PAR1 not really", "data.parquet: not a readable Parquet file (Parquet magic bytes not found "
                                         "in footer. Either the file is corrupted or this is not a parquet file.)"),
    ("data.csv", b"prompt,chosen,rejected\np,a,b\np,\xff,b\n", 'data.csv:2: field "chosen" is not valid UTF-8'),
    ("data.csv", b'prompt,chosen,rejected\np,"a,b\n', "data.csv:1: invalid CSV: unexpected end of data"),
    ("data.txt", GOOD, "data.txt: unsupported file type; expected .jsonl, .jsonl.gz, .json, .parquet, .csv "
                       "or a datasets directory"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED)
def test_malformed_input_is_one_line_and_exit_2(tmp_path, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    Path(name).write_bytes(content)
    result = validate(name)
    assert (result.exit_code, result.stderr) == (2, f"Error: {message}\n")
    assert result.stdout == ""
    assert Path(name).read_bytes() == content  # inputs are never modified
    assert os.listdir(".") == [name]  # and nothing is written beside them


def test_a_path_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = validate("missing.jsonl")
    assert (result.exit_code, result.stderr) == (2, "Error: missing.jsonl: no such file or directory\n")


def test_a_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = validate("hf://someone/some-dataset", "--split", "train")
    assert result.exit_code == 2
    assert result.stderr == "Error: hf://someone/some-dataset: HF_HUB_OFFLINE is set, so hub datasets are not loaded\n"
    bare = validate("someone/some-dataset", "--split", "train")
    assert (bare.exit_code, bare.stderr) == (
        2, "Error: someone/some-dataset: no such file or directory; for a hub dataset write hf://someone/some-dataset\n")


def test_the_first_ten_errors_are_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_bytes(GOOD + b'{"chosen": "a"}\n' * 12)
    result = validate("data.jsonl")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f'Error: data.jsonl:{line}: field "rejected" is missing' for line in range(2, 12)]


def test_skip_invalid_counts_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_bytes(GOOD + b'{"chosen": "a"}\n' + b"{oops\n" + GOOD)
    result = validate("data.jsonl", "--skip-invalid", "--format", "json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["records"], summary["pairs"], summary["skipped"]) == (4, 2, 2)
    assert summary["skipped_errors"] == ['data.jsonl:2: field "rejected" is missing',
                                         "data.jsonl:3: invalid JSON: Expecting property name enclosed in double "
                                         "quotes (column 2)"]
    assert summary["findings"]["duplicate"]["count"] == 1
    text = validate("data.jsonl", "--skip-invalid")
    assert 'skipped data.jsonl:2: field "rejected" is missing' in text.stdout


def test_nothing_usable_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_bytes(b'{"chosen": "a"}\n{"chosen": "b"}\n')
    result = validate("data.jsonl", "--skip-invalid")
    assert result.exit_code == 2
    assert result.stderr == "Error: data.jsonl: no usable pairs (2 of 2 records skipped)\n"


def test_a_datasets_directory_with_splits(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk("ds")
    result = validate("ds")
    assert (result.exit_code, result.stderr) == (2, "Error: ds: has splits train, test: choose one with --split\n")
    assert validate("ds", "--split", "test").exit_code == 0
    on_a_file = validate(PAIRS / "plain.jsonl", "--split", "test")
    assert on_a_file.exit_code == 2
    assert "only datasets directories and hub datasets have splits" in on_a_file.stderr
