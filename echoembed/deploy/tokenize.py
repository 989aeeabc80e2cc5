"""`echoembed tokenize`: an artifact's model inputs for texts, for services with their own runtime.

The ids come from the same ``EchoEncoder`` the runtime ``Embedder`` builds for the artifact (its
tokenizer, template, ``max_length`` and context), so feeding them to the artifact's graph gives
``Embedder.encode``'s embeddings. Two output forms, each written atomically:

- ``.npz``: ``input_ids``, ``attention_mask``, ``pool_mask`` (int64 [texts, longest], right-padded
  with the pad id) and ``truncated`` (bool [texts]), rows in input order;
- ``.json``: per text its unpadded ``ids``, ``pool`` flags and ``truncated``, plus the template,
  the pad id and the graph's input names.

Only the manifest and ``tokenizer.json`` are read (its checksum verified); no ONNX Runtime.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.artifact import atomic_write
from echoembed.echo import (
    INPUT_NAMES,
    EchoEncoder,
    EncodedRow,
)
from echoembed.errors import InputError

FORMATS = (".npz", ".json")


@dataclass(frozen=True)
class TokenizeResult:
    """What ``tokenize_file`` wrote."""

    path: Path
    template: str
    texts: int
    width: int  # the longest prompt, in tokens
    truncated: int  # rows shortened to fit the context


def artifact_encoder(
    artifact_dir: str | os.PathLike[str],
    template: str | None = None,
    max_length: int | None = None,
) -> EchoEncoder:
    """The ``EchoEncoder`` the runtime uses for ``artifact_dir`` (checksum of the tokenizer
    verified); ``max_length`` overrides the artifact's per-piece limit."""
    from echoembed.runtime.embedder import Embedder

    return Embedder.load(artifact_dir, session=False).encoder(template, max_length)


def write_tokens(
    encoder: EchoEncoder,
    texts: Sequence[str],
    output: str | os.PathLike[str],
    variables: Mapping[str, str] | None = None,
) -> TokenizeResult:
    """Encode ``texts`` and write them to ``output`` (.npz padded, .json per text)."""
    out = _check_output(output)
    rows: list[EncodedRow] = encoder.encode_ids(texts, variables)
    name = encoder.config.template.name
    if out.suffix == ".npz":
        batch = encoder.pad(rows)
        buf = io.BytesIO()
        np.savez(buf, **batch.feed(), truncated=batch.truncated)
        atomic_write(out, buf.getvalue())
    else:
        doc = {
            "template": name,
            "pad_id": encoder.pad_id,
            "inputs": list(INPUT_NAMES),
            "rows": [{"ids": r.ids, "pool": r.pool_flags, "truncated": r.truncated} for r in rows],
        }
        atomic_write(out, json.dumps(doc, separators=(",", ":")) + "\n")
    return TokenizeResult(
        path=out,
        template=name,
        texts=len(rows),
        width=max(len(r.ids) for r in rows),
        truncated=sum(r.truncated for r in rows),
    )


def _check_output(output: str | os.PathLike[str]) -> Path:
    out = Path(output)
    if out.suffix not in FORMATS:
        raise InputError(f"output {out} must end in .npz or .json (got {out.suffix or 'none'!r})")
    return out


def tokenize_file(
    artifact_dir: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    template: str | None = None,
    max_length: int | None = None,
) -> TokenizeResult:
    """``echoembed tokenize``: texts (one per line) -> model inputs at ``output``."""
    from echoembed.textio import read_texts

    _check_output(output)
    texts = read_texts(input_path)
    return write_tokens(artifact_encoder(artifact_dir, template, max_length), texts, output)
