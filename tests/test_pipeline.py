"""The runner: every stage of a scan is timed in the order data flows, and the engine's executor,
chosen once in the run's context, is handed to extraction and to the SAE pass."""

from __future__ import annotations

import json

from safer_audit.model.activations import compute_shard, load_backend
from safer_audit.pipeline import stages
from safer_audit.pipeline.context import RunContext
from safer_audit.pipeline.scan import run_scan, scan_pairs

from .conftest import hh_records, tiny_scan_config

STAGES = ["load", "model", "activations", "quality", "sae", "codes", "salience", "scores", "report", "evidence"]


def write_pairs(path, n: int):
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path


def test_a_scan_times_every_stage_in_the_order_data_flows(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    result = run_scan(str(data), tiny_scan_config(tiny_llama_dir, tmp_path / "cache", labeller="none"))
    assert list(result.timings) == STAGES
    assert list(result.report.run.timings) == STAGES


class RecordingExecutor:
    """An engine that runs the planned shards in this process, as another machine would, and records
    what the pipeline asked of it."""

    name = "recording"

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def compute_shards(self, items, shards, config, layer, want_score, cache, progress) -> int:
        self.calls.append("compute_shards")
        for shard in shards:
            keys, computed = compute_shard([[items[i] for i in batch] for batch in shard], self.backend, config,
                                           layer, want_score, None)
            cache.add_shard(keys, computed)
        return sum(len(batch) for shard in shards for batch in shard)

    def encode_missing(self, store, sae, cache, progress) -> int:
        self.calls.append("encode_missing")
        return 0  # nothing encoded here: the driver's fold encodes what the cache lacks


def test_the_contexts_executor_runs_extraction_and_is_asked_for_the_sae_pass(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    local = run_scan(str(data), tiny_scan_config(tiny_llama_dir, tmp_path / "local", labeller="none"))
    config = tiny_scan_config(tiny_llama_dir, tmp_path / "elsewhere", labeller="none")
    backend = load_backend(config.activations)
    ctx = RunContext.of(config)
    ctx.executor = executor = RecordingExecutor(backend)
    result = scan_pairs(stages.load(str(data), ctx), config, source=str(data), backend=backend, ctx=ctx)
    assert executor.calls == ["compute_shards", "encode_missing"]
    assert result.store.executor is executor and result.store.n_forward_texts == 24
    assert [(f.pair_id, f.category) for f in result.report.findings] == \
        [(f.pair_id, f.category) for f in local.report.findings]
    assert [f.suspicion for f in result.report.findings] == [f.suspicion for f in local.report.findings]
