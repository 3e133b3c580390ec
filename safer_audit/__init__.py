"""safer-audit: find flipped and noisy pairs in preference data (the SAFER method).

The library face: the few calls a data pipeline makes. Each imports what it needs when it is
called, so ``import safer_audit`` stays light; the commands of ``safer-audit`` are thin wrappers
over the same functions.

    import safer_audit
    result = safer_audit.scan("data.jsonl")          # pipeline.scan.ScanResult
    suspects = result.report.suspects(20)            # the most suspicious pairs, as Findings
    report = safer_audit.load_report("report.json")  # report.types.Report
    safer_audit.clean("data.jsonl", "cleaned.jsonl", report)
    outcome = safer_audit.gate(["data.jsonl"], ".safer-audit/baseline.json")
"""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "clean", "evaluate", "gate", "load_report", "scan"]


def scan(source, config=None, **options):
    """Scan a dataset (a path, ``-`` for standard input, ``hf://owner/name``, or a table in memory: a
    polars or pandas DataFrame, a list of records, a ``datasets.Dataset``) and rank its pairs, most
    suspicious first. ``config`` is a config.ScanConfig; ``options`` are its fields, e.g. ``n_features=512``."""
    import os
    from dataclasses import replace

    from .config import ScanConfig
    from .data import is_table
    from .pipeline.scan import run_scan

    return run_scan(source if is_table(source) else os.fspath(source), replace(config or ScanConfig(), **options))


def load_report(path):
    """A scan's report from its JSON file (report.types.Report: ``findings``, ``features``, ``to_frame()``)."""
    from .workflows.clean import load_report as load

    return load(path)


def clean(source, out, report, **options):
    """Write ``source`` to ``out`` with the report's flagged pairs dropped (``mode="drop"``) or swapped back
    (``mode="flip"``), and a manifest beside it; ``options`` as workflows.clean.clean_dataset takes them."""
    from .workflows.clean import clean_dataset

    return clean_dataset(source, out, report, **options)


def gate(sources, baseline, **options):
    """Score what is new or changed in ``sources`` since ``baseline`` with its frozen reference;
    the result's ``failed`` says whether the gate fails (workflows.gate.run_gate's options)."""
    from .workflows.gate import run_gate

    return run_gate([str(s) for s in ([sources] if isinstance(sources, (str, bytes)) else sources)], baseline,
                    **options)


def evaluate(source, config=None, **options):
    """Plant flips in a dataset, scan it and measure how well each scorer finds them
    (workflows.evaluate.evaluate's options: ``flip_rate``, ``seeds``, ``flip_mode``, ...)."""
    from .config import ScanConfig
    from .pipeline.stages import read_data
    from .workflows.evaluate import evaluate as run

    config = config or ScanConfig()
    return run(read_data(str(source), config).pairs, config, source=str(source), **options)
