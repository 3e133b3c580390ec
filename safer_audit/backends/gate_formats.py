"""The gate's output formats (plain lines, JSON, JUnit XML) and its GitHub Actions annotations.

Built-in plugins of their own hook (``register_gate_formats``), not exporters: an exporter
writes a scan's Report to a file chosen by extension, while these render a GateResult on
stdout (or stderr, for the annotations) chosen by ``gate --format``, so they share neither
input nor destination; a plugin adds a format the same way.
Text from the data (file names, pair ids, quality details) is made inert in every format:
a CI log shows all of them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from ..common.terminal import json_text
from ..errors import inert
from ..hookspecs import hookimpl

if TYPE_CHECKING:  # the plugin loads at every start-up; the gate (torch, the pipeline) only when it runs
    from ..workflows.gate import ChangedPair, GateFinding, GateResult


def _line(text: str) -> str:
    """One line of output: inert, and never read as a GitHub workflow command.

    The runner takes any line of a job's output that starts with ``::`` (after spaces) as a
    command, and a file name can start so; its first colon is then written as an escape.
    """
    text = inert(text)
    return "\\x3a" + text.lstrip()[1:] if text.lstrip().startswith("::") else text


def _not_failing(f: GateFinding, result: GateResult) -> str:
    if f.category not in result.fail_on:
        return " (not failing)"
    return " (not failing: marked ok in review)" if f.verdict == "ok" else ""


def _change_status(c: ChangedPair, result: GateResult, finding: GateFinding | None) -> str:
    if c.verdict == "ok":
        return " (not failing: marked ok in review)"
    if "changed" in result.fail_on or (finding is not None and finding.category in result.fail_on):
        return f" (failing: accept it with --mark-ok {c.pair_id} once reviewed)"
    return " (not failing)"


def _summary(result: GateResult) -> str:
    what = (f"{result.new} new or changed of {result.pairs} pairs ({result.changed} changed, "
            f"{len(result.removed)} removed, {result.skipped} records skipped by the read options"
            + (f", {result.checked} baseline pairs scored again and matching" if result.checked else "")
            + f") against {result.baseline.path}")
    cleared = sum(1 for f in result.findings if f.category in result.fail_on and f.verdict == "ok" and not f.changed)
    cleared += sum(1 for c in result.changed_pairs if c.verdict == "ok")
    if cleared:
        what += f"; {cleared} pair(s) marked ok in review ({result.decisions})"
    counts = f"{len(result.failures)} new suspect pair(s) in {', '.join(c for c in result.fail_on if c != 'changed')}"
    if "changed" in result.fail_on:
        counts = f"{len(result.failing_changes)} changed pair(s), " + counts
    if result.failed:
        removed = f", {len(result.removed)} removed" if "removed" in result.fail_on else ""
        return f"FAILED: {counts} (at most {result.max_new} new allowed){removed}; {what}"
    return f"passed: {counts}; {what}"


def render_text(result: GateResult) -> str:
    """Plain lines: one per new suspect and changed pair (``file:line: ...``), removed pair, then the
    verdict and, on a failure, what to do next; data made inert."""
    lines = [_line(f"{f.source}:{f.line}: {f.message()}{_not_failing(f, result)}") for f in result.findings
             if not f.changed]
    finding_of = {f.pair_id: f for f in result.findings}
    for c in result.changed_pairs:
        finding = finding_of.get(c.pair_id)
        quality = "".join(f"; {q}" for q in finding.quality) if finding is not None else ""
        lines.append(_line(f"{c.source}:{c.line}: {c.message()}{quality}{_change_status(c, result, finding)}"))
    removed_fails = "removed" in result.fail_on
    lines += [_line(r.message() + ("" if removed_fails else " (not failing)")) for r in result.removed]
    lines.append(_line(_summary(result)))
    lines += [_line(f"next: {step}") for step in result.next_steps()]
    return "\n".join(lines)


def render_json_result(result: GateResult) -> str:
    return json_text(result.to_dict(), indent=2) + "\n"


def _xml_safe(text: str) -> str:
    """Text from the data made inert (a CI log shows it too), less what XML 1.0 cannot hold."""
    return "".join(c for c in inert(text) if c in "\t\n\r" or 0x20 <= ord(c) < 0xD800
                   or 0xE000 <= ord(c) < 0xFFFE or ord(c) >= 0x10000)


def render_junit(result: GateResult) -> str:
    """JUnit XML: a failing test case per failing pair (new suspect or changed pair), a passing one per
    clean file; each failure's text ends with what to do next."""
    failing = [(f.source, f.line, f.pair_id, f.category, f.message()) for f in result.failures] \
        if result.failed else []
    failing += [(c.source, c.line, c.pair_id, "changed", c.message()) for c in result.failing_changes]
    next_steps = "".join(f"\nnext: {step}" for step in result.next_steps())
    suite = ET.Element("testsuite", name="safer-audit gate", tests="0", failures=str(len(failing)), errors="0",
                       time=f"{sum(result.timings.values()):.3f}")
    cases = 0
    for source in result.sources:
        in_file = [item for item in failing if item[0] == source]
        for _, line, pair_id, kind, message in in_file:
            case = ET.SubElement(suite, "testcase", classname=_xml_safe(source), name=_xml_safe(
                f"{source}:{line} {pair_id}"), file=_xml_safe(source), line=str(line))
            failure = ET.SubElement(case, "failure", message=_xml_safe(message), type=kind)
            failure.text = _xml_safe(f"{source}:{line}: {message}{next_steps}")
            cases += 1
        if not in_file:
            ET.SubElement(suite, "testcase", classname=_xml_safe(source), name=_xml_safe(f"{source}: no new suspects"),
                          file=_xml_safe(source))
            cases += 1
    removed = result.removed if "removed" in result.fail_on else []
    for r in removed:  # no file or line: the pair is gone
        case = ET.SubElement(suite, "testcase", classname="removed", name=_xml_safe(f"removed {r.pair_id}"))
        ET.SubElement(case, "failure", message=_xml_safe(r.message()), type="removed").text = \
            _xml_safe(r.message() + next_steps)
        cases += 1
    n_failed = len(failing) + len(removed)
    suite.set("tests", str(cases))
    suite.set("failures", str(n_failed))
    suites = ET.Element("testsuites", name="safer-audit", tests=str(cases), failures=str(n_failed))
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(result: GateResult) -> list[str]:
    """GitHub Actions workflow commands: an error per failing pair, a warning per other suspect or change,
    and on a failure one error that says what to do next."""
    out = []
    failing = set(result.failing_ids()) if result.failed else set()
    items = [(f.source, f.line, f"{f.category} pair", f.message(), f.pair_id in failing)
             for f in result.findings if not f.changed]
    items += [(c.source, c.line, "changed pair", c.message(), c.pair_id in failing) for c in result.changed_pairs]
    for source, line, title, message, failing in items:
        # inert first: an annotation is shown in the log and on the pull request
        out.append(f"::{'error' if failing else 'warning'} file={_escape_property(inert(source))},line={line},"
                   f"title={_escape_property(inert(f'safer-audit: {title}'))}::{_escape_data(inert(message))}")
    if result.failed:
        text = "\n".join(inert(line) for line in (_summary(result), *(f"next: {s}" for s in result.next_steps())))
        out.append(f"::error title={_escape_property('safer-audit gate failed')}::{_escape_data(text)}")
    return out


@hookimpl
def register_gate_formats(register):
    register("text", render_text)
    register("json", render_json_result)
    register("junit", render_junit)
