"""The plugin manager with a test plugin, a broken plugin, and the first-party jsonl plugin.

The jsonl plugin is reached only through its entry point (``pip install -e
plugins/safer-audit-jsonl``), never imported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from safer_audit.hookspecs import hookimpl
from safer_audit.plugins import exporters, load_plugins, plugin_info
from safer_audit.report.types import Report, export_report

from .test_report import make_report

INSTALL_HINT = "the first-party plugin is not installed: pip install -e plugins/safer-audit-jsonl"


class RecordingExporter:
    """A test plugin: an exporter that records what it was asked to write."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def register_exporters(self, register):
        register("recording", (".rec",), self.export)

    def export(self, report, path):
        self.calls.append((report, path))


@pytest.fixture
def recording_plugin():
    pm = load_plugins()
    plugin = RecordingExporter()
    pm.register(plugin, name="test-recording")
    yield plugin
    pm.unregister(plugin)


def test_a_registered_plugin_exports_through_the_hook(recording_plugin, tmp_path):
    report = make_report()
    assert exporters()["recording"].extensions == (".rec",)
    used = export_report(report, tmp_path / "out.rec")
    assert used.name == "recording"
    assert recording_plugin.calls == [(report, tmp_path / "out.rec")]


def test_plugin_info_lists_a_registered_plugin(recording_plugin):
    info = {i.name: i for i in plugin_info()}["test-recording"]
    assert info.hooks == ["register_exporters"]
    assert info.registers == {"exporters": ["recording"]}


def test_an_unregistered_plugin_is_gone(recording_plugin):
    load_plugins().unregister(recording_plugin)
    assert "recording" not in exporters()
    load_plugins().register(recording_plugin, name="test-recording")  # the fixture unregisters it


# -- the first-party jsonl plugin, through its entry point -------------------------------


def test_jsonl_plugin_is_loaded_from_its_entry_point():
    assert "jsonl" in exporters(), INSTALL_HINT
    info = {i.name: i for i in plugin_info()}["jsonl"]
    assert info.version == "0.1.0"
    assert info.registers == {"exporters": ["jsonl"]}
    assert exporters()["jsonl"].extensions == (".jsonl",)


def test_jsonl_plugin_writes_run_then_one_finding_per_line(tmp_path):
    assert "jsonl" in exporters(), INSTALL_HINT
    report = make_report()
    path = tmp_path / "findings.jsonl"
    assert export_report(report, path).name == "jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 1 + len(report.findings)
    head, findings = records[0], records[1:]
    assert head.pop("type") == "run" and head["schema_version"] == 1
    assert all(finding.pop("type") == "finding" for finding in findings)
    assert [f["rank"] for f in findings] == [1, 2, 3, 4]
    assert Report.from_dict(head | {"findings": findings}) == Report(
        report.run, report.features, sorted(report.findings, key=lambda f: f.rank)
    )


# -- a broken third-party plugin ---------------------------------------------------------


@pytest.fixture
def misspelled_plugin_path(tmp_path):
    """A directory holding an installed-looking distribution whose hook name is misspelled."""
    (tmp_path / "misspelled_plugin.py").write_text(
        textwrap.dedent(
            """
            from safer_audit.hookspecs import hookimpl

            @hookimpl
            def register_exporter(register):
                register("never", (".never",), print)
            """
        )
    )
    dist = tmp_path / "misspelled_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: misspelled-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[safer_audit]\nmisspelled = misspelled_plugin\n")
    return tmp_path


def _run(code: str, plugin_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SAFER_AUDIT_LOAD_PLUGINS"}
    environ.update(PYTHONPATH=str(plugin_path), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60)


def test_a_misspelled_hook_is_a_plugin_error(misspelled_plugin_path):
    code = textwrap.dedent(
        """
        from safer_audit.plugins import PluginError, load_plugins
        errors = 0
        for attempt in range(2):  # asking again must not hide the error
            try:
                load_plugins()
            except PluginError as exc:
                print(exc)
                errors += 1
        raise SystemExit(10 + errors)
        """
    )
    result = _run(code, misspelled_plugin_path)
    assert result.returncode == 12, result.stdout + result.stderr
    assert result.stdout.count("register_exporter") == 2


def test_the_cli_reports_a_misspelled_hook_in_one_line(misspelled_plugin_path):
    result = _run("from safer_audit.cli import main; main(['plugins'])", misspelled_plugin_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ") and "register_exporter" in result.stderr


def test_load_plugins_env_leaves_out_the_broken_plugin(misspelled_plugin_path):
    code = "from safer_audit.plugins import exporters; print(sorted(exporters()))"
    result = _run(code, misspelled_plugin_path, SAFER_AUDIT_LOAD_PLUGINS="jsonl")
    assert result.returncode == 0, result.stderr
    assert "jsonl" in result.stdout and "never" not in result.stdout


def test_built_in_backends_satisfy_the_protocols(tiny_bert_dir):
    """hookspecs names what a backend must provide; the built-in ones provide it."""
    from safer_audit.hookspecs import ModelBackend, SaeBackend
    from safer_audit.plugins import model_backends, sae_backends

    model = model_backends()["hf"](str(tiny_bert_dir))
    assert isinstance(model, ModelBackend)
    assert isinstance(sae_backends()["topk"], SaeBackend)
    assert not isinstance(object(), ModelBackend)
