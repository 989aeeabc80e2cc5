"""``verify_corpus(out_dir, input)``: every input id appears exactly once in the output.

An id is accounted for by a row of a shard of this job, or by a line of a shard's errors file
when that shard was written with ``on_bad_row="skip"`` (its metadata says so, and its bad-row
count matches the file). Also checked: every planned shard is there, no shard file belongs to
another job, every embedding is finite and unit-norm with the job's width, and the input is
the one the job embedded (same files, sizes and sha256). Holds every id in memory once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echoembed.corpus.inputs import find_files, iter_file_rows, plan_file, pyarrow_parquet
from echoembed.corpus.job import JobManifest, errors_path, read_job, read_shard_metadata

EXAMPLES = 5
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VerifyReport:
    """The counts of a check; ``ok`` when every id is accounted for exactly once."""

    out_dir: str
    input_rows: int
    output_rows: int
    error_rows: int
    missing: int
    doubled: int
    unknown: int
    duplicate_input_ids: int
    missing_shards: tuple[int, ...]
    foreign_shards: tuple[str, ...]
    bad_embeddings: int
    unaccounted_error_files: tuple[str, ...]
    input_changed: tuple[str, ...]
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.doubled or self.unknown or self.duplicate_input_ids
            or self.missing_shards or self.foreign_shards or self.bad_embeddings
            or self.unaccounted_error_files or self.input_changed
        )  # fmt: skip


def _input_ids(
    job: JobManifest, spec: str | os.PathLike[str], out: Path
) -> tuple[Counter, list[str]]:
    """The input's ids, and what differs from the input the job recorded."""
    root, rels = find_files(spec, exclude=out)
    recorded = {f.path: f for f in job.files}
    changed = sorted(set(recorded) ^ set(rels))
    ids: Counter = Counter()
    multi = len(rels) > 1
    for rel in rels:
        info, _ = plan_file(root, rel, job.rows_per_shard, job.id_column, job.text_column)
        if rel in recorded and info != recorded[rel]:
            changed.append(rel)
        for row in iter_file_rows(root, info, job.id_column, job.text_column, multi):
            ids[row.id] += 1
    return ids, sorted(set(changed))


def _bad_embeddings(table, hidden: int) -> int:
    """How many rows of a shard have a missing, non-finite or non-unit embedding."""
    import pyarrow as pa

    col = table.column("embedding")
    if col.type != pa.list_(pa.float32(), hidden):
        return table.num_rows
    if col.null_count:
        return col.null_count
    arr = col.combine_chunks()
    emb = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, hidden)
    finite = np.isfinite(emb).all(axis=1)
    norm = np.linalg.norm(np.where(finite[:, None], emb, 0.0), axis=1)
    return int((~finite | (np.abs(norm - 1.0) > NORM_TOLERANCE)).sum())


def _error_ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def verify_corpus(out_dir: str | os.PathLike[str], input: str | os.PathLike[str]) -> VerifyReport:
    """Check OUT_DIR against INPUT (see the module docstring)."""
    pq = pyarrow_parquet()
    out = Path(out_dir)
    job = read_job(out)
    want, changed = _input_ids(job, input, out)
    got: Counter = Counter()
    error_rows = bad_embeddings = 0
    present, foreign, unaccounted = set(), [], []
    for path in sorted(out.glob("shard-*.parquet")):
        record = read_shard_metadata(path)
        if record is None or record.get("fingerprint") != job.fingerprint:
            foreign.append(path.name)
            continue
        table = pq.read_table(path, columns=["id", "embedding"])
        got.update(table.column("id").to_pylist())
        bad_embeddings += _bad_embeddings(table, job.hidden_size)
        present.add(int(record["shard"]))
        errors = errors_path(out, int(record["shard"]))
        if record.get("bad_rows") and errors.is_file() and record.get("on_bad_row") == "skip":
            ids = _error_ids(errors)
            if len(ids) == record["bad_rows"]:
                got.update(ids)
                error_rows += len(ids)
                continue
        if errors.is_file():
            unaccounted.append(errors.name)
    for errors in sorted(out.glob("shard-*.errors.jsonl")):
        index = int(errors.name.split(".")[0].split("-")[1])
        if index not in present and errors.name not in unaccounted:
            unaccounted.append(errors.name)
    missing = {k: c - got[k] for k, c in want.items() if got[k] < c}
    doubled = {k: c - want[k] for k, c in got.items() if k in want and c > want[k]}
    unknown = {k: c for k, c in got.items() if k not in want}
    dup_input = {k: c - 1 for k, c in want.items() if c > 1}
    examples = {
        name: tuple(sorted(d)[:EXAMPLES])
        for name, d in (
            ("missing", missing),
            ("doubled", doubled),
            ("unknown", unknown),
            ("duplicate_input_ids", dup_input),
        )  # fmt: skip
        if d
    }
    return VerifyReport(
        out_dir=str(out),
        input_rows=sum(want.values()),
        output_rows=sum(got.values()) - error_rows,
        error_rows=error_rows,
        missing=sum(missing.values()),
        doubled=sum(doubled.values()),
        unknown=sum(unknown.values()),
        duplicate_input_ids=sum(dup_input.values()),
        missing_shards=tuple(s.index for s in job.shards if s.index not in present),
        foreign_shards=tuple(foreign),
        bad_embeddings=bad_embeddings,
        unaccounted_error_files=tuple(sorted(unaccounted)),
        input_changed=tuple(changed),
        examples=examples,
    )


def format_verify(r: VerifyReport) -> str:
    lines = [
        f"{r.out_dir}: {r.input_rows} input rows; {r.output_rows} embedded, {r.error_rows} in "
        f"errors files",
        f"missing {r.missing}, doubled {r.doubled}, unknown {r.unknown}, duplicate input ids "
        f"{r.duplicate_input_ids}, bad embeddings {r.bad_embeddings}",
    ]
    if r.missing_shards:
        lines.append(f"missing shards {list(r.missing_shards)[:20]}")
    if r.foreign_shards:
        lines.append(f"shards of another job or unreadable: {list(r.foreign_shards)[:20]}")
    if r.unaccounted_error_files:
        lines.append("errors files not counted (their shard was not run with --on-bad-row skip, "
                     f"or is missing): {list(r.unaccounted_error_files)[:20]}")  # fmt: skip
    if r.input_changed:
        lines.append(f"the input differs from the job's: {list(r.input_changed)[:20]}")
    for name, ids in r.examples.items():
        lines.append(f"{name} e.g. {list(ids)}")
    lines.append("OK: every input id appears exactly once" if r.ok else "FAILED")
    return "\n".join(lines)
