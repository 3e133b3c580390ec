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
    from ..workflows.gate import GateFinding, GateResult


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


def render_text(result: GateResult) -> str:
    """Plain lines: one per new suspect (``file:line: ...``), changed and removed pair, then the
    verdict; data made inert."""
    lines = [_line(f"{f.source}:{f.line}: {f.message()}{_not_failing(f, result)}") for f in result.findings]
    suspects = {(f.source, f.line) for f in result.findings}
    lines += [_line(f"{c.source}:{c.line}: {c.message()}") for c in result.changed_pairs
              if (c.source, c.line) not in suspects]  # a changed suspect's line already says what it was
    removed_fails = "removed" in result.fail_on
    lines += [_line(r.message() + ("" if removed_fails else " (not failing)")) for r in result.removed]
    what = (f"{result.new} new or changed of {result.pairs} pairs ({result.changed} changed, "
            f"{len(result.removed)} removed) against {result.baseline.path}")
    cleared = sum(1 for f in result.findings if f.category in result.fail_on and f.verdict == "ok")
    if cleared:
        what += f"; {cleared} suspect(s) marked ok in review ({result.decisions})"
    n_fail = len(result.failures)
    if result.failed:
        lines.append(_line(f"FAILED: {n_fail} new suspect pair(s) in {', '.join(result.fail_on)} "
                           f"(at most {result.max_new} allowed)"
                           + (f", {len(result.removed)} removed" if removed_fails else "") + f"; {what}"))
    else:
        lines.append(_line(f"passed: {n_fail} new suspect pair(s) in {', '.join(result.fail_on)}; {what}"))
    return "\n".join(lines)


def render_json_result(result: GateResult) -> str:
    return json_text(result.to_dict(), indent=2) + "\n"


def _xml_safe(text: str) -> str:
    """Text from the data made inert (a CI log shows it too), less what XML 1.0 cannot hold."""
    return "".join(c for c in inert(text) if c in "\t\n\r" or 0x20 <= ord(c) < 0xD800
                   or 0xE000 <= ord(c) < 0xFFFE or ord(c) >= 0x10000)


def render_junit(result: GateResult) -> str:
    """JUnit XML: a failing test case per new pair the gate fails on, a passing one per clean file."""
    failing = result.failures if result.failed else []
    suite = ET.Element("testsuite", name="safer-audit gate", tests="0", failures=str(len(failing)), errors="0",
                       time=f"{sum(result.timings.values()):.3f}")
    cases = 0
    for source in result.sources:
        in_file = [f for f in failing if f.source == source]
        for f in in_file:
            case = ET.SubElement(suite, "testcase", classname=_xml_safe(source), name=_xml_safe(
                f"{source}:{f.line} {f.pair_id}"), file=_xml_safe(source), line=str(f.line))
            failure = ET.SubElement(case, "failure", message=_xml_safe(f.message()), type=f.category)
            failure.text = _xml_safe(f"{source}:{f.line}: {f.message()}")
            cases += 1
        if not in_file:
            ET.SubElement(suite, "testcase", classname=_xml_safe(source), name=_xml_safe(f"{source}: no new suspects"),
                          file=_xml_safe(source))
            cases += 1
    removed = result.removed if "removed" in result.fail_on else []
    for r in removed:  # no file or line: the pair is gone
        case = ET.SubElement(suite, "testcase", classname="removed", name=_xml_safe(f"removed {r.pair_id}"))
        ET.SubElement(case, "failure", message=_xml_safe(r.message()), type="removed").text = _xml_safe(r.message())
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
    """GitHub Actions workflow commands: an error per failing new pair, a warning per other suspect."""
    out = []
    for f in result.findings:
        level = "error" if f.category in result.fail_on and f.verdict != "ok" and result.failed else "warning"
        # inert first: an annotation is shown in the log and on the pull request
        out.append(f"::{level} file={_escape_property(inert(f.source))},line={f.line},"
                   f"title={_escape_property(inert(f'safer-audit: {f.category} pair'))}::"
                   f"{_escape_data(inert(f.message()))}")
    return out


@hookimpl
def register_gate_formats(register):
    register("text", render_text)
    register("json", render_json_result)
    register("junit", render_junit)
