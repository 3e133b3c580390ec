"""Text from a dataset, a file name or a model is inert on every terminal.

Hostile ids, texts, field names and a hostile file name go through every command that
prints; no control character but newline may reach stdout or stderr, and the escaped
form must show instead. The views are also rendered on a colour terminal, where rich's
own styling may appear but never the data's sequences. File names that look like rich
markup are shown literally.
"""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from safer_audit.backends.gate_formats import github_annotations, render_json_result, render_junit, render_text
from safer_audit.cli import cli
from safer_audit.errors import inert
from safer_audit.report.types import FeatureCard, FeatureContext, FeatureContribution, Finding, Report, RunInfo
from safer_audit.report.view import print_feature_cards, print_report
from safer_audit.workflows.explain import Explanation, FeatureFiring, print_explanation
from safer_audit.workflows.gate import GateFinding, GateResult

from .conftest import FIXTURES

# Clear screen, window title, a fake hyperlink, hidden text, a carriage return and
# backspaces that overwrite with a fake verdict, a C1 CSI, a bidi override, a tag character.
HOSTILE = ("\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"
           "\x1b[8mhidden\x1b[0m\rPASSED\x08\x08\x9b32m\u202eevil\U000e0041")
HOSTILE_NAME = HOSTILE.replace("/", "")  # a file name cannot hold a slash
# Every character a terminal or a log may act on, but the newline (and tab, which only moves)
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                    "\U000e0000-\U000e007f]")
DATA_SEQUENCES = ("\x1b[2J", "\x1b]", "\x07", "\x1b[8m", "\r", "\x08", "\x9b", "\u202e", "\U000e0041")
SMALL = ["--layer", "1", "--max-length", "48", "--latents", "32", "--k", "4", "--n-features", "8", "--quiet"]
N_PAIRS = 16


def assert_inert(text: str) -> None:
    found = UNSAFE.search(text)
    assert found is None, f"raw {found.group()!r} in output: {text!r}"


def run(*args, env=None, code=0, check=True):
    """The command's result, with ``out`` and ``err``: stdout and stderr without layout (wrapping, borders)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})},
                                color=True)  # color: click would strip some escape sequences otherwise
    assert code is None or result.exit_code == code, (result.output, result.exception)
    if check:
        assert_inert(result.stdout)
        assert_inert(result.stderr)
    result.out, result.err = flat(result.stdout), flat(result.stderr)
    return result


def flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def hh_records(n: int) -> list[dict]:
    with open(FIXTURES / "hh-harmless-300.jsonl", encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def hostile_records(n: int = N_PAIRS, start: int = 0) -> list[dict]:
    rows = []
    for i, record in enumerate(hh_records(start + n)[start:], start):
        # the pair's own words after the hostile text: the tiny models see only a text's end, and pairs
        # that look identical to them all tie, which is no ranking to test the gate with
        chosen_end, rejected_end = (record[side].rsplit("Assistant:", 1)[-1][-60:] for side in ("chosen", "rejected"))
        rows.append({"id": f"{HOSTILE}{i}", "chosen": record["chosen"] + HOSTILE + " " + chosen_end,
                     "rejected": record["rejected"] + HOSTILE + " no " + rejected_end})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir):
    """A hostile data file (name, ids, texts), its baseline and a scan report, made once."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_jsonl(root / f"{HOSTILE_NAME}.jsonl", hostile_records())
    cache = root / f"cache{HOSTILE_NAME}"
    model = ["--model", tiny_llama_dir, "--cache-dir", cache]
    baseline = root / f"{HOSTILE_NAME}baseline.json"
    made = run("baseline", data, "-o", baseline, *model, *SMALL, check=False)  # checked by a test
    report = root / f"{HOSTILE_NAME}report.json"
    scanned = run("scan", data, *model, *SMALL, "--top", "5", "--output", report, check=False)
    return SimpleNamespace(root=root, data=data, cache=cache, model=model, baseline=baseline, report=report,
                           outputs={"baseline": made, "scan": scanned})


def test_scan_and_baseline_show_the_data_escaped(work):
    scanned = work.outputs["scan"]
    for result in work.outputs.values():
        assert_inert(result.stdout)
        assert_inert(result.stderr)
    assert inert(HOSTILE_NAME) in scanned.out  # the data source in the summary
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in scanned.out  # a pair id or an excerpt
    assert "wrote" + inert(str(work.report)) in scanned.err
    assert "wrote" + inert(str(work.baseline)) in work.outputs["baseline"].out


def test_features_explain_and_clean_show_the_data_escaped(work):
    out = work.root / f"{HOSTILE_NAME}features.yaml"
    shown = run("features", work.data, *work.model, *SMALL, "--top", "3", "-o", out)
    assert "\\x1b" in shown.out and inert(str(out)) in shown.err
    explained = run("explain", work.data, f"{HOSTILE}3", *work.model, *SMALL)
    assert "\\x1b]0;pwned\\x07" in explained.out and "\\u202eevil" in explained.out
    # an unknown pair id is an error message: inert too
    missing = run("explain", work.data, f"{HOSTILE}missing", *work.model, *SMALL, code=2)
    assert "\\x1b]0;pwned" in missing.err
    dry = run("clean", work.data, "-o", work.root / f"{HOSTILE_NAME}clean.jsonl", "--report", work.report,
              "--drop-fraction", "0.25", "--dry-run")
    assert "\\x1b[2J" in dry.out and inert(HOSTILE_NAME) in dry.out
    cleaned = run("clean", work.data, "-o", work.root / f"{HOSTILE_NAME}clean.jsonl", "--report",
                  work.report, "--drop-fraction", "0.25")
    assert "wrote" + inert(str(work.root / f"{HOSTILE_NAME}clean.jsonl")) in cleaned.err


def test_gate_cannot_fake_its_verdict_or_inject_a_workflow_command(work, tmp_path):
    # the new pairs have identical responses: a quality finding on any model, so each gets its line
    added = [{**row, "rejected": row["chosen"]} for row in hostile_records(4, start=N_PAIRS)]
    data = write_jsonl(tmp_path / f"::warning::{HOSTILE_NAME}.jsonl", hostile_records() + added)
    env = {"GITHUB_ACTIONS": "true"}
    gated = run("gate", data, "--baseline", work.baseline, "--fail-on", "flipped,noisy,quality", "--max-new", "100",
                env=env)
    lines = gated.stdout.splitlines()
    assert lines[-1].startswith("passed: ")
    assert len(lines) > 1 and all("\\x1b]0;pwned\\x07" in line for line in lines[:-1])  # one line per suspect
    assert not any(line.lstrip().startswith("::") for line in lines)
    annotations = gated.stderr.splitlines()
    assert annotations and all(line.startswith("::warning file=") for line in annotations)
    assert all(line.count("::") == 2 for line in annotations)  # the command's own, none from the data
    as_json = run("gate", data, "--baseline", work.baseline, "--format", "json", env=env, code=None)
    assert {f["pair_id"] for f in json.loads(as_json.stdout)["findings"]} <= {f"{HOSTILE}{i}" for i in range(20)}
    junit = run("gate", data, "--baseline", work.baseline, "--format", "junit", "--fail-on", "flipped,noisy,quality",
                code=None)
    assert junit.exit_code in (0, 1)
    ET.fromstring(junit.stdout.split("\n", 1)[1])  # well-formed
    missing = run("gate", data, "--baseline", tmp_path / "b.json", code=2)  # the error names both files
    assert inert(str(tmp_path)) in missing.err


def test_validate_shows_names_fields_and_values_escaped(work, tmp_path):
    validated = run("validate", work.data)
    assert inert(HOSTILE_NAME) in validated.out
    as_json = run("validate", work.data, "--format", "json")
    assert json.loads(as_json.stdout)["source"] == str(work.data)
    # a field name from the data, quoted in an error and in a skipped-record line
    bad = tmp_path / f"{HOSTILE_NAME}bad.jsonl"
    bad.write_text(json.dumps({HOSTILE: "x"}) + "\n", encoding="utf-8")
    failed = run("validate", bad, code=2)
    assert "\\x1b]0;pwned\\x07" in failed.err and len(failed.stderr.splitlines()) == 1
    mixed = write_jsonl(tmp_path / "mixed.jsonl", hostile_records(3) + [{"chosen": HOSTILE, "rejected": 3}])
    skipped = run("validate", mixed, "--skip-invalid")
    assert "skipped" in skipped.out


def test_evaluate_and_cache_info(work, tmp_path):
    out = tmp_path / f"{HOSTILE_NAME}eval.json"
    evaluated = run("evaluate", work.data, *work.model, *SMALL, "--positions", "response", "--flip-rate", "0.25",
                    "--output", out)
    assert "wrote" + inert(str(out)) in evaluated.err
    info = run("cache", "info", "--cache-dir", work.cache)
    assert inert(str(work.cache)) in info.out
    as_json = run("cache", "info", "--cache-dir", work.cache, "--format", "json")
    assert json.loads(as_json.stdout)["cache_dir"] == str(work.cache)
    empty = run("cache", "info", "--cache-dir", tmp_path / f"[red]{HOSTILE_NAME}")
    assert "[red]" in empty.out


@pytest.mark.parametrize("name", ["x[/bold].jsonl", "[red]red.jsonl", "[link=http:evil]x[/link].jsonl"])
def test_markup_in_file_names_is_shown_literally(tmp_path, name):
    data = tmp_path / name  # "x[/bold].jsonl" is bold].jsonl in the directory x[
    data.parent.mkdir(exist_ok=True)
    data.write_bytes((FIXTURES / "hh-harmless-300.jsonl").read_bytes()[:20000].rsplit(b"\n", 1)[0] + b"\n")
    validated = run("validate", data)
    assert name in validated.out


def test_scan_of_a_file_named_like_markup(tiny_llama_dir, tmp_path):
    data = tmp_path / "x[/bold][red]red.jsonl"
    data.parent.mkdir()
    write_jsonl(data, hh_records(N_PAIRS))
    report = tmp_path / "[red]r.json"
    scanned = run("scan", data, "--model", tiny_llama_dir, "--cache-dir", tmp_path / "cache", *SMALL, "--top", "3", "--output", report)
    assert "x[/bold][red]red.jsonl" in scanned.out and report.exists()


# -- the views on a colour terminal ------------------------------------------------------------


def colour_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system="truecolor", width=120), out


def assert_no_data_sequences(rendered: str) -> None:
    assert "\x1b[" in rendered  # rich's own styling is there
    for sequence in DATA_SEQUENCES:
        assert sequence not in rendered, repr(sequence)
    assert "\\x1b]0;pwned\\x07" in rendered


def hostile_report() -> Report:
    run_info = RunInfo(tool_version="0", model=HOSTILE, model_hash=None, layer=1, positions="response", max_length=8,
                       sae_path=f"[red]{HOSTILE}", sae_hash=None, sae_fvu=None, n_features=1, ranking="r",
                       thresholds={}, timings={}, pairs=1, counts={"flipped": 1}, data_source=f"x[/bold]{HOSTILE}",
                       created="now")
    finding = Finding(pair_id=HOSTILE, source=HOSTILE, line=1, rank=1, category="flipped", suspicion=1.0,
                      score_safe=-1.0, reward_margin=None, sae_margin=None, quality=[HOSTILE],
                      chosen=f"same {HOSTILE} a", rejected=f"same {HOSTILE} b\n\x1b[2J",
                      context=HOSTILE, top_features=[FeatureContribution(3, f"[bold]{HOSTILE}", 1.0, 0.0)])
    card = FeatureCard(latent=3, label=f"[/bold]{HOSTILE}", salience=1.0, chosen_total=1.0, rejected_total=0.0,
                       fire_rate=0.5, sign="+", top_tokens=[(HOSTILE, 2)],
                       contexts=[FeatureContext(HOSTILE, "chosen", HOSTILE, HOSTILE, HOSTILE, 1.0)])
    return Report(run=run_info, features=[card], findings=[finding])


def test_report_and_cards_on_a_colour_terminal():
    report = hostile_report()
    console, out = colour_console()
    print_report(report, console)
    print_feature_cards(report.features, console)
    rendered = out.getvalue()
    assert_no_data_sequences(rendered)
    assert "x[/bold]" in rendered and "[red]" in rendered and "[bold]" in rendered  # literally


def test_explanation_on_a_colour_terminal():
    finding = hostile_report().findings[0]
    firing = FeatureFiring(3, f"[red]{HOSTILE}", 1, 1.0, 0.0, [(HOSTILE, 1.0)], [(HOSTILE, 0.5)])
    console, out = colour_console()
    print_explanation(Explanation(finding, [firing]), console)
    rendered = out.getvalue()
    assert_no_data_sequences(rendered)
    assert "[red]" in rendered


# -- the gate's renderers ----------------------------------------------------------------------


def hostile_gate(failed: bool) -> GateResult:
    finding = GateFinding(source=f"::error::{HOSTILE}\n::set-output name=x::%0A", line=2,
                          pair_id=f"{HOSTILE}\n::error file=a,line=1::fake%0A", category="flipped", changed=False,
                          suspicion=0.9, score_safe=None, reward_margin=-1.0, sae_margin=None,
                          quality=[f"empty: {HOSTILE}"])
    return GateResult(baseline=SimpleNamespace(path=Path(HOSTILE_NAME)), sources=[finding.source], pairs=3, new=1,
                      changed=0, findings=[finding], fail_on=("flipped",), max_new=0 if failed else 1)


def test_gate_renderers_keep_data_inert():
    for failed in (True, False):
        result = hostile_gate(failed)
        text = render_text(result)
        assert_inert(text)
        lines = text.splitlines()
        steps = 3 if failed else 0  # what to do next, after a failure
        assert len(lines) == 2 + steps and not any(line.lstrip().startswith("::") for line in lines)
        assert lines[1].startswith("FAILED: " if failed else "passed: ")
        annotations = github_annotations(result)
        assert len(annotations) == 1 + bool(failed)
        for n, line in enumerate(annotations):
            assert_inert(line)
            assert "\n" not in line and "\r" not in line
            command, message = line[2:].split("::", 1)
            # file, line, title (the summary: a title only): nothing injected
            assert command.count(",") == (2 if n == 0 else 0) and command.count(":") == 0
            assert "%250A" in message and "\\x1b]0;pwned\\x07" in message
        junit = render_junit(result)
        assert_inert(junit)
        ET.fromstring(junit.split("\n", 1)[1])
        as_json = render_json_result(result)
        assert_inert(as_json)
        assert json.loads(as_json)["findings"][0]["pair_id"] == result.findings[0].pair_id


def test_json_text_means_the_same():
    from safer_audit.common.terminal import json_text

    value = {HOSTILE: [HOSTILE, "é", "\ud800"]}
    text = json_text(value, indent=2)
    assert_inert(text)
    assert json.loads(text) == value and "é" in text


def test_inert_escapes_every_sequence_visibly():
    shown = inert(HOSTILE)
    assert_inert(shown)
    assert shown.startswith("\\x1b[2J\\x1b]0;pwned\\x07") and "\\x0dPASSED\\x08\\x08\\x9b32m\\u202eevil" in shown
    assert shown.endswith("\\U000e0041")  # eight digits: not "\\ue0041", a BMP escape and a "1"
    assert inert("a\nb\tc", multiline=True) == "a\nb\tc" and inert("a\nb\tc") == "a\\nb\\tc"
