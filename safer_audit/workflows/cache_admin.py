"""The whole cache directory: what ``safer-audit cache info`` lists and ``cache clear`` deletes.

Under the cache root (config.default_cache_dir or ``--cache-dir``)::

    activations/<config key>/    one entry per model, layer, positions and max length (activations.py):
        shard-*.safetensors      the activations
        saes/                    trained SAEs, each with the labels of its features (labels.py)
        codes/                   per-text SAE results (codes.py)
        heads/                   fitted heads (scoring.heads.HeadCache)
        token-counts/            token counts of the truncation check (data/tokens.cached_counter)
    judges/                      answers judges keep across runs (the LLM judge's in judges/llm/)
        harm/                    the harm judge's sentence embeddings (model.embeddings)
    labels/<SAE hash>/           feature labels of a user's ``--sae``
    reports/                     whole scan reports (pipeline.report_cache)

Every kind is listed with its size, and ``cache clear`` deletes them all (and nothing else
that may sit in the directory: a cache directory given by hand may hold other files).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..common.terminal import plain
from ..model.activations import cache_info

TOP_LEVEL = ("activations", "judges", "labels", "reports", "models")  # what the cache writes directly under its root
EMBEDDINGS = Path("judges") / "harm"  # a kind of its own inside judges/: cost, not answers
# kind -> the cache_info field of its bytes, per activation entry
ENTRY_KINDS = {"activations": "activation_bytes", "SAEs": "sae_bytes", "codes": "codes_bytes", "heads": "heads_bytes",
               "token counts": "token_count_bytes"}
KIND_HELP = {
    "activations": "activation shards",
    "SAEs": "trained SAEs and their feature labels",
    "codes": "per-text SAE results",
    "heads": "fitted heads",
    "token counts": "token counts of the truncation check",
    "judges": "judges' answers (judges/)",
    "harm embeddings": "the harm judge's sentence embeddings (judges/harm/)",
    "labels": "feature labels of given SAEs (labels/)",
    "reports": "whole scan reports, read back by a scan of the same data and options (reports/)",
    "models": "dequantised weights of GGUF models (models/)",
    "other": "entry configurations, locks",
}


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []


def _bytes(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            total += path.stat().st_size
        except OSError:  # removed meanwhile (a concurrent scan replacing a file)
            pass
    return total


def cache_summary(root: Path) -> dict:
    """Everything the cache at ``root`` holds: ``entries``, one row per activation entry
    (activations.cache_info); ``kinds``, every kind of entry with its files and bytes; and
    ``bytes``, their total (the kinds add up to it: ``other`` is what no kind claims)."""
    root = Path(root)
    rows = cache_info(root)
    kinds = [{"kind": kind, "bytes": sum(row[field] for row in rows)} for kind, field in ENTRY_KINDS.items()]
    embeddings = set(_files(root / EMBEDDINGS))
    for name in TOP_LEVEL[1:]:
        files = [path for path in _files(root / name) if path not in embeddings]
        kinds.append({"kind": name, "files": len(files), "bytes": _bytes(files)})
        if name == "judges":
            kinds.append({"kind": "harm embeddings", "files": len(embeddings), "bytes": _bytes(list(embeddings))})
    total = sum(_bytes(_files(root / name)) for name in TOP_LEVEL)
    kinds.append({"kind": "other", "bytes": total - sum(kind["bytes"] for kind in kinds)})
    return {"cache_dir": str(root), "entries": rows, "kinds": kinds, "bytes": total}


def cache_view(summary: dict):
    """``cache info``'s tables: the activation entries (when there are any), then every kind with its size."""
    from rich.console import Group
    from rich.table import Table

    root = summary["cache_dir"]
    if not summary["bytes"]:
        return plain(f"Cache {root} is empty.")
    parts = []
    if summary["entries"]:  # what each entry is; the kinds' sizes (per entry in --format json) follow below
        # an entry holds more than its activations (SAEs, codes, heads, token counts): both sizes, each named
        table = Table(title=plain(f"Cache entries, one per model, layer, positions and max length: {root}"))
        table.add_column("model", overflow="fold", min_width=16)  # a long model path is wrapped, not cut short
        for column in ("layer", "positions", "max length", "texts", "activations", "entry in all"):
            table.add_column(column, no_wrap=True)
        for row in summary["entries"]:
            table.add_row(*(plain(row.get(name, "?")) for name in ("model", "layer", "positions", "max_length")),
                          f"{row['texts']:,}", _size(row["activation_bytes"]), _size(row["bytes"]))
        parts.append(table)
    kinds = Table(title=plain(f"Every kind of cache entry, with its size on disk: {root}"))
    for column in ("kind", "holds", "size"):
        kinds.add_column(column)
    for kind in summary["kinds"]:
        kinds.add_row(kind["kind"], KIND_HELP[kind["kind"]], _size(kind["bytes"]))
    kinds.add_row("total", "", _size(summary["bytes"]))
    parts.append(kinds)
    return Group(*parts)


def _size(size: int) -> str:
    """A size in the unit that shows it: 0 B, 12.0 KiB, 3.8 MiB, 1.2 GiB (not 0.0 MiB for token counts)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cache_clear(root: Path) -> int:
    """Delete every kind of cache entry under ``root`` (activation entries with their SAEs, codes,
    heads and token counts; judges' answers and the harm judge's embeddings; labels; reports; dequantised
    model weights); returns the bytes freed."""
    freed = 0
    for name in TOP_LEVEL:
        directory = Path(root) / name
        if directory.is_dir():
            freed += _bytes(_files(directory))
            shutil.rmtree(directory)
    return freed
