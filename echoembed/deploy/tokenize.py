"""`echoembed tokenize`: an artifact's model inputs for texts, for services with their own runtime.

The ids come from the same ``EchoEncoder`` the runtime ``Embedder`` builds for the artifact (its
tokenizer, template, ``max_length`` and context), so feeding them to the artifact's graph gives
``Embedder.encode``'s embeddings. Two output forms, each written atomically:

- ``.npz``: ``input_ids``, ``attention_mask``, ``pool_mask`` (int64 [texts, longest], right-padded
  with the pad id) and ``truncated`` (bool [texts]), rows in input order (plus ``prefix_ids``,
  int64 [P], for a prefix-reuse artifact);
- ``.json``: per text its unpadded ``ids``, ``pool`` flags and ``truncated``, plus the template,
  the pad id, the graph's input names and ``prefix_ids`` (``[]`` for most artifacts).

The output is always what the graph takes. For a prefix-reuse artifact (``manifest.prefix``,
format 5) that is each prompt *without* the baked prefix (``echo.strip_prefix``): the whole prompt,
as ``examples/cpp``'s ``--ids`` or ``EchoEncoder.encode_ids`` give it, is ``prefix_ids + ids``.

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
    strip_prefix,
)
from echoembed.errors import InputError

FORMATS = (".npz", ".json")


@dataclass(frozen=True)
class TokenizeResult:
    """What ``tokenize_file`` wrote."""

    path: Path
    template: str
    texts: int
    width: int  # the longest row written, in tokens (without the prefix, if one was stripped)
    truncated: int  # rows shortened to fit the context
    prefix: int = 0  # leading tokens stripped from every row (a prefix-reuse artifact's)


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
    prefix_ids: Sequence[int] = (),
) -> TokenizeResult:
    """Encode ``texts`` and write them to ``output`` (.npz padded, .json per text);
    ``prefix_ids``: the prefix baked into the artifact's graph (``Manifest.prefix_ids``), checked
    and dropped from every row (``InputError`` when a row does not start with it)."""
    out = _check_output(output)
    prefix = [int(i) for i in prefix_ids]
    rows: list[EncodedRow] = encoder.encode_ids(texts, variables)
    batch = strip_prefix(encoder.pad(rows), prefix)  # the check, for both forms
    name = encoder.config.template.name
    p = len(prefix)
    if out.suffix == ".npz":
        extra = {"prefix_ids": np.asarray(prefix, dtype=np.int64)} if prefix else {}
        buf = io.BytesIO()
        np.savez(buf, **batch.feed(), truncated=batch.truncated, **extra)
        atomic_write(out, buf.getvalue())
    else:
        doc = {
            "template": name,
            "pad_id": encoder.pad_id,
            "inputs": list(INPUT_NAMES),
            "prefix_ids": prefix,
            "rows": [
                {"ids": r.ids[p:], "pool": r.pool_flags[p:], "truncated": r.truncated} for r in rows
            ],
        }
        atomic_write(out, json.dumps(doc, separators=(",", ":")) + "\n")
    return TokenizeResult(
        path=out,
        template=name,
        texts=len(rows),
        width=max(len(r.ids) for r in rows) - p,
        truncated=sum(r.truncated for r in rows),
        prefix=p,
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
    """``echoembed tokenize``: texts (one per line) -> model inputs at ``output`` (for a
    prefix-reuse artifact, without its baked prefix: what its graph takes)."""
    from echoembed.runtime.embedder import Embedder
    from echoembed.textio import read_texts

    _check_output(output)
    texts = read_texts(input_path)
    embedder = Embedder.load(artifact_dir, session=False)
    encoder = embedder.encoder(template, max_length)
    return write_tokens(encoder, texts, output, prefix_ids=embedder.manifest.prefix_ids)
