"""``embed_corpus(config)``: plan the job, prepare OUT_DIR, run the unfinished shards, summarize."""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echoembed.artifact import atomic_write_json
from echoembed.corpus.config import CorpusConfig
from echoembed.corpus.inputs import ShardSpec, find_files, plan_file
from echoembed.corpus.job import (
    SUMMARY_NAME,
    JobManifest,
    artifact_part,
    fingerprint,
    fingerprint_parts,
    prepare_out_dir,
    shard_done,
)
from echoembed.corpus.shard import ShardResult
from echoembed.errors import InputError


@dataclass(frozen=True)
class CorpusSummary:
    """One run of a job (also written as ``summary.json``). ``rows_per_s``: rows of the shards
    this run computed over the engine's wall time (start-up and model load included)."""

    out_dir: str
    engine: str
    fingerprint: str
    shards: int
    shards_run: int
    shards_skipped: int
    rows: int
    rows_embedded: int
    bad_rows: int
    plan_s: float
    engine_s: float
    rows_per_s: float
    complete: bool
    engine_info: dict[str, Any] = field(default_factory=dict)


def plan_job(config: CorpusConfig) -> JobManifest:
    """Resolve the template, scan the input, cut it into shards and fingerprint the job."""
    from echoembed.runtime import Embedder

    light = Embedder.load(config.artifact, session=False)  # tokenizer and templates only
    tpl = light.template(config.template)
    light.encoder(tpl)  # a template this tokenizer cannot encode fails here, not in a shard
    template = {"name": tpl.name, "source": tpl.source, "defaults": dict(tpl.defaults)}
    artifact = artifact_part(Path(config.artifact), light.manifest)
    root, rels = find_files(config.input, exclude=config.out_dir)
    files, shards = [], []
    for rel in rels:
        info, cuts = plan_file(root, rel, config.rows_per_shard, config.id_column,
                               config.text_column)  # fmt: skip
        files.append(info)
        for start, rows, offset, line in cuts:
            shards.append(ShardSpec(len(shards), rel, start, rows, offset, line))
    if not shards:
        raise InputError(f"input {config.input} holds no rows")
    files = tuple(files)
    parts = fingerprint_parts(artifact, template, files, config.rows_per_shard,
                              config.id_column, config.text_column, config.batch_size,
                              config.max_batch_tokens)  # fmt: skip
    return JobManifest(
        fingerprint=fingerprint(parts),
        artifact=artifact,
        template=template,
        input_root=str(root),
        id_column=config.id_column,
        text_column=config.text_column,
        files=files,
        rows_per_shard=config.rows_per_shard,
        batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens,
        shards=tuple(shards),
        on_bad_row=config.on_bad_row,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _engine(name: str):
    if name == "ray":
        from echoembed.corpus.ray_engine import run_ray

        return run_ray
    from echoembed.corpus.local import run_local

    return run_local


def embed_corpus(config: CorpusConfig) -> CorpusSummary:
    """Run (or resume) a corpus job; see ``CorpusConfig`` and ``echoembed.corpus``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if config.engine == "ray":  # missing Ray fails before OUT_DIR is touched
        from echoembed.corpus.ray_engine import import_ray

        import_ray()
    out = Path(config.out_dir)
    job = prepare_out_dir(out, plan_job(config), config.force)
    todo = [s for s in job.shards if not shard_done(out, job, s)]
    plan_s = time.perf_counter() - t0
    results: list[ShardResult] = []
    done_rows = job.rows - sum(s.rows for s in todo)
    bar = tqdm(total=job.rows, initial=done_rows, unit="row", desc="embed-corpus",
               disable=not config.progress)  # fmt: skip

    first: list[float] = []

    def on_result(r: ShardResult) -> None:
        if not results:
            first.append(time.perf_counter() - t1)
        results.append(r)
        bar.update(r.rows)

    t1 = time.perf_counter()
    try:
        info = _engine(config.engine)(job, todo, config, on_result) if todo else {}
    finally:
        bar.close()
    if first:
        info = {**info, "first_shard_s": round(first[0], 3)}
    summary = _summary(config, job, todo, results, plan_s, time.perf_counter() - t1, info)
    atomic_write_json(out / SUMMARY_NAME, asdict(summary))
    return summary


def _summary(config: CorpusConfig, job: JobManifest, todo: list[ShardSpec],
             results: list[ShardResult], plan_s: float, engine_s: float,
             info: dict[str, Any]) -> CorpusSummary:  # fmt: skip
    out = Path(config.out_dir)
    ran_rows = sum(r.rows for r in results)
    return CorpusSummary(
        out_dir=str(out),
        engine=config.engine,
        fingerprint=job.fingerprint,
        shards=len(job.shards),
        shards_run=len(results),
        shards_skipped=len(job.shards) - len(todo),
        rows=job.rows,
        rows_embedded=sum(r.embedded for r in results),
        bad_rows=sum(r.bad for r in results),
        plan_s=round(plan_s, 3),
        engine_s=round(engine_s, 3),
        rows_per_s=round(ran_rows / engine_s, 2) if results and engine_s > 0 else 0.0,
        complete=all(shard_done(out, job, s) for s in job.shards),
        engine_info=info,
    )


def format_summary(s: CorpusSummary) -> str:
    lines = [
        f"{s.out_dir}: {s.shards} shards, {s.rows} rows; this run computed {s.shards_run} "
        f"shards ({s.rows_embedded} rows embedded, {s.bad_rows} bad) and skipped "
        f"{s.shards_skipped} finished ones",
        f"engine {s.engine}: {s.engine_s:.1f} s, {s.rows_per_s:.1f} rows/s (plan {s.plan_s:.1f} s)",
    ]
    if s.engine_info:
        lines.append("engine info " + ", ".join(f"{k} {v}" for k, v in s.engine_info.items()))
    lines.append("complete" if s.complete else "INCOMPLETE: rerun the same command to resume")
    return "\n".join(lines)
