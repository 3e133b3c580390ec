"""A scan's pairs table out of memory (data.PairTable).

The driver keeps each pair's id, source, line and response lengths; the conversations go to
an unnamed temporary file and are read back by range or by index. Every reader of a scan's
pairs gets the same rows a polars table gives, and a scan gives the same report from either.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.data import PAIR_SCHEMA, PairTable, load_pairs, response_lengths, spool_pairs
from safer_audit.data import table as table_module
from safer_audit.pipeline.scan import run_scan, scan_profile

from .conftest import hh_records


def _records() -> list[dict]:
    records = hh_records(23)
    records[3]["chosen"] += " caf\u00e9 \u2603 \U0001f600 \"quoted\" \\ back"  # non-ASCII and JSON's own characters
    records[5]["rejected"] = records[5]["rejected"].rsplit("Assistant:", 1)[0] + "Assistant:"  # an empty response
    return records


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    return path


def test_spooled_pairs_read_back_as_the_table_they_replace(data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "READ_ROWS", 4)  # several reads, one a short one
    whole = load_pairs(data_file).pairs
    spooled = spool_pairs(data_file, tmp_path / "cache").pairs
    assert isinstance(spooled, PairTable) and len(spooled) == len(whole) == 23
    assert spooled.to_frame().equals(whole) and spooled.to_frame().schema == pl.Schema(PAIR_SCHEMA)
    assert list(spooled.iter_rows(named=True)) == list(whole.iter_rows(named=True))
    assert list(spooled) == list(whole.iter_rows(named=True))
    assert spooled.rows(20, 99) == list(whole.slice(20).iter_rows(named=True))
    assert spooled.take([7, 0, 22, 7]) == list(whole[[7, 0, 22, 7]].iter_rows(named=True))
    for name in PAIR_SCHEMA:
        assert spooled[name].equals(whole[name]), name
    assert response_lengths(spooled) == response_lengths(whole)
    assert 0 in response_lengths(spooled)[1]  # the empty response counted as 0
    with pytest.raises(IndexError):
        spooled.take([23])
    assert PairTable.of(spooled) is spooled


def test_only_ids_sources_lines_and_lengths_stay_in_memory(data_file, tmp_path):
    whole = load_pairs(data_file).pairs
    spooled = spool_pairs(data_file, tmp_path / "cache").pairs
    assert spooled.table.columns == ["pair_id", "source", "line", "chosen_chars", "rejected_chars"]
    assert spooled.table.estimated_size() * 10 < whole.estimated_size()
    assert not any((tmp_path / "cache").iterdir())  # the texts' file has no name: nothing is left behind


def test_a_table_given_as_polars_is_spooled_in_batches(data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "READ_ROWS", 5)
    whole = load_pairs(data_file).pairs
    assert PairTable.of(whole, tmp_path).to_frame().equals(whole)
    assert len(PairTable.of(whole.head(0), tmp_path)) == 0 and PairTable.of(whole.head(0)).to_frame().is_empty()


def test_a_scan_reads_the_pairs_from_disk_and_reports_as_from_a_table(tiny_llama_dir, data_file, tmp_path):
    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache"),
                        sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16)
    spooled = run_scan(str(data_file), config)
    assert isinstance(spooled.pairs, PairTable)
    # what run_scan runs, before it adds the suspects' evidence and why
    polars_table = scan_profile(load_pairs(data_file).pairs, config, source=str(data_file))
    findings = [vars(f) | {"evidence": [], "judge_evidence": [], "why": None} for f in spooled.report.findings]
    again = [vars(f) for f in polars_table.report.findings]
    assert findings == again and len(findings) == 23
    rows = {row["pair_id"]: row for row in load_pairs(data_file).pairs.iter_rows(named=True)}
    assert all((f["chosen"], f["rejected"], f["context"]) == (rows[f["pair_id"]]["chosen"],
                                                              rows[f["pair_id"]]["rejected"],
                                                              rows[f["pair_id"]]["context"]) for f in findings)
