"""``CorpusConfig``: the one argument of ``embed_corpus``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from echoembed.errors import InputError

ENGINES = ("local", "ray")
BAD_ROW_POLICIES = ("error", "skip")


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}")


def _positive_float(name: str, value: object, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        floor = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be a number {floor}, got {value!r}")


@dataclass(frozen=True)
class CorpusConfig:
    """A corpus job: embed every row of ``input`` with ``artifact`` into Parquet shards in
    ``out_dir`` (resumable; see ``echoembed.corpus``).

    ``input``: a ``.jsonl``, ``.parquet``, ``.tsv`` (header line) or ``.txt`` file (one text a
    line, id = line number), a directory of them or a glob. ``engine="ray"`` runs the shards on
    Ray Data actors: ``address`` (else ``RAY_ADDRESS``) names an existing cluster, otherwise a
    local loopback-only cluster is started and shut down by the job. ``concurrency``: Ray actors
    (one model copy each). ``cpus_per_actor`` (None: this machine's cores / concurrency on a
    local cluster, 1 on an existing one) and ``threads`` (ONNX Runtime threads per actor or
    process; None: the actor's CPUs, or all cores for the local engine). ``gpus_per_actor``
    (None: 1 when ``providers`` names a GPU provider or the artifact is a TensorRT engine, else
    0). ``stall_timeout_s``: a Ray job that finishes no shard for this long fails (Ray's own
    default waits 1,800 s). ``force`` clears an OUT_DIR that holds another job's output.
    """

    artifact: str | os.PathLike[str]
    input: str | os.PathLike[str]
    out_dir: str | os.PathLike[str]
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    template: str | None = None
    id_column: str = "id"
    text_column: str = "text"
    batch_size: int = 32
    max_batch_tokens: int | None = None
    rows_per_shard: int = 10_000
    on_bad_row: Literal["error", "skip"] = "error"
    concurrency: int = 1
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    stall_timeout_s: float = 900.0
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise InputError(
                f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}"
            )
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_batch_tokens", self.max_batch_tokens, allow_none=True)
        _positive_int("rows_per_shard", self.rows_per_shard)
        _positive_int("concurrency", self.concurrency)
        _positive_int("threads", self.threads, allow_none=True)
        _positive_float("cpus_per_actor", self.cpus_per_actor)
        _positive_float("gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        _positive_float("stall_timeout_s", self.stall_timeout_s)
        for name in ("id_column", "text_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{name} must be a non-empty column name")
        if self.address is not None and self.engine != "ray":
            raise InputError("address names a Ray cluster: pass engine='ray' (--engine ray) too")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
