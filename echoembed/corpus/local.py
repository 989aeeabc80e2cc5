"""The local engine: every shard in this process, one ``Embedder``, in order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from echoembed.corpus.config import CorpusConfig
from echoembed.corpus.errors import CorpusJobError
from echoembed.corpus.inputs import ShardSpec
from echoembed.corpus.job import JobManifest
from echoembed.corpus.shard import ShardResult, ShardRunner


def load_embedder(job: JobManifest, providers: Sequence[str] | None, threads: int | None):
    """Load the job's artifact (checksums verified) and check it is the one fingerprinted: an
    artifact replaced while a job runs must not mix its embeddings into the output."""
    from echoembed.runtime import Embedder

    embedder = Embedder.load(job.artifact["path"], providers=providers, threads=threads)
    if dict(sorted(embedder.manifest.files.items())) != job.artifact["files"]:
        raise CorpusJobError(
            f"{job.artifact['path']} changed after the job started (its checksums differ from "
            "job.json's); rerun: a changed artifact is refused unless --force"
        )
    return embedder


def run_local(job: JobManifest, todo: Sequence[ShardSpec], config: CorpusConfig,
              on_result: Callable[[ShardResult], None]) -> dict[str, Any]:  # fmt: skip
    """Run ``todo`` shards here; returns the engine's own timings."""
    t0 = time.perf_counter()
    embedder = load_embedder(job, config.providers, config.threads)
    load_s = time.perf_counter() - t0
    runner = ShardRunner(embedder, job, str(config.out_dir), config.on_bad_row)
    for spec in todo:
        on_result(runner.run(spec))
    return {"load_s": round(load_s, 3)}
