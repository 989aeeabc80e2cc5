"""Corpus inputs: find the files, plan deterministic shards, read one shard's rows.

Formats (by suffix): ``.jsonl`` (one JSON object a line; blank lines are skipped), ``.tsv``
(a header line, then TAB-separated fields, no quoting), ``.txt`` (one text a line, blank lines
included; the id is the line number, or ``FILE:LINE`` when the input has several files) and
``.parquet``. A shard never spans two files: each file is cut into runs of ``rows_per_shard``
rows, files in sorted order. The planning pass reads every file once: it counts rows, records
the byte offset of each shard's first row (so a shard is read with one seek) and hashes the
content (sha256), which is the input's fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from echoembed.errors import InputError, InternalError, require

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".tsv": "tsv", ".txt": "txt"}
_GLOB_CHARS = set("*?[")


class Missing:
    """The text field of a row that has none (a bad row, not a hard error)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = Missing()


@dataclass(frozen=True)
class InputFile:
    """One input file: its path relative to the input root, format, size, sha256, row count."""

    path: str
    format: str
    size: int
    sha256: str
    rows: int


@dataclass(frozen=True)
class ShardSpec:
    """Rows ``start .. start + rows`` of one file; ``offset``/``line``: the byte offset and
    1-based line number of its first row (text formats; Parquet: 0 and ``start + 1``)."""

    index: int
    file: str
    start: int
    rows: int
    offset: int
    line: int


class Row(NamedTuple):
    """One input row: its id (always a str), its text (any value; checked later) and where."""

    id: str
    text: object
    where: str


def pyarrow_parquet():
    """``pyarrow.parquet``, or a MissingDependencyError with the install command."""
    require("pyarrow", "ray")
    return require("pyarrow.parquet", "ray", "pyarrow")


def find_files(
    spec: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None
) -> tuple[Path, list[str]]:
    """The input root and the sorted relative paths of the input files under it (files under
    ``exclude``, the job's OUT_DIR, are never input: its shards are Parquet files too)."""
    root, found = _candidates(os.fspath(spec))
    if exclude is not None:
        skip = Path(exclude).resolve()
        found = [p for p in found if skip != p and skip not in p.parents]
    usable = sorted(p.relative_to(root).as_posix() for p in found if _format_of(p) is not None)
    ignored = sorted(p.name for p in found if _format_of(p) is None)
    if ignored:
        log.warning("input %s: ignoring %d file(s) of other types: %s", spec, len(ignored),
                    ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))  # fmt: skip
    if not usable:
        raise InputError(
            f"input {spec} holds no {', '.join(FORMATS)} files; point it at the corpus files"
        )
    return root, usable


def _candidates(text: str) -> tuple[Path, list[Path]]:
    """The input root and every file the input names (a file, a directory's tree, a glob)."""
    path = Path(text)
    if path.is_file():
        _format_of(path, strict=True)
        return path.parent.resolve(), [path.resolve()]
    if path.is_dir():
        root = path.resolve()
        found = [p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)]
    elif _GLOB_CHARS & set(text):
        found = [Path(p).resolve() for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        parents = [str(p.parent) for p in found]
        root = Path(os.path.commonpath(parents)) if parents else Path(".").resolve()
    else:
        raise InputError(f"input {text} does not exist (give a file, a directory or a glob)")
    return root, found


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _format_of(path: Path, strict: bool = False) -> str | None:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None and strict:
        raise InputError(
            f"{path}: unsupported input type {path.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    return fmt


def plan_file(
    root: Path, rel: str, rows_per_shard: int, id_column: str, text_column: str
) -> tuple[InputFile, list[tuple[int, int, int, int]]]:
    """Scan one file: its ``InputFile`` and its shards as (start, rows, offset, line)."""
    path = root / rel
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "parquet":
        rows, digest = _scan_parquet(path, id_column, text_column)
        cuts = [(s, 0, s + 1) for s in range(0, rows, rows_per_shard)]
    else:
        rows, digest, cuts = _scan_lines(path, fmt, rows_per_shard, id_column, text_column)
    info = InputFile(rel, fmt, path.stat().st_size, digest, rows)
    shards = [(s, min(rows_per_shard, rows - s), off, line) for s, off, line in cuts]
    return info, shards


def _is_row(fmt: str, raw: bytes) -> bool:
    return fmt == "txt" or bool(raw.strip())


def _scan_lines(path: Path, fmt: str, rows_per_shard: int, id_column: str, text_column: str):
    h = hashlib.sha256()
    cuts: list[tuple[int, int, int]] = []
    rows = pos = line = 0
    with open(path, "rb") as f:
        if fmt == "tsv":
            header = f.readline()
            _tsv_columns(header, path, id_column, text_column)
            h.update(header)
            pos, line = len(header), 1
        for raw in f:
            line += 1
            h.update(raw)
            if _is_row(fmt, raw):
                if rows % rows_per_shard == 0:
                    cuts.append((rows, pos, line))
                rows += 1
            pos += len(raw)
    return rows, h.hexdigest(), cuts


def _scan_parquet(path: Path, id_column: str, text_column: str) -> tuple[int, str]:
    pq = pyarrow_parquet()
    try:
        meta = pq.read_metadata(path)
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a damaged file
        raise InputError(f"{path} is not a readable Parquet file ({e})") from e
    missing = [c for c in (id_column, text_column) if c not in names]
    if missing:
        raise InputError(
            f"{path} has no column(s) {missing} (columns: {names}); pass --id-column / "
            "--text-column"
        )
    from echoembed.artifact import sha256_file

    return meta.num_rows, sha256_file(path)


def _tsv_columns(header: bytes, path: Path, id_column: str, text_column: str) -> tuple[int, int]:
    names = header.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
    missing = [c for c in (id_column, text_column) if c not in names]
    if missing:
        raise InputError(
            f"{path}: the header has no column(s) {missing} (columns: {names}); pass "
            "--id-column / --text-column"
        )
    return names.index(id_column), names.index(text_column)


def id_of(value: object, where: str) -> str:
    """A row's id as the string every output and check uses (str or int ids only)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InputError(
        f"{where}: the id {value!r} is not a non-empty string or an integer; every row needs "
        "one (choose the column with --id-column)"
    )


def read_rows(
    root: Path, shard: ShardSpec, fmt: str, id_column: str, text_column: str, multi: bool
) -> list[Row]:
    """The rows of one shard, in file order."""
    path = root / shard.file
    if fmt == "parquet":
        return _parquet_rows(path, shard, id_column, text_column)
    return list(_line_rows(path, shard, fmt, id_column, text_column, multi))


def iter_file_rows(
    root: Path, info: InputFile, id_column: str, text_column: str, multi: bool
) -> Iterator[Row]:
    """Every row of one file (``verify`` reads the ids this way)."""
    if info.format == "parquet":
        whole = ShardSpec(0, info.path, 0, info.rows, 0, 1)
        yield from _parquet_rows(root / info.path, whole, id_column, text_column)
        return
    offset, line = 0, 1
    if info.format == "tsv":
        with open(root / info.path, "rb") as f:
            offset, line = len(f.readline()), 2
    whole = ShardSpec(0, info.path, 0, info.rows, offset, line)
    yield from _line_rows(root / info.path, whole, info.format, id_column, text_column, multi)


def _decode(raw: bytes) -> str:
    """A line's text; bytes that are not UTF-8 become lone surrogates, which the encoder
    refuses (a bad row with its reason) instead of silently altered text."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", errors="surrogateescape")


def _line_rows(path: Path, shard: ShardSpec, fmt: str, id_column: str, text_column: str,
               multi: bool) -> Iterator[Row]:  # fmt: skip
    cols = None
    if fmt == "tsv":
        with open(path, "rb") as f:
            cols = _tsv_columns(f.readline(), path, id_column, text_column)
    left, line = shard.rows, shard.line - 1
    with open(path, "rb") as f:
        f.seek(shard.offset)
        for raw in f:
            if left == 0:
                return
            line += 1
            if not _is_row(fmt, raw):
                continue
            left -= 1
            where = f"{shard.file}:{line}"
            if fmt == "txt":
                yield Row(f"{shard.file}:{line}" if multi else str(line), _decode(raw), where)
            elif fmt == "jsonl":
                yield _json_row(raw, where, id_column, text_column)
            else:
                yield _tsv_row(_decode(raw), cols, where)
    if left:
        raise InputError(f"{path} changed while the job read it (it has fewer rows now)")


def _json_row(raw: bytes, where: str, id_column: str, text_column: str) -> Row:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{where} is not valid JSON ({e}); fix or remove the line") from e
    if not isinstance(obj, dict):
        raise InputError(f"{where} is a JSON {type(obj).__name__}, not an object")
    if id_column not in obj:
        raise InputError(f"{where} has no {id_column!r} field (choose it with --id-column)")
    return Row(id_of(obj[id_column], where), obj.get(text_column, MISSING), where)


def _tsv_row(line: str, cols: tuple[int, int] | None, where: str) -> Row:
    if cols is None:
        raise InternalError("a TSV row was read without its header's columns")
    fields = line.split("\t")
    if len(fields) <= max(cols):
        raise InputError(
            f"{where} has {len(fields)} field(s), fewer than its header; TSV input is "
            "TAB-separated with no quoting"
        )
    return Row(id_of(fields[cols[0]], where), fields[cols[1]], where)


def _parquet_rows(path: Path, shard: ShardSpec, id_column: str, text_column: str) -> list[Row]:
    pq = pyarrow_parquet()
    pf = pq.ParquetFile(path)
    stop = shard.start + shard.rows
    groups, first, at = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if at < stop and at + n > shard.start:
            groups.append(g)
            first = at if first is None else first
        at += n
    if not groups:
        return []
    table = pf.read_row_groups(groups, columns=[id_column, text_column])
    table = table.slice(shard.start - first, shard.rows)
    ids = table.column(id_column).to_pylist()
    texts = table.column(text_column).to_pylist()
    rows = []
    for i, (rid, text) in enumerate(zip(ids, texts, strict=True)):
        where = f"{shard.file} row {shard.start + i + 1}"
        rows.append(Row(id_of(rid, where), text, where))
    return rows
