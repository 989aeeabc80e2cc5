"""Corpus jobs: embed every row of a corpus into Parquet shards, resumably, locally or on Ray.

``embed_corpus(CorpusConfig(artifact, input, out_dir, ...))`` plans deterministic shards of
``rows_per_shard`` rows over the sorted input files, writes ``job.json`` (artifact checksums,
template, input fingerprint, the shards), then runs every shard whose output is not there yet:
read its rows, embed them with ``echoembed.runtime.Embedder``, write ``shard-XXXXX.parquet``
(``id``, ``embedding`` as a fixed-size list of float32) atomically, and finally
``summary.json``. A rerun resumes; another artifact, template, input or sharding is refused
unless ``force``. ``verify_corpus(out_dir, input)`` checks every input id appears exactly once.

Engines: ``local`` (this process, a progress bar) and ``ray`` (a Ray Data actor pool, one model
copy per actor; ``pip install 'echoembed[ray]'``). pyarrow and ray are imported when used.
"""

from __future__ import annotations

from echoembed.corpus.config import CorpusConfig
from echoembed.corpus.errors import BadRowError, CorpusJobError
from echoembed.corpus.job import JOB_NAME, SUMMARY_NAME, JobManifest, read_job
from echoembed.corpus.run import CorpusSummary, embed_corpus, format_summary, plan_job
from echoembed.corpus.verify import VerifyReport, format_verify, verify_corpus

__all__ = [
    "JOB_NAME",
    "SUMMARY_NAME",
    "BadRowError",
    "CorpusConfig",
    "CorpusJobError",
    "CorpusSummary",
    "JobManifest",
    "VerifyReport",
    "embed_corpus",
    "format_summary",
    "format_verify",
    "plan_job",
    "read_job",
    "verify_corpus",
]
