"""clean: selection, byte-for-byte copies in every format, refusals, atomic writes, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.data import DataError, load_pairs
from safer_audit.report.types import Finding, Report, RunInfo
from safer_audit.workflows import clean as clean_module
from safer_audit.workflows.clean import CleanError, clean_dataset, select_pairs

from .conftest import FIXTURES, hh_records

PAIRS = FIXTURES / "pairs"


def make_report(path: Path, categories: dict[int, str] | None = None, *, data_source: str | None = None,
                skip_invalid: bool = False) -> Report:
    """A report of ``path`` by hand: pairs ranked in file order, suspicion falling from 1."""
    pairs = load_pairs(path, skip_invalid=skip_invalid).pairs
    n = len(pairs)
    findings = [
        Finding(pair_id=row["pair_id"], source=str(path), line=row["line"], rank=i + 1,
                category=(categories or {}).get(i, "clean"), suspicion=1 - i / n, score_safe=i / n - 0.5,
                reward_margin=0.0, sae_margin=0.0, quality=[], chosen=row["chosen"], rejected=row["rejected"],
                context=row["context"], top_features=[])
        for i, row in enumerate(pairs.iter_rows(named=True))
    ]
    run = RunInfo(tool_version="0.1.0", model="m", model_hash=None, layer=1, positions="response", max_length=64,
                  sae_path="sae", sae_hash=None, sae_fvu=None, n_features=1, ranking="suspicion", thresholds={},
                  timings={}, pairs=n, counts={}, data_source=data_source or str(path), created="2026-01-01T00:00:00")
    return Report(run, [], findings)


def write_report(report: Report, path: Path) -> Path:
    path.write_text(json.dumps(report.to_dict()), encoding="utf-8")
    return path


def invoke(*args):
    # wide enough that rich does not wrap the dry-run table
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "250"})


def sides(path: Path) -> list[tuple[str, str, str]]:
    return [(r["context"], r["chosen"], r["rejected"]) for r in load_pairs(path).pairs.iter_rows(named=True)]


# Awkward JSON Lines: CRLF and LF endings, a blank line, non-ASCII, no newline at the end.
JSONL = (
    b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: caf\xc3\xa9 \xf0\x9f\x99\x82", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\r\n'
    b'{"rejected": "\\n\\nHuman: a\\n\\nAssistant: x",   "chosen": "\\n\\nHuman: a\\n\\nAssistant: y"}\n'
    b"\n"
    b'{"chosen": "\\n\\nHuman: b\\n\\nAssistant: kind", "rejected": "\\n\\nHuman: b\\n\\nAssistant: cruel", "id": 7}\n'
    b'{"chosen": "\\n\\nHuman: c\\n\\nAssistant: \\u00e9", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}'
)


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(JSONL)
    return path


def test_drop_keeps_every_other_line_byte_for_byte(jsonl, tmp_path):
    report = make_report(jsonl, {1: "flipped", 3: "noisy"})  # pairs on lines 2 and 5
    result = clean_dataset(jsonl, tmp_path / "clean.jsonl", report)
    lines = JSONL.splitlines(keepends=True)
    assert (tmp_path / "clean.jsonl").read_bytes() == b"".join([lines[0], lines[2], lines[3]])
    assert [(c.line, c.action) for c in result.changes] == [(2, "drop"), (5, "drop")]
    assert jsonl.read_bytes() == JSONL


def test_flip_swaps_only_the_selected_records(jsonl, tmp_path):
    report = make_report(jsonl, {0: "flipped", 2: "noisy"})
    clean_dataset(jsonl, tmp_path / "clean.jsonl", report, mode="flip")
    before, after = JSONL.splitlines(keepends=True), (tmp_path / "clean.jsonl").read_bytes().splitlines(keepends=True)
    assert after[1:] == before[1:]  # noisy pairs are not flipped: only "flipped" claims swapped labels
    assert after[0].endswith(b"\r\n")
    assert json.loads(after[0]) == {"chosen": "\n\nHuman: hi\n\nAssistant: no",
                                    "rejected": "\n\nHuman: hi\n\nAssistant: café 🙂"}
    old, new = sides(jsonl), sides(tmp_path / "clean.jsonl")
    assert new[0] == (old[0][0], old[0][2], old[0][1]) and new[1:] == old[1:]


def test_selection_rules():
    report = make_report(PAIRS / "findings.jsonl", {0: "flipped", 1: "noisy", 2: "quality"})
    by_fraction = select_pairs(report, drop_fraction=0.25)  # 8 pairs: ranks 1 and 2
    assert [f.rank for f, _ in by_fraction.picked] == [1, 2]
    assert "rank 2 of 8" in by_fraction.picked[1][1]
    assert [f.rank for f, _ in select_pairs(report, threshold=0.75).picked] == [1, 2, 3]
    assert [f.rank for f, _ in select_pairs(report).picked] == [1, 2, 3]
    assert [f.rank for f, _ in select_pairs(report, mode="flip").picked] == [1]
    with pytest.raises(CleanError, match="not both"):
        select_pairs(report, drop_fraction=0.1, threshold=0.5)


@pytest.mark.parametrize("name", ["hh.jsonl.gz", "plain.jsonl", "prompt.csv", "messages.json",
                                  "ultrafeedback.parquet", "pku.jsonl"])
@pytest.mark.parametrize("mode", ["drop", "flip"])
def test_every_format_and_schema(name, mode, tmp_path):
    source = tmp_path / name
    shutil.copy(PAIRS / name, source)
    out = tmp_path / f"clean-{name}"
    clean_dataset(source, out, make_report(source, {1: "flipped"}), mode=mode)
    old, new = sides(source), sides(out)
    assert load_pairs(out).schema == load_pairs(source).schema
    if mode == "drop":
        assert new == old[:1] + old[2:]
    else:
        assert new == [old[0], (old[1][0], old[1][2], old[1][1]), *old[2:]]
    if name.endswith(".parquet"):
        before, after = pq.read_table(source), pq.read_table(out)
        assert after.schema == before.schema and after.slice(0, 1).equals(before.slice(0, 1))


def test_json_lines_under_a_json_name(jsonl, tmp_path):
    source = tmp_path / "data.json"
    source.write_bytes(JSONL)
    clean_dataset(source, tmp_path / "clean.json", make_report(source, {0: "noisy"}))
    assert (tmp_path / "clean.json").read_bytes() == JSONL.split(b"\r\n", 1)[1]


def test_csv_rows_are_copied_raw_and_flipped_with_their_line_ending(tmp_path):
    source = tmp_path / "data.csv"
    text = ('\ufeffid,prompt,chosen,rejected\r\n'
            'a,"two\r\nlines",yes,no\r\n'
            '\r\n'
            'b,p,"say ""hi""","say ""bye"""\r\n'
            'c,p,"x,\ny",z\n')
    source.write_bytes(text.encode("utf-8"))
    clean_dataset(source, tmp_path / "drop.csv", make_report(source, {1: "noisy"}))
    assert (tmp_path / "drop.csv").read_bytes() == text.replace('b,p,"say ""hi""","say ""bye"""\r\n', "").encode()
    clean_dataset(source, tmp_path / "flip.csv", make_report(source, {1: "flipped"}), mode="flip")
    assert (tmp_path / "flip.csv").read_bytes() == text.replace('"say ""hi""","say ""bye"""',
                                                                '"say ""bye""","say ""hi"""').encode()


def test_json_array_keeps_untouched_elements_raw(tmp_path):
    source = tmp_path / "data.json"
    records = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    text = "[" + ", ".join(json.dumps(r) for r in records[:2]) + ",\n  " + ",\n  ".join(
        json.dumps(r, indent=1) for r in records[2:]) + "\n]\n"  # two records share line 1
    source.write_text(text, encoding="utf-8")
    report = make_report(source, {0: "flipped", 2: "flipped"})
    clean_dataset(source, tmp_path / "drop.json", report)
    assert (tmp_path / "drop.json").read_text() == (
        "[" + json.dumps(records[1]) + ",\n  " + json.dumps(records[3], indent=1) + "\n]\n")
    clean_dataset(source, tmp_path / "flip.json", report, mode="flip")
    flipped = json.loads((tmp_path / "flip.json").read_text())
    assert [r["chosen"] for r in flipped] == ["bad 0", "good 1", "bad 2", "good 3"]
    assert json.dumps(records[1]) in (tmp_path / "flip.json").read_text()


def test_gzip_output_is_gzip_with_the_same_lines(tmp_path):
    source = tmp_path / "data.jsonl.gz"
    lines = [json.dumps(r).encode() + b"\n" for r in hh_records(5)]
    source.write_bytes(gzip.compress(b"".join(lines)))
    out = tmp_path / "clean.jsonl.gz"
    clean_dataset(source, out, make_report(source, {2: "quality"}))
    assert gzip.decompress(out.read_bytes()) == b"".join(lines[:2] + lines[3:])


def test_manifest_lists_hashes_rule_and_changes(jsonl, tmp_path):
    out = tmp_path / "clean.jsonl"
    report_path = write_report(make_report(jsonl, {1: "flipped"}), tmp_path / "report.json")
    result = invoke("clean", jsonl, "-o", out, "--report", report_path, "--drop-fraction", "0.5")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "clean.jsonl.manifest.json").read_text())
    assert manifest["input"]["sha256"] == hashlib.sha256(JSONL).hexdigest()
    assert manifest["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["mode"] == "drop"
    assert manifest["selection"]["rule"] == "drop fraction" and manifest["selection"]["drop_fraction"] == 0.5
    assert manifest["selection"]["report"] == str(report_path)
    assert [(c["line"], c["rank"], c["category"]) for c in manifest["changes"]] == [(1, 1, "clean"), (2, 2, "flipped")]
    assert set(manifest["changes"][0]) == {"pair_id", "line", "rank", "action", "suspicion", "score_safe",
                                           "category", "reason", "flip_probability"}


def test_refuses_to_overwrite_its_input(jsonl, tmp_path):
    report_path = write_report(make_report(jsonl, {0: "flipped"}), tmp_path / "report.json")
    os.symlink(jsonl, tmp_path / "symlink.jsonl")
    os.link(jsonl, tmp_path / "hardlink.jsonl")
    for out in (jsonl, tmp_path / "symlink.jsonl", tmp_path / "hardlink.jsonl"):
        result = invoke("clean", jsonl, "-o", out, "--report", report_path, "--force")
        assert result.exit_code == 2
        assert result.output.strip() == f"Error: {out}: refusing to write over an input file"
    result = invoke("clean", jsonl, "-o", jsonl, "--report", report_path, "--dry-run")
    assert result.exit_code == 2 and "refusing to write over an input file" in result.output
    assert jsonl.read_bytes() == JSONL
    result = invoke("clean", jsonl, "-o", tmp_path / "x.jsonl", "--report", report_path,
                    "--manifest", report_path, "--force")
    assert result.exit_code == 2 and "refusing to write over an input file" in result.output
    assert json.loads(report_path.read_text())["schema_version"] == 1


def test_refuses_an_existing_output_without_force(jsonl, tmp_path):
    out = tmp_path / "clean.jsonl"
    out.write_text("old\n")
    report_path = write_report(make_report(jsonl, {0: "flipped"}), tmp_path / "report.json")
    result = invoke("clean", jsonl, "-o", out, "--report", report_path)
    assert result.exit_code == 2 and "already exists (use --force to replace it)" in result.output
    assert out.read_text() == "old\n"
    assert invoke("clean", jsonl, "-o", out, "--report", report_path, "--force").exit_code == 0
    assert out.read_bytes() == b"".join(JSONL.splitlines(keepends=True)[1:])


def _interrupt_every_second_flip(monkeypatch):
    calls = []
    real = clean_module._flip_in_place

    def failing(values, fields):
        calls.append(1)
        if len(calls) % 2 == 0:  # the second record of each run
            raise KeyboardInterrupt
        real(values, fields)

    monkeypatch.setattr(clean_module, "_flip_in_place", failing)
    return calls


@pytest.mark.parametrize("name", ["plain.jsonl", "prompt.csv", "hh.jsonl.gz"])
def test_an_interrupted_run_leaves_no_partial_output(name, tmp_path, monkeypatch):
    source = tmp_path / name
    shutil.copy(PAIRS / name, source)
    report = make_report(source, {0: "flipped", 1: "flipped"})
    fresh, old = tmp_path / "out" / f"fresh-{name}", tmp_path / "out" / f"old-{name}"
    fresh.parent.mkdir()
    old.write_bytes(b"old content\n")
    calls = _interrupt_every_second_flip(monkeypatch)
    for out in (fresh, old):
        with pytest.raises(KeyboardInterrupt):
            clean_dataset(source, out, report, mode="flip", force=True)
    assert len(calls) == 4  # the writer really was midway, twice
    assert sorted(p.name for p in fresh.parent.iterdir()) == [old.name]  # no output, temp file or manifest
    assert old.read_bytes() == b"old content\n"


def test_a_killed_process_leaves_the_old_output(tmp_path):
    """SIGKILL midway: the output path keeps its old content (only a hidden temp file remains)."""
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in hh_records(4)), encoding="utf-8")
    report_path = write_report(make_report(source, {0: "flipped", 2: "flipped"}), tmp_path / "report.json")
    out = tmp_path / "clean.jsonl"
    out.write_bytes(b"old content\n")
    script = f"""
import os, signal
from safer_audit.workflows import clean
from safer_audit.workflows.clean import clean_dataset, load_report
real = clean._flip_in_place
def kill_on_second(values, fields, calls=[]):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(values, fields)
clean._flip_in_place = kill_on_second
clean_dataset({str(source)!r}, {str(out)!r}, load_report({str(report_path)!r}), mode="flip", force=True)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert completed.returncode == -9, completed.stderr.decode()
    assert out.read_bytes() == b"old content\n"
    assert not (tmp_path / "clean.jsonl.manifest.json").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".clean.jsonl.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")


def test_a_report_of_other_data_is_refused(jsonl, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_bytes(JSONL)
    out = tmp_path / "clean.jsonl"
    report_path = write_report(make_report(other), tmp_path / "report.json")
    result = invoke("clean", jsonl, "-o", out, "--report", report_path)
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {report_path}: is a report of {other}, not of {jsonl}"
    # The scanned file is gone (say, another machine): the pairs themselves must match.
    gone = str(tmp_path / "gone.jsonl")
    changed = tmp_path / "changed.jsonl"
    for edit, message in [((b"cruel", b"mean"), f"{report_path}: pair 7 (line 4) has other texts than in {jsonl}"),
                          ((b"x\"", b"w\""), f"(line 2) is not in {jsonl}; the data changed since the scan"),
                          ((b"\r\n", b"\r\n\n"), f"is at line 3 in the report but at line 2 in {jsonl}")]:
        changed.write_bytes(JSONL.replace(*edit))
        write_report(make_report(changed, data_source=gone), report_path)
        result = invoke("clean", jsonl, "-o", out, "--report", report_path)
        assert result.exit_code == 2 and result.output.startswith("Error: ")
        assert message in result.output
    changed.write_bytes(JSONL.rsplit(b"\n", 1)[0] + b"\n")  # without the last record
    write_report(make_report(changed, data_source=gone), report_path)
    result = invoke("clean", jsonl, "-o", out, "--report", report_path)
    assert result.exit_code == 2 and f"Error: {jsonl}:5: pair " in result.output
    assert f"is not in {report_path}" in result.output
    assert not out.exists()


def test_dry_run_shows_the_changes_and_writes_nothing(jsonl, tmp_path):
    report_path = write_report(make_report(jsonl, {0: "flipped", 1: "noisy"}), tmp_path / "report.json")
    out = tmp_path / "clean.jsonl"
    result = invoke("clean", jsonl, "-o", out, "--report", report_path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would have dropped 2 of 4 pairs (report categories)" in result.output
    assert "category noisy in the report (rank 2 of 4)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "report.json"]


def test_unsupported_sources_and_usage_errors(jsonl, tmp_path):
    report_path = write_report(make_report(jsonl), tmp_path / "report.json")
    directory = tmp_path / "dataset"
    directory.mkdir()
    result = invoke("clean", directory, "-o", tmp_path / "x.jsonl", "--report", report_path)
    assert result.exit_code == 2 and "cleaning a datasets directory is not supported" in result.output
    result = invoke("clean", jsonl, "-o", tmp_path / "x.csv", "--report", report_path)
    assert result.exit_code == 2 and "must end in .jsonl" in result.output
    result = invoke("clean", jsonl, "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "select pairs with --report, --drop-fraction, --threshold or " in result.output
    result = invoke("clean", jsonl, "-o", tmp_path / "x.jsonl", "--threshold", "0.5", "--drop-fraction", "0.1")
    assert result.exit_code == 2 and "not both" in result.output
    result = invoke("clean", jsonl, "-o", tmp_path / "x.jsonl", "--report", report_path, "--threshold", "0")
    assert result.exit_code == 2 and "the selection holds every pair" in result.output
    (tmp_path / "bad.json").write_text('{"schema_version": 1}')
    result = invoke("clean", jsonl, "-o", tmp_path / "x.jsonl", "--report", tmp_path / "bad.json")
    assert result.output.strip() == f'Error: {tmp_path / "bad.json"}: not a scan report: report: field "run" is missing'
    assert not (tmp_path / "x.jsonl").exists()


def test_skipped_invalid_records_are_kept(tmp_path):
    source = tmp_path / "data.jsonl"
    lines = [json.dumps(r) + "\n" for r in hh_records(3)]
    lines.insert(1, '{"chosen": "no rejected"}\n')
    source.write_text("".join(lines), encoding="utf-8")
    report = make_report(source, {1: "flipped"}, skip_invalid=True)  # the pair on line 3
    with pytest.raises(DataError, match='data.jsonl:2: field "rejected" is missing'):
        clean_dataset(source, tmp_path / "clean.jsonl", report)
    clean_dataset(source, tmp_path / "clean.jsonl", report, skip_invalid=True)
    assert (tmp_path / "clean.jsonl").read_text() == "".join(lines[:2] + lines[3:])
    # In a JSON array on one line, a skipped record and a pair cannot be told apart by line.
    array = tmp_path / "data.json"
    array.write_text(json.dumps([{"chosen": "a", "rejected": "b"}, {"chosen": "c"}, {"chosen": "d", "rejected": "e"}]))
    with pytest.raises(CleanError, match="data.json:1: holds both a skipped invalid record and a pair"):
        clean_dataset(array, tmp_path / "clean.json", make_report(array, skip_invalid=True), skip_invalid=True)


def test_drop_fraction_runs_the_scan(tiny_llama_dir, tmp_path):
    source = tmp_path / "data.jsonl"
    lines = [json.dumps(r) + "\n" for r in hh_records(20)]
    source.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    result = invoke("clean", source, "-o", out, "--drop-fraction", "0.1", "--model", tiny_llama_dir,
                    "--layer", "1", "--max-length", "64", "--latents", "64", "--k", "4", "--n-features", "16",
                    "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "clean.jsonl.manifest.json").read_text())
    assert manifest["selection"]["report"] == "the scan"
    assert sorted(c["rank"] for c in manifest["changes"]) == [1, 2]
    dropped = {c["line"] for c in manifest["changes"]}
    assert out.read_text().splitlines(keepends=True) == [line for i, line in enumerate(lines, 1) if i not in dropped]
