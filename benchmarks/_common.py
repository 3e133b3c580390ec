"""What the benchmarks share: where the full HH test file is, the ``--data``/``--limit`` options, reading the pairs.

Imported by the scripts as ``from _common import ...`` (``python benchmarks/bench_X.py`` puts this folder first
on the path). The full file sits in the ``shared`` folder beside the checkout (``/work/shared`` for
``/work/main``) or beside its parent (a worktree ``/work/wt/NAME``); a default that looked only beside the
checkout named a file that does not exist when run from a worktree.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
HH_TEST_FILE = Path("data") / "hh-rlhf-harmless-base-test.jsonl.gz"


def shared_data(root: Path = ROOT, name: Path = HH_TEST_FILE) -> Path:
    """``shared/<name>`` beside ``root`` or beside its parent, the first that exists (else the first)."""
    candidates = [root.parent / "shared" / name, root.parent.parent / "shared" / name]
    return next((path for path in candidates if path.exists()), candidates[0])


DEFAULT_DATA = shared_data()


def bench_parser(doc: str, *, limit_help: str = "first N pairs only") -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with ``--data`` (default: the full HH
    test file) and ``--limit N``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference data (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    return parser


def read_pairs(args: argparse.Namespace):
    """The pairs of ``args.data``, the first ``args.limit`` of them when given."""
    from safer_audit.data import load_pairs

    pairs = load_pairs(args.data).pairs
    return pairs.head(args.limit) if args.limit else pairs
