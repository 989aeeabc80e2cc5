"""The one writer side of every artifact: a staged directory and an atomic file writer.

Nothing half-written is ever left where a finished artifact or file is expected:

- ``staged_dir(out, force=...)`` builds a directory in a temporary sibling of ``out``, runs an
  optional ``verify`` on it, then renames it into place (an old ``out`` is moved aside first and
  removed only after the new one is in place); any failure removes the temporary directory and
  leaves ``out`` as it was.
- ``atomic_write(path, data)`` (text or bytes), ``atomic_write_json`` and ``atomic_save_npy``
  write a temporary file in the same directory and ``os.replace`` it onto ``path``.

stdlib and numpy only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from echoembed.errors import ArtifactError

__all__ = [
    "StagedDir",
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_json",
    "check_target",
    "staged_dir",
]


def check_target(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing artifact unless forced (``--force``)."""
    if out.exists() and not force:
        raise ArtifactError(
            f"{out} already exists; choose another path or pass --force to replace it"
        )
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; remove it first")


def _atomic(path: str | os.PathLike[str], mode: str, write: Callable[[IO], None]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically; returns the path."""
    if isinstance(data, bytes):
        return _atomic(path, "wb", lambda f: f.write(data))
    return _atomic(path, "w", lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """``json.dump`` to ``path`` atomically (keys sorted, so equal objects give equal files)."""
    return _atomic(path, "w", lambda f: json.dump(obj, f, indent=indent, sort_keys=True))


def atomic_save_npy(path: str | os.PathLike[str], array) -> Path:
    """``numpy.save`` to ``path`` atomically (a reader never sees half an array)."""
    import numpy as np

    return _atomic(path, "wb", lambda f: np.save(f, array))


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``os.umask`` sets it,
    which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sibling_dir(out: Path, tag: str) -> Path:
    """A new empty directory beside ``out`` with the usual permissions (``mkdtemp`` makes 0700,
    which would leave every artifact readable by its owner only)."""
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    path.chmod(0o777 & ~_umask())
    return path


class StagedDir:
    """A directory being built beside its target; see ``staged_dir``."""

    def __init__(self, out: Path, path: Path):
        self.out = out
        self.path = path
        self._scratch: list[Path] = []

    def scratch(self, tag: str = "work") -> Path:
        """A second temporary sibling for intermediate files, removed whatever happens."""
        p = _sibling_dir(self.out, tag)
        self._scratch.append(p)
        return p

    def _cleanup(self, include_stage: bool) -> None:
        for p in self._scratch:
            shutil.rmtree(p, ignore_errors=True)
        if include_stage:
            shutil.rmtree(self.path, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` by renames (an old ``out`` is removed afterwards)."""
    old = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old = aside / out.name
        try:
            os.replace(out, old)
        except BaseException:
            aside.rmdir()
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            try:
                os.replace(old, out)
            except OSError as e:
                raise ArtifactError(
                    f"could not put {out} back after a failed replace ({e}); the previous "
                    f"version is at {old}: move it back by hand"
                ) from e
            old.parent.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(
    out: str | os.PathLike[str],
    force: bool = False,
    verify: Callable[[Path], None] | None = None,
    check: Callable[[Path, bool], None] = check_target,
) -> Iterator[StagedDir]:
    """Build a directory in a temporary sibling of ``out``, then rename it into place.

    ``check(out, force)`` runs first (default: refuse an existing ``out`` unless ``force``);
    ``verify(stage_path)`` runs after the body and before the rename. On any exception the
    temporary directory (and every ``scratch()`` directory) is removed and ``out`` is untouched.
    """
    target = Path(out)
    check(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = StagedDir(target, _sibling_dir(target, "tmp"))
    try:
        yield stage
        if verify is not None:
            verify(stage.path)
        _install(stage.path, target)
    except BaseException:
        stage._cleanup(include_stage=True)
        raise
    stage._cleanup(include_stage=False)
