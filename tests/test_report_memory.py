"""What the report stage holds while it makes the cards does not grow with the pairs.

Each range of pairs' top features (the columns the findings are made from) holds only its own
values, not the whole argsort of the range it was sliced from (8 bytes x features per pair);
and the report stage has glibc give large freed blocks back, so ranges read one after the
other do not pile up in a fragmented heap.
"""

from __future__ import annotations

import json
import platform

from safer_audit.common import memory
from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.pipeline import scan, stages
from safer_audit.report import build
from safer_audit.sae import stats

from .conftest import hh_records


def test_the_top_features_of_each_range_hold_only_their_own_values(tiny_llama_dir, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(24)), encoding="utf-8")
    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache"),
                        sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16, labeller="none")
    monkeypatch.setattr(stats, "STREAM_PAIRS", 8)  # three ranges of pairs
    held = []
    real_maker = build._finding_maker
    monkeypatch.setattr(build, "_finding_maker", lambda table, order, top_columns, *a: held.append(top_columns)
                        or real_maker(table, order, top_columns, *a))
    freed = []
    monkeypatch.setattr(stages, "freed_blocks_to_the_system", lambda: freed.append(True))
    result = scan.run_scan(str(data), config)
    assert freed == [True]  # once, before the scores (and so the report): from the start it slowed extraction
    (ranges,) = held
    assert len(ranges) == 3
    for columns in ranges:
        assert columns[0].shape == (8, config.top_features_per_pair) < (8, len(result.features.features))
        for column in columns:  # the slice of a [8, 16] argsort kept all 128 indices alive
            assert column.untyped_storage().nbytes() == column.numel() * column.element_size()
    assert [f.rank for f in result.report.findings] == list(range(1, 25))


def test_large_freed_blocks_go_back_to_the_system_on_glibc():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert memory.freed_blocks_to_the_system() is on_glibc


def test_the_model_and_sae_stages_keep_the_heap_for_tensors_again(tiny_llama_dir, tmp_path, monkeypatch):
    """The report's policy is process-wide: a thorough profile's second model ran its forward passes and SAE under it,
    mapping and faulting in every tensor afresh (its extraction ~1.4x slower). Each of those stages sets its own."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(12)), encoding="utf-8")
    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache"),
                        sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16, labeller="none")
    policy, seen = ["glibc's"], {}
    monkeypatch.setattr(stages, "freed_blocks_to_the_system", lambda: policy.append("freed"))
    monkeypatch.setattr(stages, "heap_kept_for_tensors", lambda: policy.append("heap"))
    real_extract, real_train = stages.extract_activations, stages.get_sae

    def extract(*args, **kwargs):
        seen["extraction"] = policy[-1]
        return real_extract(*args, **kwargs)

    def train(*args, **kwargs):
        seen["sae"] = policy[-1]
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages, "extract_activations", extract)
    monkeypatch.setattr(stages, "get_sae", train)
    policy.append("freed")  # as a first model's report leaves it
    scan.run_scan(str(data), config)
    assert seen == {"extraction": "heap", "sae": "heap"}
    assert policy[-1] == "freed"  # and the scores and report read codes under theirs


def test_the_heap_is_kept_for_tensors_on_glibc():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert memory.heap_kept_for_tensors() is on_glibc
    assert memory.freed_blocks_to_the_system() is on_glibc  # as a scan leaves the process
