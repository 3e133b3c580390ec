"""``validate``: read a source once, streaming, and summarise what it holds and what is wrong with it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ReadOptions
from ..errors import DataError
from .quality import FINDING_KINDS, QualityChecker, QualityFinding
from .readers import PairReader


@dataclass
class ValidationSummary:
    """What ``validate_dataset`` read and found: counts, the schema, skipped errors, findings."""

    source: str
    schema: str | None
    schema_detected: bool
    records: int
    pairs: int
    skipped: int
    skipped_errors: list[DataError]  # the first few
    findings: dict[str, int]  # count per kind checked (truncated only with max_length)
    examples: dict[str, list[QualityFinding]]  # the first few per kind
    max_length: int | None = None
    context_cut: int | None = None  # pairs with a conversation longer than max_length

    @property
    def usable(self) -> bool:
        return self.pairs > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "schema": self.schema,
            "schema_detected": self.schema_detected,
            "records": self.records,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "skipped_errors": [str(error) for error in self.skipped_errors],
            "findings": {kind: {"count": count, "first": [finding.to_dict() for finding in self.examples[kind]]}
                         for kind, count in self.findings.items()},
            "max_length": self.max_length,
            "context_cut": self.context_cut,
            "usable": self.usable,
        }


def validate_dataset(source: str | os.PathLike, options: ReadOptions | None = None, *, max_errors: int = 10,
                     max_length: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None,
                     examples: int = 5, **keywords) -> ValidationSummary:
    """Read ``source`` once, streaming, and summarise it; raises like ``load_pairs``."""
    reader = PairReader(source, options, max_errors=max_errors, keep_skipped=max_errors, **keywords)
    checker = QualityChecker(max_length, count_tokens)
    kinds = [kind for kind in FINDING_KINDS if max_length is not None or kind != "truncated"]
    counts = dict.fromkeys(kinds, 0)
    firsts: dict[str, list[QualityFinding]] = {kind: [] for kind in kinds}

    def record(found: list[tuple[int, QualityFinding]]) -> None:
        for _, finding in found:
            counts[finding.kind] += 1
            if len(firsts[finding.kind]) < examples:
                firsts[finding.kind].append(finding)

    pairs = 0
    for pair in reader:
        pairs += 1
        record(checker.add(pair))
    record(checker.flush())
    return ValidationSummary(
        source=reader.source, schema=reader.schema, schema_detected=not reader.schema_forced,
        records=reader.records, pairs=pairs, skipped=reader.skipped_count, skipped_errors=reader.skipped,
        findings=counts, examples=firsts, max_length=max_length,
        context_cut=checker.context_cut if max_length is not None else None,
    )
