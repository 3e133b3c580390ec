"""The library face: what a pipeline calls, with nothing heavy imported until it is called."""

from __future__ import annotations

import json
import subprocess
import sys

import safer_audit

from .conftest import hh_records, tiny_scan_config


def test_importing_the_package_loads_neither_torch_nor_the_pipeline():
    code = "import sys, safer_audit; print(sorted(m for m in ('torch', 'polars', 'safer_audit.pipeline') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scan_load_report_and_clean_from_python(tiny_llama_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(12)), encoding="utf-8")
    result = safer_audit.scan(data, tiny_scan_config(tiny_llama_dir, tmp_path / "cache"), labeller="none")
    assert [f.rank for f in result.report.findings] == list(range(1, 13))
    path = tmp_path / "report.json"
    from safer_audit.report.types import export_report

    export_report(result.report, path)
    report = safer_audit.load_report(path)
    assert [f.pair_id for f in report.findings] == [f.pair_id for f in result.report.findings]
    cleaned = safer_audit.clean(data, tmp_path / "clean.jsonl", report, mode="drop", drop_fraction=0.25)
    kept = (tmp_path / "clean.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kept) == 12 - 3 and cleaned is not None
