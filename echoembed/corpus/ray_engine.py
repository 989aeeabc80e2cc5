"""The Ray Data engine: the same shards, one ``map_batches`` call per shard on an actor pool.

The dataset is the list of unfinished shards (``from_items``, one block each); ``ShardActor``
loads the ``Embedder`` once per actor, and each call reads its shard from the shared
filesystem, embeds it and writes it atomically (``echoembed.corpus.shard``): Ray's own
``write_parquet`` is neither atomic nor shard-aligned, and a ``read_*`` datasource merges small
files into blocks that do not match shards. What comes back to the driver is one small status
row per shard. Fault handling is Ray's, bounded: a dead actor is restarted up to
``MAX_RESTARTS`` times and its shard retried up to ``MAX_TASK_RETRIES`` times (Ray Data's
default for both is unlimited); Python exceptions are not retried; a bad row or another user
error in an actor comes back as a status and is raised here with its own type.

Without an address (and no ``RAY_ADDRESS``) a local cluster is started on 127.0.0.1 only and
shut down when the job ends; its CPU count leaves one CPU slot free beyond the actors', so Ray
Data's own tasks always get a CPU (an actor pool that takes every CPU deadlocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from echoembed.corpus.config import CorpusConfig
from echoembed.corpus.errors import BadRowError, CorpusJobError
from echoembed.corpus.inputs import ShardSpec
from echoembed.corpus.job import JobManifest
from echoembed.corpus.shard import ShardResult, ShardRunner
from echoembed.errors import (
    ArtifactError,
    BackendError,
    InputError,
    MissingDependencyError,
    TemplateError,
    UserError,
    require,
)

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # per actor
MAX_TASK_RETRIES = 3  # per shard, after its actor died
ACTOR_OVERHEAD_BYTES = 768 << 20  # beyond its model copy an actor held 617 MiB (INT8 SmolLM2)
OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store: only status rows pass it
GPU_PROVIDERS = frozenset(
    {"CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"}
)
# Tests only: a marker file path. The first actor call that creates it exits the process
# (os._exit) after writing its shard, before answering, as a crashed worker would; the
# driver reads it once and hands it to the actors. Never set it outside the fault tests.
TEST_KILL_ONCE_ENV = "_ECHOEMBED_TEST_KILL_ONCE"
_ERROR_TYPES = {
    cls.__name__: cls
    for cls in (
        BadRowError,
        CorpusJobError,
        InputError,
        ArtifactError,
        BackendError,
        TemplateError,
        MissingDependencyError,
    )  # fmt: skip
}


def import_ray():
    """``ray`` with Ray Data, or a MissingDependencyError with the install command."""
    ray = require("ray", "ray", "ray[data]")
    require("ray.data", "ray", "ray[data]")
    return ray


@contextlib.contextmanager
def _single_machine_mode():
    """Ray's own single-machine mode for the duration of a ``ray.init``.

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` (and a driver's address on a loopback
    cluster) into the machine's interface address, and its servers then listen on every
    interface, unless its single-machine mode is on (what it uses on macOS and Windows:
    ``ray_constants.ENABLE_RAY_CLUSTER = False``). The node's address is checked afterwards.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _check_loopback(ray) -> None:
    ip = ray.util.get_node_ip_address()
    if not ip.startswith("127."):
        ray.shutdown()
        raise BackendError(
            f"this Ray ({ray.__version__}) put its local node on {ip}, not the loopback "
            "address; echoembed is tested with ray[data]==2.60.0 (pip install 'echoembed[ray]')"
        )


def init_local_ray(num_cpus: int, num_gpus: int | None = None):
    """Start a local Ray cluster that listens on 127.0.0.1 only (usage stats off); returns
    ``ray``. The caller shuts it down (``ray.shutdown()``)."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with _single_machine_mode():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=OBJECT_STORE_BYTES,
                 log_to_driver=False, configure_logging=False,
                 namespace="echoembed-corpus")  # fmt: skip
    _check_loopback(ray)
    return ray


def connect_ray(address: str):
    """Join an existing cluster as a driver; a loopback address stays on the loopback."""
    ray = import_ray()
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        with _single_machine_mode():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        _check_loopback(ray)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def actor_cpus(config: CorpusConfig, local_cluster: bool) -> float:
    if config.cpus_per_actor is not None:
        return float(config.cpus_per_actor)
    if local_cluster:
        return float(max(1, (os.cpu_count() or 1) // config.concurrency))
    return 1.0


def actor_gpus(config: CorpusConfig, job: JobManifest) -> float:
    """GPUs per actor: as configured, else 1 for a GPU provider or a TensorRT engine artifact."""
    if config.gpus_per_actor is not None:
        return float(config.gpus_per_actor)
    gpu = job.artifact.get("engine") or bool(GPU_PROVIDERS & set(config.providers or ()))
    return 1.0 if gpu else 0.0


class ShardActor:
    """Ray Data callable class: one ``Embedder`` per actor, one shard per call.

    A user error (a bad row, a changed or unloadable artifact) is not raised here, where Ray
    would wrap it in its own errors: it goes back in the shard's status row and the driver
    raises it with its own type and message.
    """

    def __init__(self, job: JobManifest, out_dir: str, policy: str,
                 providers: Sequence[str] | None, threads: int,
                 kill_once: str | None = None):  # fmt: skip
        from echoembed.corpus.local import load_embedder

        t0 = time.perf_counter()
        self.runner, self.init_error = None, None
        try:
            self.runner = ShardRunner(load_embedder(job, providers, threads), job, out_dir,
                                      policy)  # fmt: skip
        except UserError as e:
            self.init_error = e
        self.load_s = time.perf_counter() - t0
        self.shards = {s.index: s for s in job.shards}
        self.kill_once = kill_once

    def _run(self, spec: ShardSpec) -> tuple[ShardResult, UserError | None]:
        try:
            if self.init_error is not None:
                raise self.init_error
            return self.runner.run(spec), None
        except UserError as e:
            return ShardResult(spec.index, spec.rows, 0, 0, 0.0), e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for index in batch["shard"]:
            r, error = self._run(self.shards[int(index)])
            if self.kill_once and _first_to_claim(self.kill_once):
                os._exit(17)
            rows.append({**dataclasses.asdict(r), "load_s": self.load_s,
                         "error": "" if error is None else str(error),
                         "error_type": "" if error is None else type(error).__name__,
                         "pid": os.getpid()})  # fmt: skip
            self.load_s = 0.0  # reported once per actor
        return {k: np.asarray([row[k] for row in rows]) for k in rows[0]}


def _first_to_claim(marker: str) -> bool:
    """Create ``marker`` (holding this pid) unless it exists; True for the one that made it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _raise_reported(row: dict[str, Any]) -> None:
    cls = _ERROR_TYPES.get(str(row["error_type"]), UserError)
    raise cls(str(row["error"]))


def _connect(config: CorpusConfig, job: JobManifest) -> tuple[Any, bool, dict[str, Any]]:
    """(ray, started_here, info): reuse this process's Ray, join ``address`` / ``RAY_ADDRESS``,
    or start a local loopback cluster."""
    ray = import_ray()
    t0 = time.perf_counter()
    if ray.is_initialized():
        if config.address:
            log.warning("Ray is already initialized in this process; --address %s is ignored",
                        config.address)  # fmt: skip
        return ray, False, {"address": "existing connection", "ray_init_s": 0.0}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        connect_ray(address)
        where, started = address, False
    else:
        cpus = actor_cpus(config, local_cluster=True)
        init_local_ray(math.ceil(config.concurrency * cpus) + 1)
        where, started = "local (127.0.0.1)", True
    return ray, started, {"address": where, "ray_init_s": round(time.perf_counter() - t0, 3)}


def _context_overrides(ray, config: CorpusConfig) -> dict[str, Any]:
    ctx = ray.data.DataContext.get_current()
    wanted = {
        "enable_progress_bars": False,
        "print_on_execution_start": False,
        "execution_no_progress_timeout_s": config.stall_timeout_s,
        "wait_for_min_actors_s": config.stall_timeout_s,
    }
    saved = {k: getattr(ctx, k) for k in wanted}
    for k, v in wanted.items():
        setattr(ctx, k, v)
    return saved


def run_ray(job: JobManifest, todo: Sequence[ShardSpec], config: CorpusConfig,
            on_result: Callable[[ShardResult], None]) -> dict[str, Any]:  # fmt: skip
    """Run ``todo`` shards on a Ray Data actor pool; returns the engine's own timings."""
    ray, started, info = _connect(config, job)
    try:
        with warnings.catch_warnings():  # Ray Data's own deprecations, raised as it copies
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
            saved = _context_overrides(ray, config)  # its context (not actionable by users)
            try:
                info.update(_pipeline(ray, job, todo, config, started, on_result))
            finally:
                ctx = ray.data.DataContext.get_current()
                for k, v in saved.items():
                    setattr(ctx, k, v)
    finally:
        if started:
            t0 = time.perf_counter()
            ray.shutdown()
            info["ray_shutdown_s"] = round(time.perf_counter() - t0, 3)
    return info


def _actor_pool(ray, ds, job: JobManifest, config: CorpusConfig, size: int, cpus: float):
    """``ds.map_batches`` over ``ShardActor``: one shard per call, bounded retries."""
    gpus = actor_gpus(config, job)
    model_bytes = sum(
        os.path.getsize(os.path.join(job.artifact["path"], rel)) for rel in job.artifact["files"]
    )
    kwargs = {
        "job": job,
        "out_dir": os.fspath(config.out_dir),
        "policy": config.on_bad_row,
        "providers": config.providers,
        "threads": config.threads or max(1, int(cpus)),
        "kill_once": os.environ.get(TEST_KILL_ONCE_ENV),
    }
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for the retry bounds
        warnings.simplefilter("ignore", DeprecationWarning)  # (ray_remote_args: until 2.64)
        return ds.map_batches(
            ShardActor,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=kwargs,
            num_cpus=cpus,
            num_gpus=gpus or None,
            memory=model_bytes + ACTOR_OVERHEAD_BYTES,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )


def _pipeline(ray, job, todo, config, local_cluster, on_result) -> dict[str, Any]:
    size = min(config.concurrency, len(todo))
    cpus = actor_cpus(config, local_cluster)
    ds = ray.data.from_items([{"shard": s.index} for s in todo], override_num_blocks=len(todo))
    ds = _actor_pool(ray, ds, job, config, size, cpus)
    loads, pids = [], set()
    rows = ds.iter_rows()
    try:
        for row in rows:
            if row["error_type"]:
                _raise_reported(row)
            if row["load_s"]:
                loads.append(round(float(row["load_s"]), 3))
            pids.add(int(row["pid"]))
            on_result(ShardResult(int(row["index"]), int(row["rows"]), int(row["embedded"]),
                                  int(row["bad"]), float(row["seconds"])))  # fmt: skip
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    return {"actors": size, "cpus_per_actor": cpus, "gpus_per_actor": actor_gpus(config, job),
            "actor_load_s": loads, "actor_pids": len(pids)}  # fmt: skip
