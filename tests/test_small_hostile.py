"""Smaller hostile cases: control bytes in md/html, ties at a cut-off, a schema mix in one file,
and a plugin allow-list naming no plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from safer_audit.data import load_pairs
from safer_audit.errors import DataError
from safer_audit.report.types import export_report
from safer_audit.scoring.categories import categorise

from .test_report import make_report

RAW_CONTROLS = ("\x1b", "\x07", "\x08", "\x9b")


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_control_bytes_from_the_data_never_reach_md_or_html(tmp_path, suffix):
    report = make_report()
    finding = report.findings[0]
    finding.chosen = "step one \x1b[2J\x1b]0;pwned\x07 then\x08\x9b32m done"
    finding.context = "\n\nHuman: \x1b[8mhidden\x1b[0m"
    finding.pair_id = "id-\x1b[31m"
    path = export_report(report, tmp_path / f"r{suffix}") and tmp_path / f"r{suffix}"
    text = path.read_text(encoding="utf-8")
    assert not any(control in text for control in RAW_CONTROLS)
    assert "x1b" in text  # written out, so a reader sees that it was there


def _categories(values, fraction=0.1):
    signals = {"score_safe": -torch.ones(len(values))}
    return categorise(torch.tensor(values, dtype=torch.float64), signals, [[] for _ in values],
                      flipped_fraction=0.0, noisy_fraction=fraction)


def test_identical_suspicions_do_not_all_become_noisy():
    assert _categories([0.5] * 60).count("noisy") == 0


def test_a_tie_across_the_boundary_stays_out_and_order_does_not_matter():
    values = [3.0, 2.0] + [1.0] * 8 + [0.0] * 10  # 10% of 20 is 2 pairs; the tie at 1.0 is not split
    assert _categories(values).count("noisy") == 2
    values = [3.0] + [2.0] * 3 + [0.0] * 16  # the second place ties with two more: only the first is in
    categories = _categories(values)
    assert categories.count("noisy") == 1 and categories[0] == "noisy"
    assert sorted(_categories(list(reversed(values)))) == sorted(categories)
    values = [0.9, 0.9] + [0.1 * i for i in range(8, 0, -1)] + [0.0, 0.0]  # 1.2 pairs asked: the tied 2 are nearer
    assert _categories(values).count("noisy") == 2


def test_a_prompt_record_inside_an_hh_file_is_an_error_not_a_dropped_prompt(tmp_path):
    path = tmp_path / "mixed.jsonl"
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    prompt = {"prompt": "how do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a pin."}
    path.write_text(json.dumps(hh) + "\n" + json.dumps(prompt) + "\n")
    with pytest.raises(DataError) as caught:
        load_pairs(str(path))
    assert caught.value.line == 2 and '"prompt" record' in str(caught.value)
    forced = load_pairs(str(path), schema="hh", max_errors=10, skip_invalid=True)  # forced: the user chose
    assert len(forced.pairs) == 2


def test_an_allow_list_that_names_no_installed_plugin_warns():
    env = {"SAFER_AUDIT_LOAD_PLUGINS": "nonexistent", "HF_HUB_OFFLINE": "1", "PATH": ""}
    run = subprocess.run([sys.executable, "-c", "from safer_audit.cli import main; main(['plugins', '--format', 'json'])"],
                         capture_output=True, text=True, env={**__import__("os").environ, **env}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Warning: SAFER_AUDIT_LOAD_PLUGINS names 'nonexistent'" in run.stderr
