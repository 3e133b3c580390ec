"""Every hint the tool prints sends the user the right way: run as printed, each works."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from safer_audit.cli import cli
from safer_audit.errors import UnknownPairError
from safer_audit.report.view import print_report
from safer_audit.workflows.explain import find_pair

from .conftest import FIXTURES, ROOT
from .test_clean import make_report

TINY = ["--layer", "1", "--max-length", "32", "--latents", "64", "--k", "4", "--epochs", "1", "--n-features", "16"]


def hinted_commands(stderr: str) -> list[list[str]]:
    """The commands of the scan's next steps, as printed (arguments after safer-audit)."""
    steps = stderr[stderr.index("Next steps:"):].splitlines()[1:]
    commands = [shlex.split(line) for line in steps if line.startswith("    safer-audit ")]
    return [words[1:] for words in commands]


def test_every_next_step_the_scan_prints_works_as_printed(tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "fixtures").mkdir()
    shutil.copy(FIXTURES / "hh-harmless-300.jsonl", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    scan = runner.invoke(cli, ["scan", "fixtures/hh-harmless-300.jsonl", "--model", str(tiny_llama_dir), *TINY,
                               "--cache-dir", "cache", "--quiet", "-o", "report.json"])
    assert scan.exit_code == 0, scan.output
    commands = hinted_commands(scan.stderr)
    assert [c[0] for c in commands] == ["scan", "explain", "review", "clean"]
    for args in commands:
        # review from a pipe: decide two suspects, then quit; everything else runs with no input
        result = runner.invoke(cli, args, input="f\nn\nq\n" if args[0] == "review" else "")
        assert result.exit_code == 0, (args, result.output)
    assert Path("report.html").exists() and Path("cleaned.jsonl").exists()
    assert "flipped back 1 and dropped 1 of 300 pairs" in result.stderr  # clean acted on review's decisions


def test_a_list_cut_at_top_says_how_to_see_the_rest(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join('{"chosen": "a%d", "rejected": "b%d"}\n' % (i, i) for i in range(6)))
    report = make_report(data, {0: "flipped", 1: "noisy", 2: "flipped"})
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_report(report, console, top=2)
    text = console.export_text()
    assert "Top 2 of 3 suspects" in text and "--top 3 shows all" in text
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_report(report, console, top=20)
    text = console.export_text()
    assert "Top 3 of 3 suspects" in text and "--top" not in text


def test_file_line_with_a_wrong_file_name_says_the_name_is_the_problem():
    rows = [{"pair_id": f"p{i}", "source": "fixtures/hh-harmless-300.jsonl", "line": i} for i in range(1, 301)]
    with pytest.raises(UnknownPairError) as raised:
        find_pair(rows, "hh-harmless-300.jsonl:125", "fixtures/hh-harmless-300.jsonl")
    message = str(raised.value)
    assert '"hh-harmless-300.jsonl" is not a file of fixtures/hh-harmless-300.jsonl' in message
    assert "write fixtures/hh-harmless-300.jsonl:125, or 125" in message
    assert find_pair(rows, "fixtures/hh-harmless-300.jsonl:125", "x")["pair_id"] == "p125"  # as the hint says
    with pytest.raises(UnknownPairError, match="no pair starts on line 400 of fixtures/hh-harmless-300.jsonl"):
        find_pair(rows, "fixtures/hh-harmless-300.jsonl:400", "x")  # the right name, a wrong line: the line


def test_cache_info_titles_say_what_each_size_counts(tmp_path):
    from safer_audit.workflows.cache_admin import cache_view

    entry = {"model": "m", "layer": 1, "positions": "response", "max_length": 64, "texts": 10,
             "activation_bytes": 3 * 2**20, "bytes": 8 * 2**20}
    summary = {"cache_dir": "c", "entries": [entry], "bytes": 9 * 2**20,
               "kinds": [{"kind": "activations", "bytes": 3 * 2**20}, {"kind": "SAEs", "bytes": 5 * 2**20},
                         {"kind": "other", "bytes": 2**20}]}
    console = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(cache_view(summary))
    text = console.export_text()
    assert "Cache entries, one per model, layer, positions and max length" in text
    assert re.search(r"activations\s+[│┃]\s+entry in all", text) and re.search(r"3\.0 MiB\s+│\s+8\.0 MiB", text)
    assert "Every kind of cache entry, with its size on disk" in text


def test_the_man_page_reads_at_80_columns_without_groff_warnings():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: the man page cannot be rendered here")
    run = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-ww", "-rLL=80n", str(ROOT / "man" / "safer-audit.1")],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    assert run.returncode == 0 and run.stderr == "", run.stderr
    long = [line for line in run.stdout.splitlines() if len(line) > 80]
    assert not long, long
    page = run.stdout
    table = page[page.index("--report R"):page.index("--decisions D")]
    assert re.search(r"--drop-fraction F +the pairs of rank <= F x pairs", table)  # clean's selection stays a table
