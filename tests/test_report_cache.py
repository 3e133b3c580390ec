"""The report cache: a scan of the same file with the same options, code and model reads its report back (the same
files and terminal output, no torch); anything in the key changed is scanned again; a damaged entry is never used."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.pipeline.report_cache import entry_path, report_key, scan_report
from safer_audit.report.types import export_report

from .conftest import registered_plugin, tiny_scan_config, write_hh_pairs
from .test_startup_imports import heavy, run

TINY = ("--layer", "1", "--max-length", "64", "--latents", "64", "--k", "4", "--n-features", "16")
OUTPUTS = ("report.json", "report.html", "report.csv", "report.parquet", "report.md")


def without_importtime(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("import time:"))


def comparable(report) -> dict:
    """A report's content, less when it was made and how long its stages took."""
    data = report.to_dict()
    data["run"].pop("created")
    data["run"].pop("timings")
    return data


def test_a_second_scan_writes_and_prints_the_same_without_torch(tiny_llama_dir, tmp_path):
    write_hh_pairs(tmp_path / "data.jsonl", 24)
    args = ["scan", "data.jsonl", "--model", tiny_llama_dir, *TINY, "--cache-dir", "cache",
            *(item for name in OUTPUTS for item in ("-o", f"out/{name}"))]
    (tmp_path / "out").mkdir()
    first, imported = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "torch" in imported  # it scanned
    (tmp_path / "out").rename(tmp_path / "first")
    (tmp_path / "out").mkdir()

    second, imported = run(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert heavy(imported) == []
    for name in OUTPUTS:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    assert second.stdout == first.stdout
    # the few-pairs warning, the files written and the next steps, as the scan said them
    assert "only 24 pairs" in second.stderr
    assert without_importtime(second.stderr) == without_importtime(first.stderr)


@pytest.fixture
def scanned(tiny_llama_dir, tmp_path):
    """A file scanned once (its report in the cache): the data, the config and the scan."""
    data = write_hh_pairs(tmp_path / "data.jsonl", 24)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none")
    first = scan_report(str(data), config)
    assert not first.cached
    return data, config, first


def test_the_same_scan_again_is_read_back(scanned):
    data, config, first = scanned
    again = scan_report(str(data), config)
    assert again.cached
    assert again.report.to_dict() == first.report.to_dict()  # its time and timings too: the scan that made it


@pytest.mark.parametrize("judges", [None, ("score_safe", "reward_margin", "harm")], ids=["default", "harm"])
def test_a_cached_report_exports_byte_for_byte_as_the_scanned_one(tiny_llama_dir, tmp_path, judges):
    data = write_hh_pairs(tmp_path / "data.jsonl", 24)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none", judges=judges)
    scanned = scan_report(str(data), config)
    cached = scan_report(str(data), config)
    assert cached.cached and not scanned.cached
    for side, result in (("scanned", scanned), ("cached", cached)):
        (tmp_path / side).mkdir()
        for name in OUTPUTS:
            export_report(result.report, tmp_path / side / name)
    for name in OUTPUTS:
        assert (tmp_path / "cached" / name).read_bytes() == (tmp_path / "scanned" / name).read_bytes(), name
    if judges is not None:  # the harm judge's evidence came back too
        assert any(f.judge_evidence for f in cached.report.findings)


def test_the_key_changes_with_the_data_every_option_and_the_model(tiny_llama_dir, tmp_path):
    data = write_hh_pairs(tmp_path / "data.jsonl", 24)
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    config = tiny_scan_config(model, tmp_path / "cache")
    key = report_key(str(data), config)
    assert key is not None and report_key(str(data), config) == key
    changed = [
        replace(config, n_features=8),
        replace(config, flipped_fraction=0.05),
        replace(config, labeller="none"),
        replace(config, activations=replace(config.activations, layer=2)),
        replace(config, sae_train=replace(config.sae_train, seed=1)),
    ]
    keys = {report_key(str(data), other) for other in changed}
    assert len(keys) == len(changed) and key not in keys

    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[3])
    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]  # one label flipped
    data.write_text("".join(lines[:3] + [json.dumps(record) + "\n"] + lines[4:]), encoding="utf-8")
    flipped = report_key(str(data), config)
    assert flipped not in (key, None)

    settings = json.loads((model / "config.json").read_text(encoding="utf-8"))
    settings["rms_norm_eps"] = settings.get("rms_norm_eps", 1e-6) * 10  # another model
    (model / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    assert report_key(str(data), config) not in (flipped, key, None)


def test_a_changed_file_is_scanned_again(scanned):
    data, config, first = scanned
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[1:]), encoding="utf-8")
    again = scan_report(str(data), config)
    assert not again.cached
    assert again.report.run.pairs == first.report.run.pairs - 1
    assert scan_report(str(data), config).cached


@pytest.mark.parametrize("damage", ["score", "truncated", "trailer", "emptied"])
def test_a_damaged_entry_is_scanned_again_and_written_over(scanned, damage):
    data, config, first = scanned
    path = entry_path(config.activations.cache_dir, report_key(str(data), config))
    raw = path.read_bytes()
    if damage == "score":  # a plausible edit: one finding's suspicion
        at = raw.index(b'"suspicion":') + len(b'"suspicion":')
        raw = raw[:at] + (b"1" if raw[at:at + 1] != b"1" else b"0") + raw[at + 1:]
    elif damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "trailer":  # the last line lost: no digest
        raw = raw.rstrip(b"\n").rpartition(b"\n")[0] + b"\n"
    else:
        raw = b""
    path.write_bytes(raw)
    again = scan_report(str(data), config)
    assert not again.cached
    assert comparable(again.report) == comparable(first.report)
    assert path.read_bytes() != raw  # written over, whole
    assert scan_report(str(data), config).cached


def test_an_entry_of_another_key_is_not_used(scanned):
    data, config, first = scanned
    other = replace(config, n_features=8)
    shutil.copyfile(entry_path(config.activations.cache_dir, report_key(str(data), config)),
                    entry_path(config.activations.cache_dir, report_key(str(data), other)))
    again = scan_report(str(data), other)
    assert not again.cached
    assert len(again.report.features) == 8 != len(first.report.features)


def test_a_directory_where_the_entry_goes_is_neither_read_nor_replaced(scanned):
    data, config, _ = scanned
    other = replace(config, n_features=8)
    path = entry_path(config.activations.cache_dir, report_key(str(data), other))
    path.mkdir()
    told = []
    again = scan_report(str(data), other, warn=told.append)
    assert not again.cached and len(again.report.features) == 8
    assert path.is_dir() and any("not kept in the cache" in message and "directory" in message for message in told)


class Coin:
    """A judge from another plugin: its code is not safer-audit's, so its scans are not cached."""

    name = "coin"
    description = "a judge of another plugin"

    def judge(self, context):
        return [1.0] * len(context.pairs)


class CoinPlugin:
    from safer_audit.hookspecs import hookimpl

    @hookimpl
    def register_judges(self, register):
        register("coin", Coin)


def test_what_the_package_does_not_hold_is_scanned_every_time(tiny_llama_dir, tmp_path):
    data = write_hh_pairs(tmp_path / "data.jsonl", 24)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none")
    with registered_plugin(CoinPlugin(), "coin-plugin"):
        assert report_key(str(data), replace(config, judges=("coin",))) is None
        assert report_key(str(data), replace(config, judges=("coin-lenres",))) is None
        assert report_key(str(data), replace(config, judges=("length", "length-lenres"))) is not None
    assert report_key(str(data), replace(config, labeller="llm", labeller_options={"url": "http://localhost:1"})) \
        is None
    assert report_key("-", config) is None
    assert report_key(str(tmp_path), config) is None  # a directory
    assert report_key(data.read_text(encoding="utf-8").splitlines(), config) is None  # a table in memory
    assert report_key(str(data), replace(config, activations=replace(config.activations, model="owner/name"))) is None


def test_no_cache_neither_reads_nor_writes(scanned, tiny_llama_dir):
    data, config, _ = scanned
    assert not scan_report(str(data), config, use_cache=False).cached
    shutil.rmtree(Path(config.activations.cache_dir) / "reports")
    args = ["scan", str(data), "--model", str(tiny_llama_dir), *TINY, "--labeller", "none", "--cache-dir",
            str(config.activations.cache_dir), "--no-cache", "--quiet", "--top", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert not (Path(config.activations.cache_dir) / "reports").exists()


def test_with_dtype_auto_the_key_holds_the_cpus_bfloat16_flags(tiny_llama_dir, tmp_path, monkeypatch):
    """--dtype auto computes the thorough profile's SmolLM2 in bfloat16 on a CPU with native bfloat16: a cache
    copied to a CPU without it must not serve a report computed in bfloat16."""
    import builtins
    import io

    from safer_audit.pipeline import report_cache

    data = write_hh_pairs(tmp_path / "data.jsonl", 8)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache")
    real_open = builtins.open

    def cpu(flags: str):
        def fake(path, *args, **kwargs):
            if path == "/proc/cpuinfo":
                return io.BytesIO(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n".encode())
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake)
        return report_cache.report_key(str(data), config), report_cache.report_key(
            str(data), replace(config, activations=replace(config.activations, dtype="float32")))

    native, native_float32 = cpu("avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile")
    emulated, emulated_float32 = cpu("avx512bw avx512vl avx512dq")
    assert native != emulated  # auto: the CPU decides the dtype
    assert native_float32 == emulated_float32  # float32 asked for: the CPU's flags change nothing
    assert cpu("avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile sse4_2")[0] == native  # other flags ignored


def test_a_cached_scan_with_judges_named_checks_them_without_torch(tiny_llama_dir, tmp_path):
    write_hh_pairs(tmp_path / "data.jsonl", 24)
    args = ["scan", "data.jsonl", "--model", tiny_llama_dir, *TINY, "--cache-dir", "cache", "--judge", "score_safe",
            "--judge", "reward_margin-lenres", "--flipped-rule", "judges", "-o", "report.json"]
    first, _ = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second, imported = run(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert heavy(imported) == []  # the names are checked against the plugins' registry, not by making the judges
    unknown, imported = run(*args, "--judge", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown judge 'nope'" in unknown.stderr and heavy(imported) == []


def test_the_key_holds_the_embedded_sentence_model_whatever_model_is_scanned(tiny_llama_dir, tiny_bert_dir, tmp_path,
                                                                             monkeypatch):
    from safer_audit.backends import hf

    data = write_hh_pairs(tmp_path / "data.jsonl", 24)
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "cache")  # the harm judge and the labeller read MiniLM
    key = report_key(str(data), config)
    other = Path(shutil.copytree(tiny_bert_dir, tmp_path / "encoder"))
    (other / "config.json").write_text((other / "config.json").read_text(encoding="utf-8") + " ", encoding="utf-8")
    monkeypatch.setattr(hf, "embedded_model_path", lambda: other)  # another embedded encoder installed
    assert key is not None and report_key(str(data), config) not in (None, key)
