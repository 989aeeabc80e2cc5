"""The job manifest (``job.json``), its fingerprint, and the OUT_DIR rules.

The fingerprint is the sha256 of five parts: the artifact (its files' checksums from the
manifest, plus what changes an embedding without changing a file: the prompt limits, special
tokens, pooling and normalization), the resolved template (source and defaults), the input (per
file: relative path, format, size, sha256 of the content, rows), the sharding (rows per shard,
id and text columns) and the batching (batch size, token budget: with INT8-dynamic artifacts
whose activation scales are per tensor, ``activation_scale="tensor"`` and every one made before
per-token scales, an embedding depends on its batch-mates, since activations are quantized per
batch; measured on SmolLM2 INT8, the same texts batched differently agreed only to cosine 0.990).

The input is fingerprinted by content, not by modification times: an mtime changes when a
corpus is copied or checked out (a false refusal) and can stay put through an in-place edit (a
silent mix), while the planning pass reads every file once anyway to count rows and find the
shards' offsets, so the hash costs no extra read. Every shard carries the fingerprint in its
Parquet metadata, so a shard of another job is never taken for a finished one, and a rerun whose
fingerprint differs from ``job.json``'s is refused unless ``force`` (which clears the old output
first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoembed.artifact import Manifest, atomic_write_json
from echoembed.corpus.errors import CorpusJobError
from echoembed.corpus.inputs import InputFile, ShardSpec

JOB_FORMAT = 1
JOB_NAME = "job.json"
SUMMARY_NAME = "summary.json"
META_KEY = b"echoembed.corpus"
PART_LABELS = {
    "artifact": "the artifact",
    "template": "the template",
    "input": "the input",
    "sharding": "the sharding (--rows-per-shard, --id-column, --text-column)",
    "batching": "the batching (--batch-size, --max-batch-tokens)",
}


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.parquet"


def errors_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.errors.jsonl"


@dataclass(frozen=True)
class JobManifest:
    """What a corpus job embeds, with what, and how it is cut into shards."""

    fingerprint: str
    artifact: dict[str, Any]  # path, files (rel -> sha256), encoding, hidden_size, precision,
    # engine
    template: dict[str, Any]  # name, source, defaults
    input_root: str
    id_column: str
    text_column: str
    files: tuple[InputFile, ...]
    rows_per_shard: int
    batch_size: int
    max_batch_tokens: int | None
    shards: tuple[ShardSpec, ...]
    on_bad_row: str
    created: str
    format_version: int = JOB_FORMAT

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def multi_file(self) -> bool:
        return len(self.files) > 1

    @property
    def hidden_size(self) -> int:
        return int(self.artifact["hidden_size"])

    def file(self, rel: str) -> InputFile:
        return next(f for f in self.files if f.path == rel)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> JobManifest:
        try:
            d = dict(data)
            if d.get("format_version") != JOB_FORMAT:
                raise CorpusJobError(
                    f"{where}: job format {d.get('format_version')!r} is not {JOB_FORMAT}; "
                    "rerun with --force to start the job again"
                )
            d["files"] = tuple(InputFile(**f) for f in d["files"])
            d["shards"] = tuple(ShardSpec(**s) for s in d["shards"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise CorpusJobError(
                f"{where} is not a valid job manifest ({e}); rerun with --force to start again"
            ) from e


def artifact_part(root: Path, manifest: Manifest) -> dict[str, Any]:
    """The artifact as a job records it (checksums, and the settings that shape embeddings)."""
    return {
        "path": str(root.resolve()),
        "files": dict(sorted(manifest.files.items())),
        "encoding": {
            "max_length": manifest.max_length,
            "context_length": manifest.context_length,
            "special_tokens": dataclasses.asdict(manifest.special_tokens),
            "pooling": manifest.pooling,
            "normalize": manifest.normalize,
        },
        "hidden_size": manifest.hidden_size,
        "precision": manifest.precision,
        "engine": manifest.engine is not None,  # a TensorRT engine artifact (GPU actors)
    }


def fingerprint_parts(
    artifact: dict[str, Any],
    template: dict[str, Any],
    files: tuple[InputFile, ...],
    rows_per_shard: int,
    id_column: str,
    text_column: str,
    batch_size: int,
    max_batch_tokens: int | None,
) -> dict[str, Any]:
    """The five parts the fingerprint hashes (paths of the artifact and input root excluded:
    a moved artifact or corpus is the same job)."""
    return {
        "artifact": {"files": artifact["files"], "encoding": artifact["encoding"]},
        "template": {"source": template["source"], "defaults": template["defaults"]},
        "input": [dataclasses.asdict(f) for f in files],
        "sharding": {
            "rows_per_shard": rows_per_shard,
            "id_column": id_column,
            "text_column": text_column,
        },
        "batching": {"batch_size": batch_size, "max_batch_tokens": max_batch_tokens},
    }


def job_parts(job: JobManifest) -> dict[str, Any]:
    return fingerprint_parts(job.artifact, job.template, job.files, job.rows_per_shard,
                             job.id_column, job.text_column, job.batch_size,
                             job.max_batch_tokens)  # fmt: skip


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def read_job(out: Path) -> JobManifest:
    path = out / JOB_NAME
    if not path.is_file():
        raise CorpusJobError(f"{out} has no {JOB_NAME}: not the output of `echoembed embed-corpus`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusJobError(
            f"{path} is not valid JSON ({e}); rerun with --force to start again"
        ) from e
    return JobManifest.from_dict(data, str(path))


def _ours(p: Path) -> bool:
    """Files a corpus job writes (and may therefore clear)."""
    name = p.name
    if name in (JOB_NAME, SUMMARY_NAME):
        return True
    if name.startswith("shard-") and name.endswith((".parquet", ".errors.jsonl")):
        return True
    return _temporary(p)


def _temporary(p: Path) -> bool:
    """A temporary file of the atomic writer (``.NAME.XXXX.tmp``) left by a killed run."""
    name = p.name
    return name.endswith(".tmp") and name.startswith((".shard-", f".{JOB_NAME}.",
                                                      f".{SUMMARY_NAME}."))  # fmt: skip


def clear_output(out: Path) -> None:
    """Remove a job's files (``job.json`` first, so no state is ever half its)."""
    (out / JOB_NAME).unlink(missing_ok=True)
    for p in sorted(out.iterdir()):
        if p.is_file() and _ours(p):
            p.unlink(missing_ok=True)


def _difference(old: JobManifest, new: JobManifest) -> str:
    a, b = job_parts(old), job_parts(new)
    changed = [PART_LABELS[k] for k in PART_LABELS if a[k] != b[k]]
    return ", ".join(changed) or "the job format"


def prepare_out_dir(out: Path, job: JobManifest, force: bool) -> JobManifest:
    """Make OUT_DIR ready for ``job`` and write its ``job.json``: resume the same job, refuse
    another job's output (or a non-empty directory that is no job's) unless ``force``, which
    clears the old output and starts again. Returns the job as written."""
    if out.exists() and not out.is_dir():
        raise CorpusJobError(f"OUT_DIR {out} exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    if force:
        clear_output(out)
    elif (out / JOB_NAME).exists():
        old = read_job(out)
        if old.fingerprint != job.fingerprint:
            raise CorpusJobError(
                f"{out} holds the output of another job ({_difference(old, job)} changed); "
                "its shards would mix two jobs' embeddings. Choose another OUT_DIR, or pass "
                "--force to delete the old shards and start again"
            )
        job = dataclasses.replace(job, created=old.created)
    else:
        foreign = sorted(p.name for p in out.iterdir() if not _temporary(p))
        if foreign:
            raise CorpusJobError(
                f"{out} is not empty and has no {JOB_NAME} ({', '.join(foreign[:3])} ...): not "
                "an embed-corpus output. Choose a new or empty OUT_DIR, or pass --force to "
                "delete the shard files in it"
            )
    for p in out.iterdir():
        if _temporary(p):
            p.unlink(missing_ok=True)
    (out / SUMMARY_NAME).unlink(missing_ok=True)
    atomic_write_json(out / JOB_NAME, job.to_dict())
    return job


def shard_metadata(job: JobManifest, spec: ShardSpec, bad: int, policy: str) -> dict[str, Any]:
    """What a finished shard records about itself in its Parquet metadata."""
    return {
        "fingerprint": job.fingerprint,
        "shard": spec.index,
        "file": spec.file,
        "start": spec.start,
        "rows": spec.rows,
        "bad_rows": bad,
        "on_bad_row": policy,
    }


def read_shard_metadata(path: Path) -> dict[str, Any] | None:
    """A shard file's own record plus its row count (None: not a readable shard of a job)."""
    from echoembed.corpus.inputs import pyarrow_parquet

    pq = pyarrow_parquet()
    try:
        meta = pq.read_metadata(path)
        record = json.loads((meta.metadata or {})[META_KEY])
    except Exception:  # missing, damaged (pyarrow raises ArrowInvalid / OSError) or foreign
        return None
    if not isinstance(record, dict):
        return None
    record["num_rows"] = meta.num_rows
    return record


def shard_done(out: Path, job: JobManifest, spec: ShardSpec) -> bool:
    """The shard's output exists, belongs to this job and accounts for every row."""
    path = shard_path(out, spec.index)
    if not path.is_file():
        return False
    record = read_shard_metadata(path)
    if record is None or record.get("fingerprint") != job.fingerprint:
        return False
    if record.get("shard") != spec.index or record.get("rows") != spec.rows:
        return False
    bad = int(record.get("bad_rows", 0))
    if record["num_rows"] + bad != spec.rows:
        return False
    return bad == 0 or _count_lines(errors_path(out, spec.index)) == bad


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return -1
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
