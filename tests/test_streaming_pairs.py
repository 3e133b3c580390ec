"""The driver's memory does not grow per pair by more than it must.

The pairs table is built a batch of pairs at a time (never every pair's Python objects at
once), and a scan's findings are made when they are read, not held with their texts until
the report is written; the report files are the same as a list of the findings gives.
"""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace

import polars as pl
import pytest

from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.data import load_pairs, readers
from safer_audit.pipeline import stages
from safer_audit.pipeline.scan import run_scan
from safer_audit.report.types import Finding, LazyFindings, Report, export_report

from .conftest import hh_records
from .test_report import make_report


def live_findings() -> int:
    gc.collect()
    return sum(type(o) is Finding for o in gc.get_objects())


@pytest.fixture(scope="module")
def scanned(tiny_llama_dir, tmp_path_factory):
    """A scan of 40 HH pairs, and how many Finding objects it left alive."""
    directory = tmp_path_factory.mktemp("stream")
    data = directory / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(40)), encoding="utf-8")
    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=directory / "cache"),
                        sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16)
    before = live_findings()
    result = run_scan(str(data), config)
    return result, live_findings() - before


def test_a_scan_holds_no_finding_until_it_is_read(scanned):
    result, held = scanned
    assert held <= 0  # the eager report held one Finding, with its texts, per pair
    findings = result.report.findings
    assert len(findings) == 40
    ranks = [f.rank for f in findings]
    assert ranks == list(range(1, 41))  # made in rank order
    assert [f.pair_id for f in findings] == [f.pair_id for f in findings]  # made again, the same
    suspicion = dict(zip(result.pairs["pair_id"].to_list(), result.suspicion.tolist(), strict=True))
    assert all(f.suspicion == suspicion[f.pair_id] for f in findings)
    by_id = {row["pair_id"]: row for row in result.pairs.iter_rows(named=True)}
    assert all((f.chosen, f.rejected, f.context, f.line) == (by_id[f.pair_id]["chosen"], by_id[f.pair_id]["rejected"],
                                                            by_id[f.pair_id]["context"], by_id[f.pair_id]["line"])
               for f in findings)
    assert findings[-1] == list(findings)[-1] and findings[3:5] == list(findings)[3:5]


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet", "md", "html"])
def test_made_findings_export_as_a_list_of_them_does(scanned, tmp_path, suffix):
    result, _ = scanned
    lazy = result.report
    assert not isinstance(lazy.findings, list)  # made as they are read
    eager = Report(lazy.run, lazy.features, list(lazy.findings))
    export_report(lazy, tmp_path / f"lazy.{suffix}")
    export_report(eager, tmp_path / f"eager.{suffix}")
    if suffix == "parquet":
        assert pl.read_parquet(tmp_path / "lazy.parquet").equals(pl.read_parquet(tmp_path / "eager.parquet"))
    else:
        assert (tmp_path / f"lazy.{suffix}").read_bytes() == (tmp_path / f"eager.{suffix}").read_bytes()
    assert lazy == eager


def numbered(n: int):
    def make(start: int, stop: int) -> list[Finding]:
        return [Finding(f"p{i}", "data.jsonl", i + 1, i + 1, "clean", -i, 0.0, None, None, [], "a", "b", "", [])
                for i in range(start, stop)]

    return make


def test_a_finding_read_by_index_keeps_its_changes():
    findings = LazyFindings(5, numbered(5))
    findings[2].category = "noisy"
    assert [f.category for f in findings] == ["clean", "clean", "noisy", "clean", "clean"]
    assert findings[-1].pair_id == "p4" and [f.pair_id for f in findings[1:4:2]] == ["p1", "p3"]
    with pytest.raises(IndexError):
        findings[5]


def test_changing_the_sequence_makes_every_finding_once():
    findings = LazyFindings(2500, numbered(2500))  # more than one batch
    findings.reverse()
    assert findings[0].pair_id == "p2499" and len(findings) == 2500
    findings.sort(key=lambda f: f.rank)
    findings[0] = replace(findings[0], pair_id="first")
    assert [f.pair_id for f in findings[:2]] == ["first", "p1"]
    del findings[0]
    assert len(findings) == 2499 and findings == list(findings)


class Tracked(list):
    """A message list that can be watched (a plain list cannot be weakly referenced)."""


def test_load_pairs_holds_one_batch_of_pairs_as_python_objects(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(23)), encoding="utf-8")
    whole = load_pairs(path).pairs
    monkeypatch.setattr(readers, "LOAD_BATCH", 5, raising=False)  # (absent from older code)
    alive: list[weakref.ref] = []
    most = 0
    pair = readers.PairReader._pair

    def watched(self, line, record):
        nonlocal most
        out = pair(self, line, record)
        out["chosen_messages"] = Tracked(out["chosen_messages"])
        alive.append(weakref.ref(out["chosen_messages"]))
        gc.collect()
        most = max(most, sum(ref() is not None for ref in alive))
        return out

    monkeypatch.setattr(readers.PairReader, "_pair", watched)
    batched = load_pairs(path).pairs
    assert most <= 5  # every pair's messages were held until the table was built
    assert batched.equals(whole) and batched.schema == whole.schema


@pytest.mark.parametrize("count", [0, 1, None])
def test_json_is_written_a_finding_at_a_time_as_json_dumps_writes_it_whole(tmp_path, count):
    report = make_report()  # texts with newlines, quotes, markup and control characters
    findings = sorted(report.findings, key=lambda f: f.rank)[:count]
    lazy = Report(report.run, report.features, LazyFindings(len(findings), lambda start, stop: findings[start:stop]))
    export_report(lazy, tmp_path / "report.json")
    whole = Report(report.run, report.features, findings)
    expected = json.dumps(whole.to_dict(), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    assert (tmp_path / "report.json").read_text(encoding="utf-8") == expected


def test_texts_are_rendered_a_range_of_pairs_at_a_time(tiny_llama_dir, tmp_path, monkeypatch):
    from safer_audit.model.activations import load_backend
    from safer_audit.model.texts import pair_texts

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(11)), encoding="utf-8")
    pairs = load_pairs(path).pairs
    backend = load_backend(ActivationConfig(model=str(tiny_llama_dir), layer=1))
    slices = []
    real_slice = pl.DataFrame.slice
    monkeypatch.setattr(stages, "TEXTS_BATCH", 4)
    monkeypatch.setattr(pl.DataFrame, "slice", lambda self, *a: slices.append(a) or real_slice(self, *a))
    texts = stages.rendered_texts(pairs, backend, tmp_path / "cache")
    assert slices[:3] == [(0, 4), (4, 4), (8, 4)]  # the messages of at most 4 pairs as Python objects at once
    assert list(texts) == pair_texts(pairs, backend)


def test_rendered_texts_are_read_back_from_a_file_as_they_were_written(tmp_path):
    """A scan's texts live in a temporary file (17 bytes a text in memory), read back by index, range,
    stride and in order exactly as rendered: non-ASCII, a lone surrogate, empty texts."""
    import sys

    from safer_audit.model import texts as texts_module
    from safer_audit.model.texts import PreparedText, SpooledTexts

    written = [PreparedText(f"\n\nHuman: {i} caf\u00e9 \U0001f600 " + "x" * (i % 7) * 300, 3 * i, i % 3 == 0)
               for i in range(25)]
    written[4] = PreparedText("", 0, True)
    written[9] = PreparedText("lone \ud800 surrogate", 5, False)
    texts = SpooledTexts(tmp_path)
    texts.extend(written[:10])
    texts.extend([])
    texts.extend(written[10:])
    assert len(texts) == 25
    assert [texts[i] for i in range(25)] == written
    assert texts[-1] == written[-1] and texts[3:11] == written[3:11] and texts[::4] == written[::4]
    assert texts[20:5] == [] and texts[5:100] == written[5:]
    with pytest.raises(IndexError):
        texts[25]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(texts_module, "SPOOL_READ", 4)
        assert list(texts) == written
    held = sum(sys.getsizeof(v) for v in vars(texts).values() if not hasattr(v, "fileno"))
    assert held < 1000 + 40 * len(texts) < sum(len(t.text) for t in written)
    assert not list(tmp_path.iterdir())  # unnamed: nothing to clean up


def test_extraction_reads_the_texts_it_runs_without_copying_them(tiny_llama_dir, tmp_path, monkeypatch):
    """Extraction from SpooledTexts writes the same shards as from a list, duplicates included, and
    keeps no PreparedText per text while it plans."""
    from safer_audit.model import activations
    from safer_audit.model.activations import extract_activations, load_backend
    from safer_audit.model.texts import SpooledTexts, pair_texts

    path = tmp_path / "pairs.jsonl"
    records = hh_records(9)
    records.append(dict(records[2]))  # the same texts twice
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pairs = load_pairs(path).pairs
    backend = load_backend(ActivationConfig(model=str(tiny_llama_dir), layer=1))
    listed = pair_texts(pairs, backend)
    spooled = SpooledTexts(tmp_path)
    spooled.extend(listed)
    shards = {}
    real_plan = activations.plan_missing
    for name, texts in (("list", listed), ("spooled", spooled)):
        config = ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64, batch_size=3,
                                  cache_dir=tmp_path / name)
        seen = []
        monkeypatch.setattr(activations, "plan_missing", lambda items, *a, seen=seen, **k: seen.append(items)
                            or real_plan(items, *a, **k))
        store = extract_activations(texts, backend, config)
        assert store.n_forward_texts == 18
        shards[name] = sorted(p.name for p in store.cache.directory.glob("shard-*"))
        if name == "spooled":
            (items,) = seen
            assert not any(isinstance(v, list) and v and isinstance(v[0], tuple) for v in vars(items).values())
    assert shards["list"] == shards["spooled"] and shards["list"]
