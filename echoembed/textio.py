"""Text lists in: one text per line (arrays go out via ``echoembed.artifact.atomic_save_npy``)."""

from __future__ import annotations

import os
from pathlib import Path

from echoembed.errors import InputError


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """One text per line (UTF-8). A blank line is an error naming its line number."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {p} does not exist")
    texts = p.read_text(encoding="utf-8").splitlines()
    for i, t in enumerate(texts, start=1):
        if not t.strip():
            raise InputError(f"{p}:{i} is blank: every line must hold one text; remove it")
    if not texts:
        raise InputError(f"{p} holds no texts")
    return texts
