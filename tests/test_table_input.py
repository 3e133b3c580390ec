"""run_scan and the readers take the tables a data pipeline holds, with the checks a file gets."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import polars as pl
import pytest

import safer_audit
from safer_audit.data import TABLE, DataError, load_pairs, validate_dataset
from safer_audit.pipeline.scan import run_scan

from .conftest import FIXTURES, hh_records, tiny_scan_config

datasets = pytest.importorskip("datasets")

# one file per schema, and the records it holds as a list of dicts
SCHEMA_FILES = {"hh": "hh.jsonl.gz", "prompt": "prompt.csv", "messages": "messages.json", "pku": "pku.jsonl"}
KINDS = {
    "polars": pl.DataFrame,
    "pandas": pd.DataFrame,
    "list": list,
    "datasets": datasets.Dataset.from_list,
}
SAME = ["pair_id", "context", "chosen", "rejected", "chosen_messages", "rejected_messages"]


def _records(schema: str) -> list[dict]:
    path = FIXTURES / "pairs" / SCHEMA_FILES[schema]
    if schema == "prompt":
        return [{k: v for k, v in row.items()} for row in pd.read_csv(path).to_dict("records")]
    if schema == "messages":
        return json.loads(path.read_text(encoding="utf-8"))
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("schema", SCHEMA_FILES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_table_reads_as_the_file_does(kind, schema):
    from_file = load_pairs(FIXTURES / "pairs" / SCHEMA_FILES[schema])
    from_table = load_pairs(KINDS[kind](_records(schema)))
    assert from_table.schema == schema == from_file.schema
    assert from_table.pairs.select(SAME).to_dicts() == from_file.pairs.select(SAME).to_dicts()
    assert from_table.pairs["source"].unique().to_list() == [TABLE]
    assert from_table.pairs["line"].to_list() == list(range(len(from_file.pairs)))  # the record's index


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_record_is_named_by_its_index(kind):
    rows = hh_records(6)
    rows[3] = {**rows[3], "chosen": None}  # a table's column holds one type: a missing value is what it can hold
    rows[5] = {"chosen": rows[5]["chosen"]}  # no rejected at all (a list of dicts), null in a DataFrame
    with pytest.raises(DataError) as raised:
        load_pairs(KINDS[kind](rows))
    lines = str(raised.value).splitlines()
    assert lines[0].startswith(f'{TABLE}:3: field "chosen" '), lines
    assert lines[1].startswith(f'{TABLE}:5: field "rejected" '), lines
    summary = validate_dataset(KINDS[kind](rows), skip_invalid=True)
    assert summary.pairs == 4 and [e.line for e in summary.skipped_errors] == [3, 5]


def test_a_table_is_not_a_path_and_a_split_applies_only_to_datasets():
    with pytest.raises(DataError, match=r"<table>: is a table: only datasets"):
        load_pairs(hh_records(3), split="train")
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(hh_records(3)),
                                test=datasets.Dataset.from_list(hh_records(2)))
    assert len(load_pairs(both, split="test").pairs) == 2
    with pytest.raises(DataError, match="has splits"):
        load_pairs(both)
    with pytest.raises(DataError, match=r"<table>: contains no records"):
        load_pairs([])


@pytest.fixture(scope="module")
def file_scan(tmp_path_factory, tiny_llama_dir, data_file):
    cache = tmp_path_factory.mktemp("cache")
    return cache, run_scan(str(data_file), tiny_scan_config(tiny_llama_dir, cache))


@pytest.mark.parametrize("kind", KINDS)
def test_run_scan_takes_each_kind_of_table(kind, file_scan, tiny_llama_dir, data_file):
    cache, expected = file_scan
    records = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    result = run_scan(KINDS[kind](records), tiny_scan_config(tiny_llama_dir, cache))
    got = result.report.to_frame()
    want = expected.report.to_frame()
    assert got.select("pair_id", "rank", "category").to_dicts() == want.select("pair_id", "rank", "category").to_dicts()
    assert got["suspicion"].to_list() == pytest.approx(want["suspicion"].to_list())
    assert result.report.run.data_source == TABLE and set(got["source"]) == {TABLE}
    assert got["line"].sort().to_list() == list(range(len(records)))


def test_the_library_scan_takes_a_table_and_reports_a_bad_record_before_any_model(tmp_path):
    rows = hh_records(30)
    rows[12] = {**rows[12], "rejected": None}
    with pytest.raises(DataError, match=r'<table>:12: field "rejected" '):
        safer_audit.scan(pl.DataFrame(rows))  # the data is read before any model is loaded


def test_the_python_docs_pipeline_example_runs_as_written(tiny_llama_dir, tmp_path, monkeypatch):
    """docs/python.md's example, on the committed sample; only the model is swapped for the tiny one."""
    import re
    import shutil

    from .conftest import ROOT

    page = (ROOT / "docs" / "python.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- python-example -->\n```python\n(.*?)```\n<!-- /python-example -->", page, re.S).group(1)
    (tmp_path / "fixtures").mkdir()
    shutil.copy(FIXTURES / "hh-harmless-300.jsonl", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    scan = safer_audit.scan
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache")
    monkeypatch.setattr(safer_audit, "scan", lambda source, **options: scan(source, config, **options))
    namespace: dict = {}
    exec(compile(code, "docs/python.md", "exec"), namespace)  # noqa: S102 (the documented example, as written)
    suspects, pairs = namespace["suspects"], namespace["pairs"]
    assert 0 < suspects.height < pairs.height == 300
    cleaned = pl.read_parquet("cleaned.parquet")
    assert cleaned.height == pairs.height - suspects.height
    rows, lines = pairs.to_dicts(), set(suspects["line"])
    assert cleaned.to_dicts() == [row for index, row in enumerate(rows) if index not in lines]
    for finding in suspects.iter_rows(named=True):  # a table's line is the index of the pair's own row
        assert rows[finding["line"]]["chosen"].rstrip().endswith(finding["chosen"].rstrip())
