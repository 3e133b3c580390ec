"""The Ray engine: extraction and the SAE pass as Ray Data ``map_batches`` over actor pools.

Extraction. The driver plans the shards (activations.plan_missing: length-sorted batches over
all of the dataset's texts, cut at batch boundaries), so a planned shard is byte-identical
whoever computes it. It streams the planned shards' texts (read by index from the scan's
SpooledTexts, never all held) to a plan file in the shared cache directory, and each planned
shard is one Ray row of ``(shard, offset, length)`` into it. An actor pool (one model per
actor, one GPU per actor when the cluster has GPUs) reads its shard's texts with ``pread``,
computes its batches with the same activations.compute_shard as the local engine and writes
the shard with the same ActivationCache.add_shard into the shared cache.

The SAE pass (encode_on_ray, called by codes.encode_store for a store extracted with
``--engine ray``). The driver plans the chunks the local engine would encode (one per
activation shard, ActivationStore.chunk_plan over the texts whose codes the CodeCache lacks),
writes their rows and keys to a plan file, and puts the SAE's weights in the object store once;
an actor pool builds the SAE from them (on GPU when the pool has GPUs), reads each chunk's
activation shard from the cache, runs codes.encode_chunk and writes the block with
CodeCache.add: the same blocks as the local engine's. The driver then folds every text's block
from the cache (codes._fold_cached, the reduce step: a few numbers per text, the firings above
each latent's running threshold, no activations), so salience and scores are computed as on the
local engine. SAE training and the passes after the fold (salience, heads, report) run on the driver.

Plan files (``ray-plans/`` beside the shards) are removed when their job ends, also on error; a
killed driver's is removed by the next job on its host (it is named like a temporary of
files.write_atomic). Workers open the caches without indexing them: their memory does not grow
with the dataset.

Faults: actors restart (``max_restarts=-1``) and their tasks are retried
(``max_task_retries=-1``), so a killed worker loses its in-flight shard or chunk only, which the
restarted actor computes again to the same result (tests/test_ray_engine.py kills a worker in each
job). Shards and blocks are written atomically; an
interrupted driver leaves every finished one, and a re-run (on either engine) computes only what
is missing.

The cache directory must be readable and writable at the same path on every node: a
local directory (one machine), or a shared POSIX filesystem mounted on each node (NFS,
Lustre, CephFS, EFS, GCS/S3 through a FUSE mount). fsspec URLs (s3://, gs://) are not
supported yet: the cache reads and renames files through the OS.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..common.files import remove_stale_temporaries, temporary_name, write_atomic
from ..common.keyindex import KeyIndex
from ..config import ActivationConfig
from ..errors import CacheError, ConfigError
from ..model.activations import ActivationCache, ActivationStore, chunk_tensors, compute_shard, load_backend
from ..model.texts import PreparedText
from ..sae.codes import CodeCache, encode_chunk, missing_texts

INSTALL_HINT = "--engine ray needs Ray: pip install 'safer-audit[ray]' (or pip install 'ray[data]>=2.60,<3')"

# what the last extraction on Ray did, for tests and benchmarks: {"texts", "shards", "workers": {pid: shards},
# "nodes": {node id: shards}, "worker_peak_rss": MB, "worker_peaks": [its running value after each shard],
# "plan_bytes", "seconds"}
LAST_RUN: dict = {}
# what the last SAE pass on Ray did: {"texts", "chunks", "workers": {pid: chunks}, "nodes": {node id: chunks},
# "worker_peak_rss": MB, "worker_peaks": [its running value after each chunk], "plan_bytes", "seconds"}
LAST_ENCODING: dict = {}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return ray


CONNECT_TIMEOUT = 10.0  # seconds a Ray head has to accept a connection and answer it
# HTTP/2's client preface and an empty SETTINGS frame: any gRPC server (Ray's GCS, its client server)
# answers with a SETTINGS frame of its own
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04
_ADDRESS = re.compile(r"(?:(?P<scheme>ray)://)?"
                      r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})")


def check_address(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """A ConfigError unless ``address`` is one Ray can be asked to join now: None, ``local`` or ``auto``
    (Ray finds it), or ``HOST:PORT`` / ``ray://HOST:PORT`` that accepts a connection and answers as a gRPC
    server within ``timeout`` seconds.

    ``ray.init`` retries an unreachable head for many minutes, printing its own warnings all the
    while; a head that is not there is the user's to fix, said in one line at once.
    """
    if address in (None, "local", "auto"):
        return
    shown = f"--ray-address {address}"
    match = _ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"{shown}: not a Ray address; give auto, HOST:PORT (the head's GCS, port 6379 by "
                          "default) or ray://HOST:PORT (Ray Client, port 10001)")
    if match["scheme"] and importlib.util.find_spec("grpc") is None:
        raise ConfigError(f"{shown}: a ray:// address needs the Ray Client: pip install 'ray[client]'")
    host, port = match["ipv6"] or match["host"], int(match["port"])
    try:
        connection = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:  # refused, unresolvable, unreachable, timed out
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"{shown}: cannot reach {host}:{port} ({reason}); is a Ray head running there?") from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # the handshake is TLS's: the preface below would not be answered
        if _answers_http2(connection):
            return
    raise ConfigError(f"{shown}: {host}:{port} accepts connections but does not answer as a Ray head "
                      "(no gRPC server there)")


def _answers_http2(connection: socket.socket) -> bool:
    """Whether the server answers HTTP/2's preface with a SETTINGS frame (a frame header is 9 bytes;
    its type, the fourth, is 4) before the connection's timeout."""
    reply = b""
    try:
        connection.sendall(_HTTP2_PREFACE)
        while len(reply) < 9:
            chunk = connection.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError:  # timed out, reset
        return False
    return len(reply) == 9 and reply[3] == _SETTINGS


def connect(address: str | None):
    """Join the Ray instance this process already runs, or ``address``; None starts a fresh local one.

    ``address="local"`` is what None means: ``ray.init()`` without an address would try to
    join a cluster named in a stale /tmp/ray file. ``auto`` joins the cluster this node belongs to.
    An address that is malformed, unreachable or not a Ray head is a ConfigError (check_address).
    """
    import logging

    ray = _import_ray()
    if not ray.is_initialized():
        check_address(address)
        try:
            ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        except (ValueError, ConnectionError) as exc:  # Ray's words for a bad address, or no cluster found (auto)
            raise ConfigError(f"--ray-address {address or 'local'}: {exc}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's per-dataset INFO lines would break the bar
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own bar
    context.verbose_stats_logs = False
    return ray


class ShardWorker:
    """One Ray Data actor: loads the model once, then computes and writes whole planned shards."""

    def __init__(self, config: ActivationConfig, layer: int, want_score: bool, cache_key: str, plan: str):
        config = replace(config, engine="local")
        self.plan = plan
        self.config = config
        self.layer = layer
        self.want_score = want_score
        self.backend = load_backend(config)
        self.cache = ActivationCache(config.cache_dir, cache_key, dtype=config.cache_dtype, index=False)

    def compute(self, shard: int, batches: list) -> int:
        items = [[(key, PreparedText(text, start, bool(special))) for key, text, start, special in batch]
                 for batch in batches]
        keys, acts = compute_shard(items, self.backend, self.config, self.layer, self.want_score)
        if acts:
            self.cache.add_shard(keys, acts)
        return len(keys)

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        done = [self.compute(int(shard), read_plan(self.plan, int(offset), int(length)))
                for shard, offset, length in zip(rows["shard"], rows["offset"], rows["length"], strict=True)]
        return {"shard": np.asarray(rows["shard"]), "texts": np.asarray(done, dtype=np.int64),
                **_worker_columns(len(done))}


def default_workers(ray) -> tuple[int, float]:
    """Actors and GPUs per actor: one actor per GPU when the cluster has GPUs, else one per 2 CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, 1.0
    return max(1, int(resources.get("CPU", 1)) // 2), 0.0


PLAN_DIR = "ray-plans"  # beside a cache's shards: the job's plan files, one per running job


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_columns(n: int) -> dict:
    """What every worker reports with each of its ``n`` result rows: its peak RSS, pid and node."""
    import numpy as np
    import ray

    node = ray.get_runtime_context().get_node_id()
    return {"peak_rss_mb": np.full(n, peak_rss_mb()), "pid": np.full(n, os.getpid(), dtype=np.int64),
            "node": np.asarray([node] * n)}


def _map_plan(config: ActivationConfig, worker_class, name: str, spans: list[tuple[int, int]], kwargs,
              run: dict) -> Iterator[dict]:
    """Run the plan file's parts ``spans`` through an actor pool of ``worker_class`` (a Ray row
    ``{name, offset, length}`` each, ``kwargs(gpus)`` its constructor's arguments); yields each result row
    after counting it in ``run`` (``run[name + "s"]``, the workers, the nodes and the workers' peak RSS)."""
    ray = connect(config.ray_address)
    workers, gpus = default_workers(ray)
    workers = config.ray_workers or workers
    rows = [{name: n, "offset": offset, "length": length} for n, (offset, length) in enumerate(spans)]
    run["plan_bytes"] = sum(length for _, length in spans)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    results = dataset.map_batches(
        worker_class, batch_size=1, batch_format="numpy",
        # Ray Data's actor pools restart a killed actor and retry its tasks (max_restarts=-1,
        # max_task_retries=-1 by default): a killed worker loses its in-flight row only
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
        num_cpus=1, num_gpus=gpus or None, fn_constructor_kwargs=kwargs(gpus))
    for row in results.iter_rows():
        run[name + "s"] += 1
        run["workers"][int(row["pid"])] = run["workers"].get(int(row["pid"]), 0) + 1
        run["nodes"][str(row["node"])] = run["nodes"].get(str(row["node"]), 0) + 1
        run["worker_peak_rss"] = max(run.get("worker_peak_rss", 0.0), float(row["peak_rss_mb"]))
        run["worker_peaks"].append(run["worker_peak_rss"])
        yield row


@contextmanager
def plan_file(directory: Path, parts: Iterable[bytes]) -> Iterator[tuple[Path, list[tuple[int, int]]]]:
    """Write ``parts`` one after another to a new plan file under ``directory`` (the shared cache: every
    node reads it), atomically; yields its path and each part's ``(offset, length)``. The parts are
    consumed as they are written, so the driver never holds them all; the file is removed when the block
    ends, also on error. A killed driver's plan file is removed by the next job on its host
    (files.remove_stale_temporaries: the name says whose it is)."""
    plans = Path(directory) / PLAN_DIR
    plans.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(plans)
    path = plans / temporary_name("plan")
    spans: list[tuple[int, int]] = []

    def write(tmp: Path) -> None:
        offset = 0
        with open(tmp, "wb") as out:
            for part in parts:
                out.write(part)
                spans.append((offset, len(part)))
                offset += len(part)

    try:
        write_atomic(path, write)
        yield path, spans
    finally:
        path.unlink(missing_ok=True)


def read_plan(path: str, offset: int, length: int):
    """One part of a plan file (plan_file), decoded from JSON."""
    import json

    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise CacheError(f"plan file {path} is shorter than planned: the cache directory must be one shared path "
                         "on every node")
    return json.loads(data)


def _key_of(texts, index: int) -> str:
    keys = getattr(texts, "keys", None)  # activations._KeyedTexts: the key without reading the text
    return keys[index] if isinstance(keys, list) else texts[index][0]


def compute_shards_on_ray(texts: list[tuple[str, PreparedText]], shards: list[list[list[int]]],
                          config: ActivationConfig, layer: int, want_score: bool, cache: ActivationCache,
                          progress=None, worker_class=None) -> int:
    """Compute the planned ``shards`` of ``texts`` on Ray and write them into ``cache``; returns the texts run.

    The shards' texts go to a plan file in the cache directory, one shard at a time (read from ``texts`` by
    index: a SpooledTexts is never held whole); the Ray rows are ``(shard, offset, length)`` into it.
    """
    import json

    total = sum(len(batch) for shard in shards for batch in shard)
    key = cache.directory.name

    def parts() -> Iterator[bytes]:
        for shard in shards:
            batches = []
            for batch in shard:
                rows = []
                for i in batch:
                    text_key, prepared = texts[i]
                    rows.append([text_key, prepared.text, prepared.response_start, prepared.has_special_tokens])
                batches.append(rows)
            yield json.dumps(batches).encode()

    run = {"texts": 0, "shards": 0, "workers": {}, "nodes": {}, "worker_peaks": []}
    started = time.perf_counter()
    with plan_file(cache.directory, parts()) as (plan, spans):
        kwargs = {"config": config, "layer": layer, "want_score": want_score, "cache_key": key, "plan": str(plan)}
        for row in _map_plan(config, worker_class or ShardWorker, "shard", spans, lambda gpus: kwargs, run):
            run["texts"] += int(row["texts"])
            if progress is not None:
                progress(run["texts"], total)
    run["seconds"] = time.perf_counter() - started
    LAST_RUN.clear()
    LAST_RUN.update(run)
    written = ActivationCache(cache.directory.parent.parent, key, dtype=config.cache_dtype)
    absent = len(written.index.missing([_key_of(texts, i) for shard in shards for batch in shard for i in batch]))
    if absent:
        raise CacheError(f"Ray workers computed {absent} text(s) whose shards this process cannot see in "
                         f"{cache.directory}: the cache directory must be one shared path on every node")
    return total


class CodeWorker:
    """One Ray Data actor of the SAE pass: builds the SAE once from the weights in the object store, then
    encodes whole planned chunks (codes.encode_chunk) and writes each block with CodeCache.add."""

    def __init__(self, sae_ref: list, activations: str, codes: str, cache_dtype: str, plan: str, gpus: float):
        import ray
        import torch

        sae_class, cfg, state = ray.get(sae_ref[0])  # in a list: Ray hands the reference over unresolved
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        self.sae = sae_class(cfg)
        self.sae.load_state_dict(state)
        self.sae.to(self.device).eval()
        del state
        directory = Path(activations)
        # no index of either cache: a worker reads the shards it is told and adds blocks, whatever the data's size
        self.activations = ActivationCache(directory.parent.parent, directory.name, dtype=cache_dtype, index=False)
        self.codes = CodeCache(Path(codes), index=False)
        self.plan = plan

    def encode(self, chunk: dict) -> tuple[int, str]:
        """Encode one planned chunk; (texts encoded, the block's file name), or (0, "") when its activation
        shard is unreadable (then deleted: the driver computes it again)."""
        tensors = self.activations.load_shard(self.activations.directory / chunk["shard"])
        if tensors is None:
            return 0, ""
        offsets, chunk_tensors_ = chunk_tensors(tensors, chunk["rows"])
        block = encode_chunk(self.sae, offsets, chunk_tensors_, self.device)
        path = self.codes.add(chunk["keys"], block)
        self.activations._loaded = {}
        self.codes.index = KeyIndex()  # nothing is read back here
        return len(chunk["keys"]), path.name

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        done = [self.encode(read_plan(self.plan, int(offset), int(length)))
                for offset, length in zip(rows["offset"], rows["length"], strict=True)]
        return {"chunk": np.asarray(rows["chunk"]), "texts": np.asarray([n for n, _ in done], dtype=np.int64),
                "file": np.asarray([name for _, name in done]), **_worker_columns(len(done))}


def encode_on_ray(store, sae, cache: CodeCache, config: ActivationConfig, progress=None) -> int:
    """Encode the texts of ``store`` whose blocks ``cache`` lacks on a Ray actor pool; returns the texts encoded.

    The chunks are the local engine's (ActivationStore.iter_chunks over the missing texts, as
    codes._fold_cached encodes them), so the blocks written are the ones it would write. The driver writes
    the chunks' rows and keys to a plan file in the shared cache (Ray gets ``(chunk, offset, length)``),
    puts the SAE's weights in the object store once, and indexes the blocks the workers wrote; the
    caller then folds every text from the cache (codes._fold_cached), the reduce step on the driver.
    A chunk whose activation shard a worker finds corrupt is left out: the fold computes it again.
    """
    import json

    missing = missing_texts(store, cache)
    if not missing:
        return 0
    ray = connect(config.ray_address)
    sub = ActivationStore(store.cache, missing, store.d_model, store.backend_identity)
    plan = sub.chunk_plan()
    del sub

    def parts() -> Iterator[bytes]:
        for shard, texts, rows in plan:
            yield json.dumps({"shard": shard.name, "rows": rows, "keys": [missing[t] for t in texts]}).encode()

    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in sae.state_dict().items()}
    sae_ref = ray.put((type(sae), sae.cfg, state))
    del state
    run = {"texts": 0, "chunks": 0, "workers": {}, "nodes": {}, "worker_peaks": []}
    started = time.perf_counter()
    total, n_texts = len(missing), store.n_texts
    unseen: list[str] = []
    try:
        with plan_file(cache.directory, parts()) as (path, spans):
            kwargs = {"sae_ref": [sae_ref], "activations": str(store.cache.directory), "codes": str(cache.directory),
                      "cache_dtype": config.cache_dtype, "plan": str(path)}
            for row in _map_plan(config, CodeWorker, "chunk", spans, lambda gpus: {**kwargs, "gpus": gpus}, run):
                run["texts"] += int(row["texts"])
                if str(row["file"]) and not cache.index_shard(cache.directory / str(row["file"])):
                    unseen.append(str(row["file"]))
                if progress is not None:
                    progress(min(run["texts"], total), n_texts)
    finally:
        del sae_ref  # the object store lets the weights go
    run["seconds"] = time.perf_counter() - started
    LAST_ENCODING.clear()
    LAST_ENCODING.update(run)
    if unseen:
        raise CacheError(f"Ray workers wrote {len(unseen)} SAE code shard(s) this process cannot read in "
                         f"{cache.directory}: the cache directory must be one shared path on every node")
    return run["texts"]


class RayExecutor:
    """The Ray engine as a hookspecs.Executor: extraction and the SAE pass on an actor pool."""

    name = "ray"

    def __init__(self, config: ActivationConfig):
        check_address(config.ray_address)  # at the top of a run, not after the data is read and planned
        self.config = config

    def compute_shards(self, items, shards, config, layer, want_score, cache, progress) -> int:
        return compute_shards_on_ray(items, shards, config, layer, want_score, cache, progress)

    def encode_missing(self, store, sae, cache, progress) -> int:
        return encode_on_ray(store, sae, cache, self.config, progress)


__all__ = ["CONNECT_TIMEOUT", "INSTALL_HINT", "RayExecutor", "LAST_ENCODING", "LAST_RUN", "CodeWorker", "ShardWorker",
           "check_address", "compute_shards_on_ray", "connect", "encode_on_ray"]
