"""baseline and gate end to end, in temporary git repositories, on a tiny random model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.common.files import render_json
from safer_audit.config import ReadOptions
from safer_audit.data import pair_digest
from safer_audit.hookspecs import hookimpl
from safer_audit.model.activations import load_backend
from safer_audit.plugins import load_plugins
from safer_audit.sae import TopKSAE
from safer_audit.scoring.categories import Cutoffs
from safer_audit.scoring.ranks import percentile_against
from safer_audit.workflows.gate import (
    DEFAULT_FAIL_ON,
    content_digest,
    read_baseline,
    read_sources,
    run_gate,
    score_frozen,
    stored_category,
    stored_suspicion,
)

from .conftest import ROOT, hh_records

SMALL_SAE = ["--latents", "64", "--k", "4", "--n-features", "16"]
N_PAIRS = 30
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=GIT_ENV)


def records() -> list[dict]:
    """HH pairs with an ``id`` field, so that an edited record keeps its id."""
    return [{"id": f"r{i}", **record} for i, record in enumerate(hh_records(N_PAIRS), 1)]


def swapped(record: dict, new_id: str) -> dict:
    return {"id": new_id, "chosen": record["rejected"], "rejected": record["chosen"]}


def write_jsonl(path: Path, rows: list[dict], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def baseline_args(data: Path, out: Path, model_dir: Path, cache: Path) -> list:
    return ["baseline", data, "-o", out, "--model", model_dir, "--layer", "1", "--max-length", "64",
            "--cache-dir", cache, *SMALL_SAE, "--quiet"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_llama_dir) -> Path:
    """A git repository with data.jsonl and its committed baseline (and SAE, heads)."""
    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    write_jsonl(repo / "data.jsonl", records())
    cache = tmp_path_factory.mktemp("cache")
    result = invoke(*baseline_args(repo / "data.jsonl", repo / ".safer-audit" / "baseline.json", tiny_llama_dir,
                                   cache))
    assert result.exit_code == 0, result.output
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data and baseline")
    return repo


@pytest.fixture
def work(repo, tmp_path) -> Path:
    """A private copy of the repository for a test to change."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


def gate(work: Path, *data: Path, extra=(), env=None):
    return invoke("gate", *data, "--baseline", work / ".safer-audit" / "baseline.json",
                  "--cache-dir", work.parent / "cache", "--quiet", *extra, env=env)


def test_baseline_is_small_sorted_deterministic_and_frozen(repo, tiny_llama_dir, tmp_path):
    path = repo / ".safer-audit" / "baseline.json"
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert list(data) == ["content_digest", "header", "pairs"] and len(data["pairs"]) == N_PAIRS
    assert text == render_json(data)  # keys sorted, flat objects on one line
    for pair_id in data["pairs"]:
        assert sum(1 for line in text.splitlines() if line.lstrip().startswith(f'"{pair_id}": {{')) == 1
    header = data["header"]
    assert header["sae"]["path"] == "baseline-sae"  # copied beside the baseline, relative to it
    assert TopKSAE.file_hash(repo / ".safer-audit" / "baseline-sae") == header["sae"]["hash"]
    assert header["model"]["location"] == str(tiny_llama_dir.resolve())  # outside the repo: absolute
    assert header["model"]["reward_head"] is True and header["activations"]["layer"] == 1
    assert len(header["features"]) == 16 and {"latent", "sign", "label"} == set(header["features"][0])
    assert header["thresholds"]["noisy_cutoff"] <= header["thresholds"]["flipped_cutoff"]
    assert "created" not in text and "timings" not in text
    # the same data in a fresh cache (a new extraction and SAE training) gives the same bytes
    again = tmp_path / "again.json"
    result = invoke(*baseline_args(repo / "data.jsonl", again, tiny_llama_dir, tmp_path / "fresh-cache"))
    assert result.exit_code == 0, result.output
    again_data = json.loads(again.read_text(encoding="utf-8"))
    same = json.loads(text.replace("baseline-sae", "again-sae").replace("baseline-heads", "again-heads"))
    assert again_data["header"] == same["header"] and again_data["pairs"] == same["pairs"]


def test_unchanged_data_passes_without_running_the_model(work):
    result = gate(work, work / "data.jsonl", extra=["--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new"] == 0 and report["pairs"] == N_PAIRS and report["findings"] == []
    assert "model" not in report["timings"]


def test_swapped_copies_fail_and_are_named(work):
    rows = records()
    extra = [swapped(rows[i], f"s{i}") for i in (0, 4, 9)]
    data = write_jsonl(work / "data.jsonl", rows + extra)
    before = data.read_bytes()
    result = gate(work, data)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    for n, pair_id in enumerate(("s0", "s4", "s9")):
        line = next(line for line in lines if f"pair {pair_id} " in line)
        assert line.startswith(f"{data}:{N_PAIRS + 1 + n}: new pair {pair_id} is quality")
        assert "contradiction" in line and "score_safe" in line
    assert next(line for line in lines if line.startswith("FAILED: ")).startswith(
        "FAILED: 0 changed pair(s), 3 new suspect pair(s)")
    mark = next(line for line in lines if line.startswith("next: ") and "--mark-ok" in line)
    assert all(f"--mark-ok s{i}" in mark for i in (0, 4, 9))  # one option each: DATA takes the other words
    assert data.read_bytes() == before  # inputs are never written
    # the gate fails on what it is told to: tolerating 3 passes
    assert gate(work, data, extra=["--max-new", "3"]).exit_code == 0


def test_an_edited_record_that_keeps_its_id_is_gated(work):
    rows = records()
    rows[2]["chosen"] = rows[2]["chosen"] + " I must add something."
    result = gate(work, write_jsonl(work / "data.jsonl", rows), extra=["--format", "json", "--fail-on", "noisy"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["new"] == 1 and report["changed"] == 1
    assert all(f["pair_id"] == "r3" and f["changed"] for f in report["findings"])


@pytest.mark.parametrize("bad, message", [
    ("{not json\n", ':31: invalid JSON'),
    ('{"id": "x", "chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n', ':31: field "rejected" is missing'),
])
def test_malformed_line_exits_2_with_file_and_line(work, bad, message):
    data = write_jsonl(work / "data.jsonl", records(), extra=bad)
    result = gate(work, data)
    assert result.exit_code == 2, result.output
    assert f"Error: {data}{message}" in result.stderr
    assert "Traceback" not in result.output


def test_junit_and_github_annotations(work):
    rows = records()
    data = write_jsonl(work / "data.jsonl", rows + [swapped(rows[1], "s1"), swapped(rows[2], "s2")])
    other = write_jsonl(work / "more.jsonl", [])
    result = gate(work, data, other, extra=["--format", "junit"], env={"GITHUB_ACTIONS": "true"})
    assert result.exit_code == 2 and "contains no records" in result.stderr  # an empty file is unusable
    other = write_jsonl(work / "more.jsonl", rows[:3])
    result = gate(work, data, other, extra=["--format", "junit"], env={"GITHUB_ACTIONS": "true"})
    assert result.exit_code == 1, result.output
    suites = ET.fromstring(result.stdout)
    assert suites.get("failures") == "2" and suites.get("tests") == "3"
    failing = [case for case in suites.iter("testcase") if case.find("failure") is not None]
    assert sorted(case.get("name") for case in failing) == [f"{data}:{N_PAIRS + 1} s1", f"{data}:{N_PAIRS + 2} s2"]
    assert {case.find("failure").get("type") for case in failing} == {"quality"}
    passing = [case for case in suites.iter("testcase") if case.find("failure") is None]
    assert [case.get("file") for case in passing] == [str(other)]
    annotations = [line for line in result.stderr.splitlines() if line.startswith("::")]
    assert len(annotations) == 3 and "next: " in annotations[2] and "--mark-ok" in annotations[2]
    assert all("next: " in case.find("failure").text for case in failing)
    assert annotations[0].startswith(f"::error file={str(data).replace(':', '%3A')},line={N_PAIRS + 1},")
    plain = gate(work, data, other)
    assert "::error" not in plain.stderr  # only under GitHub Actions


def test_update_baseline_accepts_the_current_state(repo, work):
    rows = records()
    data = write_jsonl(work / "data.jsonl", rows[1:] + [swapped(rows[5], "s5")])
    result = gate(work, data, extra=["--update-baseline"])
    assert result.exit_code == 0, result.output
    assert "pair s5 is quality" in result.stdout and "updated" in result.stderr
    updated = read_baseline(work / ".safer-audit" / "baseline.json")
    assert set(updated.pairs) == {r["id"] for r in rows[1:]} | {"s5"}
    assert updated.pairs["s5"]["category"] == "quality"
    assert gate(work, data).exit_code == 0
    frozen = read_baseline(repo / ".safer-audit" / "baseline.json").header
    # the reference is frozen; the cut-offs are those of the accepted pairs, which the gate checks
    assert {k: v for k, v in updated.header.items() if k != "thresholds"} == \
        {k: v for k, v in frozen.items() if k != "thresholds"}
    rows = records()
    assert gate(work, write_jsonl(work / "data.jsonl", rows[1:] + [swapped(rows[5], "s5"), swapped(rows[6], "s6")]),
                extra=["--fail-on", "noisy"]).exit_code in (0, 1)  # not refused as edited


def reseal(path: Path, data: dict) -> None:
    """Write an edited baseline with its content digest made again: what a careful forger would do."""
    data["content_digest"] = content_digest(data["header"], data["pairs"])
    path.write_text(render_json(data), encoding="utf-8")


def test_another_reference_is_a_clear_error(repo, work):
    path = work / ".safer-audit" / "baseline.json"
    data = json.loads(path.read_text())
    data["header"]["tool_version"] = "0.0.1"
    reseal(path, data)
    result = gate(work, work / "data.jsonl")
    assert result.exit_code == 2
    assert "tool version 0.0.1 (now" in result.stderr and "Traceback" not in result.output
    data["header"]["tool_version"] = read_baseline(repo / ".safer-audit" / "baseline.json").header["tool_version"]
    data["header"]["model"]["fingerprint"] = "0" * 16
    reseal(path, data)
    assert gate(work, work / "data.jsonl").exit_code == 0  # nothing new: the model is not run
    rows = records()
    new = write_jsonl(work / "data.jsonl", rows + [swapped(rows[0], "s0")])
    result = gate(work, new)
    assert result.exit_code == 2 and "fingerprint" in result.stderr and "0" * 16 in result.stderr
    weights = work / ".safer-audit" / "baseline-sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    result = gate(work, work / "data.jsonl")
    assert result.exit_code == 2 and "baseline-sae has hash" in result.stderr


def test_bad_options_and_missing_baseline_exit_2(work):
    result = invoke("gate", work / "data.jsonl", "--baseline", work / "nope.json")
    assert result.exit_code == 2 and "no baseline here" in result.stderr
    result = gate(work, work / "data.jsonl", extra=["--fail-on", "flipped,typo"])
    assert result.exit_code == 2 and "'typo' is not one of" in result.output


def test_frozen_scoring_reproduces_the_baseline_scores(repo):
    baseline = read_baseline(repo / ".safer-audit" / "baseline.json")
    pairs = read_sources([str(repo / "data.jsonl")])
    config = baseline.activation_config(repo.parent / "unused-cache")
    backend = load_backend(config)
    sae = TopKSAE.load(baseline.resolve(baseline.header["sae"]["path"]))
    signals = score_frozen(pairs, baseline, backend, sae, config)
    for i, pair_id in enumerate(pairs["pair_id"].to_list()):
        stored = baseline.pairs[pair_id]
        # same SAE, features and model head: the same numbers (the SAE-code margin was cross-fitted)
        for name in ("score_safe", "reward_margin"):
            assert float(signals[name][i]) == pytest.approx(stored[name], rel=1e-5, abs=1e-6)


def test_a_pair_the_gate_scores_gets_its_scan_signals_and_category(repo, work):
    """The pairs of the baseline under new ids are all new to the gate, which scores them with the
    frozen reference against the baseline: each gets the signals and category the scan gave it."""
    baseline = read_baseline(work / ".safer-audit" / "baseline.json")
    data = write_jsonl(work / "renamed.jsonl", [{**r, "id": f"{r['id']}-again"} for r in records()])
    result = run_gate([str(data)], work / ".safer-audit" / "baseline.json", cache_dir=work.parent / "cache")
    assert result.new == N_PAIRS
    for pair_id, stored in baseline.pairs.items():
        scored = result.new_entries[f"{pair_id}-again"]
        # sae_margin is not compared: the scan's is cross-fitted, the gate's head saw every baseline pair
        for name in ("score_safe", "reward_margin"):
            assert scored[name] == pytest.approx(stored[name], rel=1e-5, abs=1e-6)
        assert scored["category"] == stored["category"], pair_id
    assert {e["category"] for e in baseline.pairs.values()} != {"clean"}  # suspects are compared too


def test_baseline_digests_are_the_pair_digests(repo):
    """A baseline names a pair as clean, decisions and reports do: data.pair_digest."""
    baseline = read_baseline(repo / ".safer-audit" / "baseline.json")
    for row in read_sources([str(repo / "data.jsonl")]).iter_rows(named=True):
        assert baseline.pairs[row["pair_id"]]["digest"] == pair_digest(row["context"], row["chosen"], row["rejected"])


def test_percentile_against_the_baseline_distribution():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0, float("nan")])
    values = torch.tensor([0.0, 2.0, 3.0, 4.0, float("nan")])
    out = percentile_against(values, reference)
    assert out[:4].tolist() == [1.0, 0.5, 0.125, 0.0]
    assert torch.isnan(out[4])


def test_run_gate_refuses_an_unknown_category(repo):
    with pytest.raises(ValueError, match="cannot fail on 'clean'"):
        run_gate([str(repo / "data.jsonl")], repo / ".safer-audit" / "baseline.json", fail_on=("clean",))


def test_hook_definitions():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert [h["id"] for h in hooks] == ["safer-audit-gate"]
    hook = hooks[0]
    assert hook["entry"] == "safer-audit gate --baseline .safer-audit/baseline.json"
    # system: the installed safer-audit runs it; pre-commit builds no environment (no second torch)
    assert hook["language"] == "system" and hook["pass_filenames"] is True
    assert "files" not in hook and "types" not in hook  # left to the user
    example = yaml.safe_load((ROOT / "examples" / "pre-commit-config.yaml").read_text())
    assert [repo["repo"] for repo in example["repos"]] == ["local"]  # no rev to name until a release is tagged
    used = [h for repo in example["repos"] for h in repo["hooks"]]
    assert [h["id"] for h in used] == ["safer-audit-gate"] and used[0]["files"]
    assert {k: v for k, v in used[0].items() if k != "files"} == {k: v for k, v in hook.items() if k != "description"}
    documented = (ROOT / "docs" / "gate.md").read_text().split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(documented) == example  # the docs show the example as it is


def _pre_commit_env(work: Path) -> dict:
    """pre-commit with the environment this test runs in on PATH: where safer-audit is installed."""
    installed = Path(sys.executable).parent
    if not (installed / "safer-audit").exists():
        pytest.skip(f"no safer-audit script beside {sys.executable} (the package is not installed)")
    env = {**GIT_ENV, "PRE_COMMIT_HOME": str(work.parent / "pre-commit-home"), "HF_HUB_OFFLINE": "1",
           "SAFER_AUDIT_CACHE_DIR": str(work.parent / "cache"), "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GITHUB_ACTIONS", None)
    return env


def _no_environment_built(home: Path) -> None:
    built = [p.name for p in home.rglob("*") if p.is_dir() and "_env-" in p.name]  # py_env-python3, ...
    assert not built, built  # a python hook would have installed safer-audit, and torch, here


def test_the_example_pre_commit_config_works_as_written(work):
    """examples/pre-commit-config.yaml copied as it is, run by the real pre-commit in a scratch repository:
    a commit that adds a flipped pair is blocked, one that only removes a pair passes."""
    pytest.importorskip("pre_commit", reason="pre-commit is not installed (pip install -e '.[test]')")
    env = _pre_commit_env(work)
    shutil.copyfile(ROOT / "examples" / "pre-commit-config.yaml", work / ".pre-commit-config.yaml")
    (work / "data").mkdir()
    git(work, "mv", "data.jsonl", "data/pairs.jsonl")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "data under data/, the example hook config")
    pre_commit = [sys.executable, "-m", "pre_commit"]
    subprocess.run([*pre_commit, "install"], cwd=work, env=env, check=True, capture_output=True)
    rows = records()
    write_jsonl(work / "data" / "pairs.jsonl", rows + [swapped(rows[3], "s3")])
    git(work, "add", "data/pairs.jsonl")
    bad = subprocess.run(["git", "commit", "-m", "add a pair"], cwd=work, env=env, capture_output=True, text=True)
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0, output
    assert "safer-audit gate" in output and "Failed" in output
    assert f"data/pairs.jsonl:{N_PAIRS + 1}: new pair s3 is" in output
    write_jsonl(work / "data" / "pairs.jsonl", rows[1:])
    git(work, "add", "data/pairs.jsonl")
    good = subprocess.run(["git", "commit", "-m", "drop a pair"], cwd=work, env=env, capture_output=True, text=True)
    output = good.stdout + good.stderr  # the hook's status line: stdout or stderr, by pre-commit's version
    assert good.returncode == 0, output
    assert re.search(r"safer-audit gate\.+Passed", output), output
    _no_environment_built(work.parent / "pre-commit-home")


def test_the_repositorys_hook_runs_through_pre_commit_try_repo(work):
    """.pre-commit-hooks.yaml itself, as a user naming this repository would get it."""
    pytest.importorskip("pre_commit", reason="pre-commit is not installed (pip install -e '.[test]')")
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-dir"], capture_output=True).returncode:
        pytest.skip(f"{ROOT} is not a git repository: pre-commit can only clone a hook from one")
    env = _pre_commit_env(work)
    rows = records()
    write_jsonl(work / "data.jsonl", rows + [swapped(rows[3], "s3")])
    git(work, "add", "data.jsonl")
    run = subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(ROOT), "safer-audit-gate", "--files",
                          "data.jsonl"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"data.jsonl:{N_PAIRS + 1}: new pair s3 is" in run.stdout
    _no_environment_built(work.parent / "pre-commit-home")


def test_removed_pairs_are_listed_and_fail_only_when_asked(work):
    rows = records()
    data = write_jsonl(work / "data.jsonl", rows[:3] + rows[5:])
    result = gate(work, data)
    assert result.exit_code == 0, result.output
    removed = [line for line in result.stdout.splitlines() if line.startswith("removed pair")]
    assert [line.split()[2] for line in removed] == ["r4", "r5"]
    assert all(line.endswith("(not failing)") for line in removed) and "2 removed" in result.stdout
    result = gate(work, data, extra=["--fail-on", "flipped,quality,removed"])
    assert result.exit_code == 1 and any(line.startswith("FAILED:") for line in result.stdout.splitlines())
    report = json.loads(gate(work, data, extra=["--format", "json"]).stdout)
    assert [r["pair_id"] for r in report["removed"]] == ["r4", "r5"] and not report["failed"]
    junit = ET.fromstring(gate(work, data, extra=["--format", "junit", "--fail-on", "removed"]).stdout)
    assert junit.get("failures") == "2" and len(junit.findall(".//failure[@type='removed']")) == 2


def test_a_pair_swapped_in_place_is_changed_with_old_and_new_scores(work):
    rows = records()
    rows[4] = swapped(rows[4], "x5")  # its responses swapped, and so another id
    old = json.loads((work / ".safer-audit" / "baseline.json").read_text())["pairs"]["r5"]
    result = gate(work, write_jsonl(work / "data.jsonl", rows), extra=["--format", "json", "--fail-on", "noisy"])
    report = json.loads(result.stdout)
    assert report["removed"] == [] and report["changed"] == 1
    change = report["changed_pairs"][0]
    assert (change["pair_id"], change["previous_id"], change["line"]) == ("x5", "r5", 5)
    assert change["old"]["score_safe"] == old["score_safe"] and change["new"]["score_safe"] != old["score_safe"]
    text = gate(work, work / "data.jsonl", extra=["--fail-on", "noisy"]).stdout
    line = next(line for line in text.splitlines() if "pair x5" in line)
    assert line.startswith(f"{work / 'data.jsonl'}:5: pair x5: chosen and rejected swapped (was pair r5)")
    assert f"score_safe {old['score_safe']:.4g}" in line  # the old score, next to the new one


def test_a_suspect_marked_ok_never_fails(work):
    from safer_audit.data import load_pairs, pair_digest
    from safer_audit.workflows.decisions import decide, write_decisions

    rows = records()
    data = write_jsonl(work / "data.jsonl", rows + [swapped(rows[i], f"s{i}") for i in (0, 4)])
    assert gate(work, data).exit_code == 1
    decisions = {}
    for row in load_pairs(data).pairs.iter_rows(named=True):
        if row["pair_id"] in ("s0", "s4"):
            decide(decisions, pair_digest(row["context"], row["chosen"], row["rejected"]), "ok", reviewer="Ann")
    write_decisions(work / ".safer-audit" / "decisions.json", decisions)  # found next to the baseline
    result = gate(work, data)
    assert result.exit_code == 0, result.output
    listed = [line for line in result.stdout.splitlines() if "new pair s" in line]
    assert len(listed) == 2 and all(line.endswith("(not failing: marked ok in review)") for line in listed)
    # a decision on another pair does not clear these
    other = work / "other.json"
    write_decisions(other, {})
    assert gate(work, data, extra=["--decisions", other]).exit_code == 1


def test_baseline_records_its_read_options_whole_and_the_backends(repo):
    header = json.loads((repo / ".safer-audit" / "baseline.json").read_text(encoding="utf-8"))["header"]
    assert header["data"] == ReadOptions().to_dict()  # every read option, max_record_bytes too
    assert header["model"]["backend"] == "hf" and header["sae"]["backend"] == "topk"


class CountingFormat:
    """A third-party gate format: one line with the number of new suspects."""

    @hookimpl
    def register_gate_formats(self, register):
        register("count", lambda result: f"{len(result.findings)} new suspect(s)\n")


def test_a_plugin_adds_a_gate_format_and_an_unknown_one_is_refused_before_the_data_is_read(work):
    rows = records()
    data = write_jsonl(work / "data.jsonl", rows + [swapped(rows[1], "s1")])
    manager = load_plugins()
    manager.register(CountingFormat(), name="test-count-format")
    try:
        result = gate(work, data, extra=["--format", "count"])
        assert result.exit_code == 1 and result.stdout.strip() == "1 new suspect(s)"
    finally:
        manager.unregister(name="test-count-format")
    refused = gate(work, work / "missing.jsonl", extra=["--format", "xml"])
    assert refused.exit_code == 2 and "unknown gate format 'xml' (known: json, junit, text" in refused.stderr


# --- label changes fail by default ---------------------------------------------------------


def test_the_defaults_the_help_states_are_the_ones_in_use():
    from safer_audit.cli import baseline_command, gate_command

    fail_on = next(p for p in gate_command.params if p.name == "fail_on")
    assert tuple(fail_on.default.split(",")) == DEFAULT_FAIL_ON == ("flipped", "quality", "changed")
    assert "flipped or broken, and on changed labels" in gate_command.help
    flipped = next(p for p in baseline_command.params if p.name == "flipped_fraction")
    assert flipped.default == 0.04  # the cut measured best for the gate (BENCHMARKS.md), a scan's too


@pytest.mark.parametrize("new_id", ["x5", "r5"])
def test_a_pair_swapped_in_place_fails_by_default_and_says_what_to_do(work, new_id):
    rows = records()
    rows[4] = swapped(rows[4], new_id)  # another id (an automatic id would change too), or the same one kept
    data = write_jsonl(work / "data.jsonl", rows)
    result = gate(work, data)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    how = "(was pair r5)" if new_id == "x5" else "under its id"
    line = next(line for line in lines if f"pair {new_id}:" in line)
    assert line.startswith(f"{data}:5: pair {new_id}: chosen and rejected swapped {how}; ")
    assert "prefer" in line and line.endswith(f"(failing: accept it with --mark-ok {new_id} once reviewed)")
    assert any(line.startswith("FAILED: 1 changed pair(s), 0 new suspect pair(s)") for line in lines)
    steps = [line for line in lines if line.startswith("next: ")]
    assert len(steps) == 3 and "safer-audit explain" in steps[0] and f"--mark-ok {new_id}` records" in steps[1]
    assert "--update-baseline" in steps[2]
    report = json.loads(gate(work, data, extra=["--format", "json"]).stdout)
    assert report["failed"] and report["failing_pairs"] == [new_id] and len(report["next_steps"]) == 3
    assert report["changed_pairs"][0]["change"] == "swapped"
    # failing on the scan's categories alone, as before: the swap is listed, not failing
    assert gate(work, data, extra=["--fail-on", "flipped,quality"]).exit_code == 0
    command = steps[1].split("`")[1].split()
    assert gate(work, *map(Path, command[2:command.index("--baseline")]), extra=command[command.index("--baseline"):]
                ).exit_code == 0  # the command it gives works: the pair is marked ok


def test_an_edited_response_under_a_kept_id_fails_by_default(work):
    rows = records()
    rows[2]["chosen"] = rows[2]["chosen"] + " Actually, here is how to do it anyway."
    data = write_jsonl(work / "data.jsonl", rows)
    result = gate(work, data)
    assert result.exit_code == 1, result.output
    line = next(line for line in result.stdout.splitlines() if "pair r3:" in line)
    assert line.startswith(f"{data}:3: pair r3: context or responses edited under its id; ")
    assert "(failing: accept it with --mark-ok r3 once reviewed)" in line


def test_a_reviewed_swap_passes(work):
    rows = records()
    rows[4] = swapped(rows[4], "r5")
    data = write_jsonl(work / "data.jsonl", rows)
    assert gate(work, data).exit_code == 1
    refused = gate(work, data, extra=["--mark-ok", "r7"])  # not listed: unchanged
    assert refused.exit_code == 2 and "--mark-ok r7: not a pair this gate lists" in refused.stderr
    marked = gate(work, data, extra=["--mark-ok", "r5"])
    assert marked.exit_code == 0, marked.output
    assert "marked 1 pair(s) ok in" in marked.stderr
    decisions = json.loads((work / ".safer-audit" / "decisions.json").read_text())
    assert len(decisions["decisions"]) == 1 if "decisions" in decisions else len(decisions) == 1
    result = gate(work, data)  # decisions.json beside the baseline: reviewed, so it passes
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "pair r5:" in line)
    assert line.endswith("(not failing: marked ok in review)")
    # the decision is on the content: edited again, the pair fails again
    rows[4]["chosen"] += " More."
    assert gate(work, write_jsonl(work / "data.jsonl", rows)).exit_code == 1


# --- a baseline cannot be edited into a pass ---------------------------------------------------


def _tamper(work: Path, edit, *, seal: bool = True) -> Path:
    path = work / ".safer-audit" / "baseline.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    if seal:
        reseal(path, data)
    else:
        path.write_text(render_json(data), encoding="utf-8")
    return path


def _with_new_flips(work: Path) -> Path:
    rows = records()
    return write_jsonl(work / "data.jsonl", rows + [swapped(rows[i], f"s{i}") for i in (0, 4, 9)])


def _refused(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _scores_at(value: float):
    def edit(data):
        for entry in data["pairs"].values():
            entry["score_safe"] = value
    return edit


def _recut(data: dict) -> None:
    """Cut-offs and categories made again from the edited scores, as the baseline would: only a re-score
    can tell."""
    t = data["header"]["thresholds"]
    cut = Cutoffs.from_ranking(stored_suspicion(data["pairs"], data["header"]["ranking"]), t["flipped_fraction"],
                               t["noisy_fraction"])
    t["flipped_cutoff"], t["noisy_cutoff"] = cut.flipped, cut.noisy
    suspicion = stored_suspicion(data["pairs"], data["header"]["ranking"]).tolist()
    for entry, value in zip(data["pairs"].values(), suspicion, strict=True):
        entry["category"] = stored_category(entry, value, data["header"]["ranking"], cut)


def _negate_signs(data: dict) -> None:
    """Signs and scores negated together, the cut-offs made again: the categories no longer fit."""
    for feature in data["header"]["features"]:
        feature["sign"] = -feature["sign"]
    for entry in data["pairs"].values():
        entry["score_safe"] = -entry["score_safe"]
    t = data["header"]["thresholds"]
    cut = Cutoffs.from_ranking(stored_suspicion(data["pairs"], data["header"]["ranking"]), t["flipped_fraction"],
                               t["noisy_fraction"])
    t["flipped_cutoff"], t["noisy_cutoff"] = cut.flipped, cut.noisy


@pytest.mark.parametrize("edit, needles", [
    (_scores_at(-1000.0), ['"header.thresholds.', "the baseline's scores and fractions give"]),
    (lambda d: (_scores_at(-1000.0)(d), _recut(d)), ['field "pairs.', '.score_safe" is -1000.0, but its frozen SAE']),
    (lambda d: d["header"]["thresholds"].update(flipped_cutoff=None, noisy_cutoff=None),
     ['"header.thresholds.flipped_cutoff" is None, but']),
    (_negate_signs, ['.category" is', "but its scores and the cut-offs make it"]),
    (lambda d: [f.update(sign=-f["sign"]) for f in d["header"]["features"]], ["but its frozen SAE"]),
    (lambda d: d["header"]["data"].update(skip_invalid=True, max_record_bytes=1),
     ["skip 33 record(s), 0 when", "skip_invalid true, max_record_bytes 1"]),
])
def test_a_baseline_edited_into_a_pass_is_refused(work, edit, needles):
    data = _with_new_flips(work)
    assert gate(work, data).exit_code == 1  # what the edits try to turn into a pass
    _tamper(work, edit)
    _refused(gate(work, data), *needles)


def test_an_edit_that_keeps_the_types_breaks_the_content_digest(work):
    _tamper(work, _scores_at(-1000.0), seal=False)
    _refused(gate(work, work / "data.jsonl"), "content digest", "does not match its header and pairs")


@pytest.mark.parametrize("heads_path", ["/dev/zero", "../../outside.safetensors", "fifo.safetensors"])
def test_a_baseline_pointing_outside_its_directory_or_at_a_fifo_is_refused_at_once(work, heads_path):
    """Run as a process with a deadline: a read of /dev/zero or a FIFO would otherwise never end."""
    if heads_path == "fifo.safetensors":
        os.mkfifo(work / ".safer-audit" / heads_path)
    path = _tamper(work, lambda d: d["header"]["heads"].update(path=heads_path))
    done = subprocess.run([sys.executable, "-m", "safer_audit", "gate", str(work / "data.jsonl"), "--baseline",
                           str(path), "--cache-dir", str(work.parent / "cache")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ("header.heads.path" in lines[0] or "is a FIFO" in lines[0]), lines


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_baseline_that_is_a_fifo_or_a_device_is_refused_at_once(work, kind):
    path = work / "fifo.json"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path(kind)
    done = subprocess.run([sys.executable, "-m", "safer_audit", "gate", str(work / "data.jsonl"), "--baseline",
                           str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ("a FIFO" in lines[0] or "a character device" in lines[0]), lines


def test_records_skipped_by_the_read_options_are_counted_and_more_fail(work, tiny_llama_dir):
    """A baseline made with skip_invalid counts what it skipped; the gate says how many it skips, and
    refuses when that grew."""
    data = write_jsonl(work / "data.jsonl", records(), extra="{not json\n")
    out = work / ".safer-audit" / "skip.json"
    made = invoke(*baseline_args(data, out, tiny_llama_dir, work.parent / "cache"), "--skip-invalid")
    assert made.exit_code == 0 and "1 records skipped" in made.stdout, made.output
    assert read_baseline(out).header["skipped"] == 1
    result = invoke("gate", data, "--baseline", out, "--quiet")
    assert result.exit_code == 0 and "1 records skipped by the read options" in result.stdout, result.output
    write_jsonl(data, records(), extra="{not json\n[]\n")
    _refused(invoke("gate", data, "--baseline", out, "--quiet"), "skip 2 record(s), 1 when")


def test_a_new_pair_in_score_safes_far_tail_counts_as_the_attacks_pick():
    import torch

    from safer_audit.workflows.gate import SALIENT_TAIL, percentiles_against, salient_tail

    class Reference:  # a baseline of 1,000 pairs whose score_safe runs 0 .. 999
        pairs: dict = {}

        def signal(self, name):
            return torch.arange(1000, dtype=torch.float64)

    lowest = round(1000 * SALIENT_TAIL)
    column = [-5.0, lowest - 1.5, lowest + 0.5, 500.0, None]
    values = {name: column for name in ("score_safe", "reward_margin", "sae_margin")}
    percentiles = percentiles_against(values, Reference(), [None] * len(column))
    assert salient_tail(percentiles) == [True, True, False, False, False]
