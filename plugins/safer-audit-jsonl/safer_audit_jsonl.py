"""safer-audit exporter plugin: the report as JSON Lines, run metadata first, then one finding per line."""

from __future__ import annotations

import json
from pathlib import Path

from safer_audit.common.files import write_atomic
from safer_audit.hookspecs import hookimpl
from safer_audit.report.types import Report


def export_jsonl(report: Report, path: Path) -> None:
    """Line 1: ``{"type": "run", ...}`` (schema version, run, features); then one finding per line, by rank."""
    data = report.to_dict()
    findings = sorted(data.pop("findings"), key=lambda finding: finding["rank"])
    records = [{"type": "run", **data}] + [{"type": "finding", **finding} for finding in findings]
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records))


@hookimpl
def register_exporters(register):
    register("jsonl", (".jsonl",), export_jsonl)
