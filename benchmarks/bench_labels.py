"""Benchmark: how often the offline labeller's categories are right, on windows a person labelled.

    python benchmarks/bench_labels.py [--windows fixtures/labelled-windows.jsonl]

Each window of the fixture (a few words around a highlighted token, as a feature card shows them, with
the category a person gave it) is labelled alone, as a latent with that one window. Prints, for every
relevance threshold, how many windows get a category and how many of those are right (precision), the
lowest threshold from which precision stays >= 0.8, and per category precision and recall at the
labeller's CATEGORY_EVIDENCE. A category is right when it is the person's (or one the person gave as
equally right, ``also``); "not safety related" windows count against every category shown for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = ROOT / "fixtures" / "labelled-windows.jsonl"
TARGET = 0.8


def read_windows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def window_labels(rows: list[dict]):
    """Each window labelled alone by the offline labeller: its FeatureLabel, in order."""
    from safer_audit.features.labels import LabelContext, LabelRequest, make_labeller

    requests = [LabelRequest(i, 1.0, (LabelContext("chosen", r["before"], r["token"], r["after"], 1.0, f"w{i}"),),
                             ((r["token"], 1.0),)) for i, r in enumerate(rows)]
    labels = make_labeller("offline").label(requests)
    return [labels[i] for i in range(len(rows))]


def shown_at(label, threshold: float, not_safety: str) -> str | None:
    """The category the labeller would name at ``threshold``, or None."""
    closest = label.extra.get("closest")
    return closest if closest not in (None, not_safety) and label.relevance >= threshold else None


def right(row: dict, category: str) -> bool:
    return category == row["category"] or category in row.get("also", ())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=Path, default=WINDOWS)
    args = parser.parse_args()
    from safer_audit.backends.labellers import CATEGORY_EVIDENCE
    from safer_audit.features.labels import NOT_SAFETY

    rows = read_windows(args.windows)
    labels = window_labels(rows)
    safety = [r for r in rows if r["category"] != NOT_SAFETY]
    print(f"{len(rows)} windows, {len(safety)} with a safety category\n")
    print("| relevance >= | categories shown | right | precision | recall (safety windows) |")
    print("|---:|---:|---:|---:|---:|")
    sweep = []
    for step in range(0, 19):
        t = round(0.05 * step, 2)
        shown = [(r, shown_at(label, t, NOT_SAFETY)) for r, label in zip(rows, labels, strict=True)]
        shown = [(r, c) for r, c in shown if c is not None]
        hits = sum(right(r, c) for r, c in shown)
        precision = hits / len(shown) if shown else float("nan")
        sweep.append((t, precision, len(shown)))
        print(f"| {t:.2f} | {len(shown)} | {hits} | {precision:.3f} | {hits / len(safety):.3f} |")
    lowest = next((t for i, (t, _, _) in enumerate(sweep)
                   if all(p >= TARGET for _, p, n in sweep[i:] if n)), None)
    print(f"\nlowest threshold from which precision stays >= {TARGET}: {lowest}; "
          f"CATEGORY_EVIDENCE = {CATEGORY_EVIDENCE}\n")
    print(f"Per category at relevance >= {CATEGORY_EVIDENCE}:\n")
    print("| category | windows | shown as it | right | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|")
    shown = [shown_at(label, CATEGORY_EVIDENCE, NOT_SAFETY) for label in labels]
    for category in dict.fromkeys(r["category"] for r in rows):
        gold = sum(r["category"] == category for r in rows)
        named = [(r, c) for r, c in zip(rows, shown, strict=True) if c == category]
        hits = sum(right(r, c) for r, c in named)
        found = sum(c is not None and right(r, c)
                    for r, c in zip(rows, shown, strict=True) if r["category"] == category)
        if category == NOT_SAFETY:
            wrong = sum(c is not None for r, c in zip(rows, shown, strict=True) if r["category"] == category)
            print(f"| {category} | {gold} | (given a category: {wrong}) | | | {1 - wrong / gold:.2f} shown none |")
            continue
        precision = f"{hits / len(named):.2f}" if named else "—"
        print(f"| {category} | {gold} | {len(named)} | {hits} | {precision} | {found / gold:.2f} |")
    every = [(r, c) for r, c in zip(rows, shown, strict=True) if c is not None]
    total = sum(right(r, c) for r, c in every)
    print(f"| all | {len(rows)} | {len(every)} | {total} | {total / max(len(every), 1):.2f} | "
          f"{sum(right(r, c) for r, c in every if r['category'] != NOT_SAFETY) / len(safety):.2f} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
