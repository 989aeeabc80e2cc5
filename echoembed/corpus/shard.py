"""One shard, the unit of work of both engines: read its rows, embed, write atomically.

A shard's output is ``shard-XXXXX.parquet`` (``id`` string, ``embedding`` fixed-size list of
float32, the job's fingerprint in the file's metadata), written to a temporary name in OUT_DIR
and renamed into place; its bad rows (``on_bad_row="skip"``) go to ``shard-XXXXX.errors.jsonl``
first, the same way. The Parquet file is the commit: a shard without it is redone, and redoing a
shard rewrites the same two files, so a retried or resumed shard is never doubled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from echoembed.artifact import atomic_write
from echoembed.corpus.errors import BadRowError
from echoembed.corpus.inputs import MISSING, Row, ShardSpec, read_rows
from echoembed.corpus.job import META_KEY, JobManifest, errors_path, shard_metadata, shard_path
from echoembed.echo import Template
from echoembed.echo.template import lone_surrogate_at
from echoembed.errors import InputError, InternalError, require


@dataclass(frozen=True)
class ShardResult:
    """What one shard did: rows read, embedded, set aside as bad; wall seconds."""

    index: int
    rows: int
    embedded: int
    bad: int
    seconds: float


class BadRow(NamedTuple):
    id: str
    reason: str
    where: str


def row_problem(row: Row, text_column: str) -> str | None:
    """Why a row cannot be embedded (None: it can, as far as a cheap check can tell)."""
    text = row.text
    if text is MISSING:
        return f"no {text_column!r} field"
    if not isinstance(text, str):
        return f"the text is {type(text).__name__} ({text!r:.40}), not a string"
    if not text.strip():
        return "the text is empty or whitespace-only"
    bad = lone_surrogate_at(text)
    if bad is not None:
        return (
            f"the text is not valid UTF-8 (character {bad} is a lone surrogate: invalid bytes "
            "in the source)"
        )
    return None


def job_template(job: JobManifest) -> Template:
    t = job.template
    return Template(t["source"], name=t["name"], defaults=t["defaults"])


class ShardRunner:
    """Runs shards of one job with one loaded ``Embedder`` (one per process or Ray actor)."""

    def __init__(self, embedder, job: JobManifest, out_dir: str, policy: str):
        self.embedder = embedder
        self.job = job
        self.out = Path(out_dir)
        self.policy = policy
        self.batch_size = job.batch_size  # part of the fingerprint, as the batching shapes
        self.max_batch_tokens = job.max_batch_tokens  # INT8-dynamic embeddings
        self.template = job_template(job)
        self.root = Path(job.input_root)

    def run(self, spec: ShardSpec) -> ShardResult:
        t0 = time.perf_counter()
        fmt = self.job.file(spec.file).format
        rows = read_rows(self.root, spec, fmt, self.job.id_column, self.job.text_column,
                         self.job.multi_file)  # fmt: skip
        good, bad = self._split(rows)
        if bad and self.policy == "error":
            raise bad_row_error(bad[0], self.root)
        emb, kept, refused = self._embed(good)
        if refused and self.policy == "error":
            raise bad_row_error(refused[0], self.root)
        bad += refused
        write_shard(self.out, self.job, spec, [r.id for r in kept], emb, bad, self.policy)
        return ShardResult(spec.index, len(rows), len(kept), len(bad),
                           time.perf_counter() - t0)  # fmt: skip

    def _split(self, rows: Sequence[Row]) -> tuple[list[Row], list[BadRow]]:
        good, bad = [], []
        for r in rows:
            reason = row_problem(r, self.job.text_column)
            if reason is None:
                good.append(r)
            else:
                bad.append(BadRow(r.id, reason, r.where))
        return good, bad

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.job.hidden_size), dtype=np.float32)
        emb = self.embedder.encode(texts, self.template, batch_size=self.batch_size,
                                   max_batch_tokens=self.max_batch_tokens,
                                   show_progress=False)  # fmt: skip
        if emb.shape != (len(texts), self.job.hidden_size) or emb.dtype != np.float32:
            raise InternalError(f"the embedder returned {emb.shape} {emb.dtype} for "
                                f"{len(texts)} texts")  # fmt: skip
        return emb

    def _embed(self, good: list[Row]) -> tuple[np.ndarray, list[Row], list[BadRow]]:
        """Embed the rows -> (embeddings, rows embedded, rows the encoder refused). Refused rows
        are looked for one by one only when the whole batch fails, so rows tokenize once."""
        try:
            return self._encode([r.text for r in good]), good, []
        except InputError:
            encoder = self.embedder.encoder(self.template)
        kept, refused = [], []
        for r in good:
            try:
                encoder.encode_ids([r.text])
                kept.append(r)
            except InputError as e:
                reason = str(e).replace("texts[0] ", "the text ", 1)
                refused.append(BadRow(r.id, reason, r.where))
        if not refused:
            raise InternalError("a batch failed to encode, but each of its rows encodes alone")
        return self._encode([r.text for r in kept]), kept, refused


def bad_row_error(bad: BadRow, root: Path) -> BadRowError:
    return BadRowError(
        f"{root}/{bad.where}: the row with id {bad.id!r} cannot be embedded: {bad.reason}. Fix or "
        "drop it, or pass --on-bad-row skip to list such rows in the shard's errors file and "
        "go on"
    )


def write_shard(out: Path, job: JobManifest, spec: ShardSpec, ids: list[str], emb: np.ndarray,
                bad: list[BadRow], policy: str) -> Path:  # fmt: skip
    """Write the errors file (or remove a stale one), then the Parquet shard, each atomically."""
    pa = require("pyarrow", "ray")
    pq = require("pyarrow.parquet", "ray", "pyarrow")
    errors = errors_path(out, spec.index)
    if bad:
        lines = [json.dumps({"id": b.id, "reason": b.reason, "where": b.where},
                            ensure_ascii=False) + "\n" for b in bad]  # fmt: skip
        atomic_write(errors, "".join(lines))
    else:
        errors.unlink(missing_ok=True)
    hidden = job.hidden_size
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, hidden),
        }
    )
    meta = shard_metadata(job, spec, len(bad), policy)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return atomic_write(shard_path(out, spec.index), sink.getvalue().to_pybytes())
