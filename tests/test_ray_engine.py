"""The Ray engine: same cache, same report as the local engine; two nodes; a killed worker.

One simulated two-node Ray cluster (ray.cluster_utils.Cluster, 4 logical CPUs per node:
with fewer, Ray Data's resource budget can starve an actor pool) serves the whole module.
Shards are made small (8 texts) so a 40-pair scan has several to spread and to lose.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
from safetensors.torch import load as load_safetensors

from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.errors import ConfigError
from safer_audit.model import activations
from safer_audit.model.activations import extract_activations, load_backend
from safer_audit.model.texts import pair_texts
from safer_audit.pipeline.scan import run_scan

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # workers import safer_audit from this checkout, as the driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(activations.__file__).rsplit("/safer_audit/", 1)[0],
                                                             os.environ.get("PYTHONPATH")]))
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    made.add_node(num_cpus=4)
    ray.init(address=made.address, include_dashboard=False, log_to_driver=False)
    try:
        yield made
    finally:
        ray.shutdown()
        made.shutdown()


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(activations, "SHARD_TEXTS", 8)


def config(model_dir, cache_dir, engine="local", **more) -> ScanConfig:
    return ScanConfig(activations=ActivationConfig(model=str(model_dir), layer=1, max_length=64, batch_size=4,
                                                   cache_dir=cache_dir, engine=engine, **more),
                      sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16)


def ranking(report) -> list[tuple]:
    return [(f.pair_id, f.rank, f.category) for f in report.findings]


def scores(report) -> list[float]:
    return [x for f in report.findings for x in (f.score_safe, f.reward_margin, f.suspicion)]


def shard_keys(cache_dir) -> list[list[str]]:
    return sorted(activations._shard_keys(p) for p in cache_dir.glob("activations/*/shard-*.safetensors"))


def code_shards(cache_dir) -> list:
    return sorted(cache_dir.glob("activations/*/codes/*/shard-*.safetensors"))


def block_contents(data: bytes) -> tuple[dict, dict]:
    """A codes shard's metadata and each tensor's dtype, shape and bytes."""
    import json
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    tensors = load_safetensors(data)
    return (json.loads(data[8:8 + size])["__metadata__"],
            {name: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(activations.torch.uint8).numpy().tobytes())
             for name, t in tensors.items()})


def stall_until_killed(signals) -> None:
    """In a worker: the first time only, say which process this is and wait for the test to kill it."""
    if not (signals / "killed").exists():
        (signals / "pid").write_text(str(os.getpid()))
        for _ in range(600):  # the test kills us within a second or two
            time.sleep(0.1)


@contextmanager
def killing_once(signals):
    """While the block runs: SIGKILL, once, the worker that wrote its pid to ``signals``."""

    def killer():
        for _ in range(1200):
            if (signals / "pid").exists():
                (signals / "killed").write_text("")
                os.kill(int((signals / "pid").read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        yield
    finally:
        thread.join()


@pytest.fixture(scope="module")
def local_scan(tiny_llama_dir, data_file, tmp_path_factory):
    """The uninterrupted local-engine scan every Ray run must reproduce."""
    cache = tmp_path_factory.mktemp("local-cache")
    activations.SHARD_TEXTS, saved = 8, activations.SHARD_TEXTS
    try:
        return run_scan(str(data_file), config(tiny_llama_dir, cache)).report, cache
    finally:
        activations.SHARD_TEXTS = saved


def test_ray_engine_gives_the_local_report_and_the_same_shards(cluster, local_scan, tiny_llama_dir, data_file,
                                                               tmp_path):
    from safer_audit.engine.ray import LAST_ENCODING, LAST_RUN

    local, local_cache = local_scan
    on_ray = run_scan(str(data_file), config(tiny_llama_dir, tmp_path, engine="ray", ray_workers=2))
    assert on_ray.store.n_forward_texts == 80
    assert ranking(on_ray.report) == ranking(local)
    assert scores(on_ray.report) == pytest.approx(scores(local), abs=1e-5)
    # the same planned shards (the bytes may differ in the last bits: torch's CPU kernels sum in
    # an order that depends on the thread count, and an actor has one CPU)
    assert shard_keys(tmp_path) == shard_keys(local_cache)
    assert len(LAST_RUN["nodes"]) == 2  # both simulated nodes ran actors (Ray Data spreads the pool)
    # the SAE pass ran on the workers too: every text's codes were written by a worker process
    assert on_ray.stats.n_encoded == LAST_ENCODING["texts"] == 80
    assert LAST_ENCODING["workers"] and os.getpid() not in LAST_ENCODING["workers"]
    assert len(code_shards(tmp_path)) == LAST_ENCODING["chunks"] == sum(LAST_ENCODING["workers"].values())


def test_resume_across_engines_with_a_killed_worker(cluster, local_scan, tiny_llama_dir, data_file, tmp_path,
                                                    monkeypatch):
    """The local engine computes a prefix (as if interrupted); Ray does the rest, and one of its
    workers is killed mid-shard; the report equals the uninterrupted one, and the local engine
    then finds everything in the cache."""
    import safer_audit.engine.ray as engine
    from safer_audit.data import load_pairs

    local, _ = local_scan
    cache = tmp_path / "cache"
    backend = load_backend(config(tiny_llama_dir, cache).activations)
    pairs = load_pairs(str(data_file)).pairs
    extract_activations(pair_texts(pairs.head(9), backend), backend, config(tiny_llama_dir, cache).activations)
    assert shard_keys(cache)

    signals = tmp_path / "signals"
    signals.mkdir()

    class StallingWorker(engine.ShardWorker):
        """Holds its second shard until the test has killed this process once, then computes it."""

        def compute(self, shard, batches):
            if shard == 1:
                stall_until_killed(signals)
            return super().compute(shard, batches)

    monkeypatch.setattr(engine, "ShardWorker", StallingWorker)
    with killing_once(signals):
        resumed = run_scan(str(data_file), config(tiny_llama_dir, cache, engine="ray", ray_workers=2))
    assert (signals / "killed").exists()  # a worker died mid-job
    assert 0 < resumed.store.n_forward_texts < 80
    assert ranking(resumed.report) == ranking(local)
    assert scores(resumed.report) == pytest.approx(scores(local), abs=1e-5)
    assert run_scan(str(data_file), config(tiny_llama_dir, cache)).store.n_forward_texts == 0


def test_half_precision_cache_has_its_own_key_and_close_activations(local_scan, tiny_llama_dir, data_file,
                                                                     tmp_path):
    _, local_cache = local_scan
    backend = load_backend(config(tiny_llama_dir, tmp_path).activations)
    from safer_audit.data import load_pairs

    texts = pair_texts(load_pairs(str(data_file)).pairs, backend)
    full = extract_activations(texts, backend, config(tiny_llama_dir, local_cache).activations)
    half = extract_activations(texts, backend, config(tiny_llama_dir, local_cache, cache_dtype="bfloat16").activations)
    assert full.n_forward_texts == 0 and half.n_forward_texts == 80  # a float32 cache does not serve bfloat16
    stored = next(half.cache.directory.glob("shard-*"))
    assert load_safetensors(stored.read_bytes())["acts"].dtype == activations.torch.bfloat16
    for i in (0, 41, 79):
        assert half.text(i).acts.dtype == activations.torch.float32  # widened on reading
        activations.torch.testing.assert_close(half.text(i).acts, full.text(i).acts, rtol=1e-2, atol=1e-2)
    assert run_scan(str(data_file), config(tiny_llama_dir, local_cache, cache_dtype="bfloat16")).report.findings


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    import sys

    from safer_audit.engine import ray as engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'safer-audit\[ray\]'"):
        engine.connect(None)


def test_a_running_head_passes_the_address_check(cluster):
    from safer_audit.engine import ray as engine

    engine.check_address(cluster.address)  # its GCS answers the check's HTTP/2 preface


def test_bad_engine_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="engine"):
        ActivationConfig(engine="spark")
    with pytest.raises(ConfigError, match="cache dtype"):
        ActivationConfig(cache_dtype="int8")
    with pytest.raises(ConfigError, match="fsspec"):
        ActivationConfig(cache_dir="s3://bucket/cache")


def test_ray_rows_are_offsets_into_a_plan_file_that_is_removed_after_the_job(cluster, tiny_llama_dir, data_file,
                                                                           tmp_path, monkeypatch):
    """The driver streams the shards' texts to a plan file in the shared cache and hands Ray only
    (shard, offset, length); the file is gone when the job ends, also when it fails."""
    import safer_audit.engine.ray as engine
    from safer_audit.data import load_pairs

    made, during = [], []
    original = ray.data.from_items

    def spy(items, **kwargs):
        made.append(list(items))
        during.extend(p for p in tmp_path.glob("activations/*/ray-plans/*") if p.is_file())
        return original(items, **kwargs)

    monkeypatch.setattr(ray.data, "from_items", spy)
    settings = config(tiny_llama_dir, tmp_path, engine="ray", ray_workers=2).activations
    backend = load_backend(settings)
    texts = pair_texts(load_pairs(str(data_file)).pairs.head(10), backend)
    store = extract_activations(texts, backend, settings)
    assert store.n_forward_texts == 20
    assert len(made) == 1 and len(made[0]) == 3  # 20 texts in shards of 8
    assert all(set(row) == {"shard", "offset", "length"} for row in made[0])
    assert len(during) == 1  # the plan file existed while Ray ran
    assert sum(row["length"] for row in made[0]) == engine.LAST_RUN["plan_bytes"]
    assert not during[0].exists()

    class FailingWorker(engine.ShardWorker):
        def compute(self, shard, batches):
            raise RuntimeError("worker failed")

    monkeypatch.setattr(engine, "ShardWorker", FailingWorker)
    with pytest.raises(Exception, match="worker failed"):
        extract_activations(pair_texts(load_pairs(str(data_file)).pairs.tail(4), backend), backend,
                            replace(settings, ray_workers=1))
    assert len(during) == 2 and not during[1].exists()
    assert not [p for p in tmp_path.glob("activations/*/ray-plans/*")]


def test_a_ray_scan_encodes_only_the_missing_codes_into_the_local_engines_blocks(cluster, local_scan, tiny_llama_dir,
                                                                                data_file, tmp_path):
    """Half of a local scan's SAE code shards are lost: a Ray scan of the same data encodes only their
    texts, on the workers, into the very blocks the local engine wrote, and gives the same report."""
    import json
    import shutil

    from safer_audit.engine.ray import LAST_ENCODING
    from safer_audit.sae import codes

    local, local_cache = local_scan
    cache = tmp_path / "cache"
    shutil.copytree(local_cache, cache)
    for summary in cache.glob("activations/*/codes/*/summary-*"):
        summary.unlink()  # else a scan of the same texts reads the summary and no shard
    # the float32 cache's codes (the module's other tests may add a bfloat16 cache to local_scan's directory)
    [codes_dir] = [d for d in cache.glob("activations/*/codes/*")
                   if "dtype" not in json.loads((d.parent.parent / "config.json").read_text())]
    lost = sorted(codes_dir.glob("shard-*.safetensors"))[::2]
    lost_bytes = {path.name: path.read_bytes() for path in lost}
    n_lost = sum(len(codes._header_keys(path)) for path in lost)
    for path in lost:
        path.unlink()
    on_ray = run_scan(str(data_file), config(tiny_llama_dir, cache, engine="ray", ray_workers=2))
    assert on_ray.store.n_forward_texts == 0
    assert 0 < n_lost < 80 and on_ray.stats.n_encoded == LAST_ENCODING["texts"] == n_lost
    assert LAST_ENCODING["workers"] and os.getpid() not in LAST_ENCODING["workers"]
    # the same blocks bit for bit (safetensors writes the header's metadata in a per-process order: compared parsed)
    assert {path.name: block_contents(path.read_bytes()) for path in codes_dir.glob("shard-*.safetensors")
            if path.name in lost_bytes} == {name: block_contents(data) for name, data in lost_bytes.items()}
    assert ranking(on_ray.report) == ranking(local)
    assert scores(on_ray.report) == scores(local)
    assert not list(cache.glob("activations/*/ray-plans/*"))


def test_a_worker_killed_during_the_sae_pass_loses_only_its_chunk(cluster, local_scan, tiny_llama_dir, data_file,
                                                                   tmp_path, monkeypatch):
    """Every code block of a local scan is lost: the Ray SAE pass encodes them all, one of its workers is
    killed while it holds a chunk, Ray restarts it and retries that chunk, and the report is the local one."""
    import json
    import shutil

    import safer_audit.engine.ray as engine
    from safer_audit.engine.ray import LAST_ENCODING

    local, local_cache = local_scan
    cache = tmp_path / "cache"
    shutil.copytree(local_cache, cache)
    [codes_dir] = [d for d in cache.glob("activations/*/codes/*")
                   if "dtype" not in json.loads((d.parent.parent / "config.json").read_text())]
    shutil.rmtree(codes_dir)  # blocks and summary: the whole SAE pass runs on the workers
    signals = tmp_path / "signals"
    signals.mkdir()

    class StallingCodeWorker(engine.CodeWorker):
        """Holds chunk 1 until the test has killed this process once, then encodes it."""

        def __call__(self, rows):
            if 1 in [int(chunk) for chunk in rows["chunk"]]:
                stall_until_killed(signals)
            return super().__call__(rows)

    monkeypatch.setattr(engine, "CodeWorker", StallingCodeWorker)
    with killing_once(signals):
        on_ray = run_scan(str(data_file), config(tiny_llama_dir, cache, engine="ray", ray_workers=2))
    assert (signals / "killed").exists()  # a worker died mid-pass
    assert on_ray.store.n_forward_texts == 0 and on_ray.stats.n_encoded == LAST_ENCODING["texts"] == 80
    assert LAST_ENCODING["chunks"] > 2
    assert ranking(on_ray.report) == ranking(local)
    assert scores(on_ray.report) == scores(local)
    assert not list(cache.glob("activations/*/ray-plans/*"))
