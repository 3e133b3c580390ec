"""Progress reporting for long steps: a rich bar with rate and ETA, or nothing.

Library functions take ``progress`` callbacks; the CLI makes them with ``ProgressBar``.
"""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import inert


class ProgressBar:
    """Makes one rich progress task per step: ``with bars.step("Extracting", "pairs") as update``."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal

    @contextmanager
    def step(self, description: str, unit: str = "items", scale: float = 1.0):
        """``update(done, total, **fields)``; ``scale`` converts units (texts -> pairs: 0.5)."""
        if not self.enabled:
            yield lambda done, total, **fields: None
            return
        # markup=False: a description or field may one day quote a file name
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TaskProgressColumn(), TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}", markup=False)]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(inert(description), total=None, rate="", extra="")

            def update(done, total, **fields):
                done, total = done * scale, total * scale
                elapsed = progress.tasks[0].elapsed or 0.0
                rate = f"{done / elapsed:.1f} {unit}/s" if elapsed > 0 else ""
                extra = inert(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in fields.items()))
                progress.update(task, completed=done, total=total, rate=rate, extra=extra)

            yield update


def silent(*_args, **_kwargs):
    """A progress callback that reports nothing."""


@contextmanager
def no_progress(_description: str = "", _unit: str = "", scale: float = 1.0):
    yield silent


def next_steps(data: str, outputs: list, top_pair: str | None, options: list[str], decisions: str) -> list[str]:
    """What to do after a scan: each step's purpose on one line, its command, ready to copy (shell-quoted),
    on the next, so a narrow terminal wraps neither in the middle of a word of the other.

    ``options`` are the scan's own model, data and SAE options, which ``explain`` and
    ``review`` need to see the same pairs and scores; ``decisions`` is the file review writes.
    """
    import shlex

    same = "".join(" " + shlex.quote(str(option)) for option in options)
    source = shlex.quote(str(data))
    pages = [str(path) for path in outputs if str(path).lower().endswith((".html", ".htm"))]
    reports = [str(path) for path in outputs if str(path).lower().endswith(".json")]
    steps = []
    if pages:
        steps.append((f"open {pages[0]} in a browser: search and filter the suspects, mark each flipped / noisy / "
                      "ok, download decisions.json", None))
    else:
        steps.append(("a page to review the suspects in a browser:", f"safer-audit scan {source}{same} -o report.html"))
    if top_pair is not None:
        steps.append(("the top suspect in full, with the features behind its scores:",
                      f"safer-audit explain {source} {shlex.quote(top_pair)}{same}"))
    review = f" --report {shlex.quote(reports[0])}" if reports else same
    steps.append((f"walk the suspects in the terminal; the decisions go to {decisions}:",
                  f"safer-audit review {source}{review}"))
    steps.append(("then apply them (flipped swapped back, noisy dropped):",
                  f"safer-audit clean {source} --decisions {shlex.quote(decisions)} -o cleaned.jsonl"))
    lines = ["Next steps:"]
    for purpose, command in steps:
        lines.append(f"  {purpose}")
        if command is not None:
            lines.append(f"    {command}")
    return lines
