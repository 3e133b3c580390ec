"""baseline and gate end to end, in temporary git repositories, on a tiny random model."""

from __future__ import annotations

import json
import os
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
from safer_audit.scoring.ranks import percentile_against
from safer_audit.workflows.gate import read_baseline, read_sources, run_gate, score_frozen

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
    return ["baseline", data, "--out", out, "--model", model_dir, "--layer", "1", "--max-length", "64",
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
    assert list(data) == ["header", "pairs"] and len(data["pairs"]) == N_PAIRS
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
    assert again.read_text(encoding="utf-8") == text.replace("baseline-sae", "again-sae").replace(
        "baseline-heads", "again-heads")


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
    assert lines[-1].startswith("FAILED: 3 new suspect pair(s)")
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
    assert len(annotations) == 2
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
    assert updated.header == read_baseline(repo / ".safer-audit" / "baseline.json").header  # frozen


def test_another_reference_is_a_clear_error(repo, work):
    path = work / ".safer-audit" / "baseline.json"
    data = json.loads(path.read_text())
    data["header"]["tool_version"] = "0.0.1"
    path.write_text(render_json(data))
    result = gate(work, work / "data.jsonl")
    assert result.exit_code == 2
    assert "tool version 0.0.1 (now" in result.stderr and "Traceback" not in result.output
    data["header"]["tool_version"] = read_baseline(repo / ".safer-audit" / "baseline.json").header["tool_version"]
    data["header"]["model"]["fingerprint"] = "0" * 16
    path.write_text(render_json(data))
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
    assert hook["language"] == "python" and hook["pass_filenames"] is True
    assert "files" not in hook and "types" not in hook  # left to the user
    example = yaml.safe_load((ROOT / "examples" / "pre-commit-config.yaml").read_text())
    used = [h for repo in example["repos"] for h in repo["hooks"]]
    assert [h["id"] for h in used] == ["safer-audit-gate"] and used[0]["files"]


def test_the_hook_runs_through_pre_commit(work):
    """The hook's entry, run by the real pre-commit as a local hook (its python hook would
    need the network to build its own environment), in a fresh repository."""
    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())[0]
    executable = Path(sys.executable).parent / "safer-audit"
    assert hook["entry"].startswith("safer-audit ")
    config = {"repos": [{"repo": "local", "hooks": [{
        **{k: v for k, v in hook.items() if k != "language"}, "language": "system",
        "entry": str(executable) + hook["entry"][len("safer-audit"):], "files": r"^data\.jsonl$"}]}]}
    (work / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config))
    env = {**GIT_ENV, "PRE_COMMIT_HOME": str(work.parent / "pre-commit-home"),
           "SAFER_AUDIT_CACHE_DIR": str(work.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("GITHUB_ACTIONS", None)
    git(work, "add", ".pre-commit-config.yaml")
    pre_commit = [sys.executable, "-m", "pre_commit"]
    run = subprocess.run([*pre_commit, "run", "--files", "data.jsonl"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Passed" in run.stdout
    subprocess.run([*pre_commit, "install"], cwd=work, env=env, check=True, capture_output=True)
    rows = records()
    write_jsonl(work / "data.jsonl", rows + [swapped(rows[3], "s3")])
    git(work, "add", "data.jsonl")
    commit = subprocess.run(["git", "commit", "-m", "add a pair"], cwd=work, env=env, capture_output=True, text=True)
    assert commit.returncode != 0, commit.stdout + commit.stderr
    output = commit.stdout + commit.stderr
    assert "Failed" in output and f"data.jsonl:{N_PAIRS + 1}: new pair s3 is quality" in output


def test_removed_pairs_are_listed_and_fail_only_when_asked(work):
    rows = records()
    data = write_jsonl(work / "data.jsonl", rows[:3] + rows[5:])
    result = gate(work, data)
    assert result.exit_code == 0, result.output
    removed = [line for line in result.stdout.splitlines() if line.startswith("removed pair")]
    assert [line.split()[2] for line in removed] == ["r4", "r5"]
    assert all(line.endswith("(not failing)") for line in removed) and "2 removed" in result.stdout
    result = gate(work, data, extra=["--fail-on", "flipped,quality,removed"])
    assert result.exit_code == 1 and result.stdout.splitlines()[-1].startswith("FAILED:")
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
    assert line.startswith(f"{work / 'data.jsonl'}:5: ") and "swapped in place" in line and "r5" in line
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
