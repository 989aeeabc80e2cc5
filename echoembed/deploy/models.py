"""What the Triton Python models do, without Triton: request arrays in, arrays out.

``TextModel`` is the logic of ``echo_tokenizer`` (texts + templates -> ``EncodedBatch``) and
``EncoderModel`` the logic of ``echo_encoder`` (model inputs of many requests -> one ONNX Runtime
batch -> L2-normalized embeddings per request). Both reuse the runtime's ``Embedder`` (template
resolution, ``EchoEncoder``, padding, the ORT runner), so a served embedding is the one
``Embedder.encode`` returns. A request the caller can fix raises ``UserError``; the ``model.py``
wrappers in ``triton_models/`` turn it into that request's own INVALID_ARG response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.echo import (
    PRESETS,
    EncodedBatch,
    EncodedRow,
    l2_normalize,
    strip_prefix,
    validate_texts,
)
from echoembed.errors import InputError, TemplateError
from echoembed.runtime.embedder import Embedder

ARTIFACT_SUBDIR = "artifact"  # where a model's version directory keeps its artifact files


def model_artifact_dir(args: dict) -> Path:
    """The artifact copy inside a Triton model's version directory (from ``initialize`` args)."""
    return Path(args["model_repository"]) / str(args["model_version"]) / ARTIFACT_SUBDIR


def model_parameters(config: dict) -> dict[str, str]:
    """A Triton model config's ``parameters`` as plain strings."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class TextLimits:
    """What ``echo_tokenizer`` accepts per text."""

    max_text_bytes: int = 131072  # UTF-8 bytes per text (the prompt is truncated to the context)
    custom_templates: bool = False  # accept template strings, not only the artifact's names


def _decode(value: object, row: int, what: str, limit: int | None) -> str:
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
    elif isinstance(value, (bytes, np.bytes_)):
        data = bytes(value)
    else:
        raise InputError(f"{what}[{row}] is {type(value).__name__}; send it as BYTES (UTF-8)")
    if limit is not None and len(data) > limit:
        raise InputError(
            f"{what}[{row}] is {len(data)} bytes, over this server's limit of {limit} bytes per "
            "text; split or shorten it"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what}[{row}] is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r}); "
            "send the text encoded as UTF-8"
        ) from e


def _rows_of(array: np.ndarray, what: str) -> list[object]:
    a = np.asarray(array, dtype=object)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.size == 0:
        raise InputError(f"{what} must have shape [batch, 1] with batch >= 1, got {a.shape}")
    return list(a)


class TextModel:
    """``echo_tokenizer``: texts (and per-row templates) -> right-padded model inputs."""

    def __init__(self, artifact_dir: str | Path, limits: TextLimits = TextLimits()):
        # The tokenizer and templates only (tokenizer.json's checksum verified), no session.
        self._embedder = Embedder.load(artifact_dir, session=False)
        manifest = self._embedder.manifest
        self._names = sorted({t.name for t in manifest.templates} | set(PRESETS))
        self.limits = limits
        self._embedder.encoder(None)  # bind the default template now: fail at load, not later

    @property
    def manifest(self):
        return self._embedder.manifest

    def _template_name(self, value: object, row: int) -> str | None:
        name = _decode(value, row, "templates", self.limits.max_text_bytes)
        if name == "":
            return None  # the artifact's default template
        if name in self._names or (self.limits.custom_templates and "{" in name):
            return name
        raise TemplateError(
            f"templates[{row}] is {name[:80]!r}, not a template this server knows; choose one of "
            f"{self._names} (or send an empty string for the default, "
            f"{self.manifest.default_template!r})"
        )

    def encode(self, text: np.ndarray, template: np.ndarray | None = None) -> EncodedBatch:
        """One request: ``text`` [batch, 1] bytes, optional ``template`` [batch, 1] bytes."""
        limit = self.limits.max_text_bytes
        texts = validate_texts(
            [_decode(v, i, "texts", limit) for i, v in enumerate(_rows_of(text, "text"))]
        )
        names: list[str | None] = [None] * len(texts)
        if template is not None:
            values = _rows_of(template, "template")
            if len(values) != len(texts):
                raise InputError(
                    f"template has {len(values)} rows but text has {len(texts)}; send one "
                    "template per text"
                )
            names = [self._template_name(v, i) for i, v in enumerate(values)]
        rows: list[EncodedRow | None] = [None] * len(texts)
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            encoded = self._embedder.encoder(name).encode_ids([texts[i] for i in idx])
            for i, r in zip(idx, encoded, strict=True):
                rows[i] = r
        return self._embedder.encoder(None).pad(rows)  # type: ignore[arg-type]


class EncoderModel:
    """``echo_encoder``: model inputs of several requests -> one ORT batch -> embeddings."""

    def __init__(self, artifact_dir: str | Path, threads: int | None = None):
        self.embedder = Embedder.load(artifact_dir, threads=threads)
        self.vocab_size = int(self.embedder.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def hidden_size(self) -> int:
        return self.embedder.hidden_size

    def rows(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray
    ) -> list[EncodedRow]:
        """Check one request's right-padded [batch, seq] inputs; its rows, unpadded."""
        ids = np.asarray(input_ids)
        att = np.asarray(attention_mask)
        pm = np.asarray(pool_mask)
        if ids.ndim != 2 or att.shape != ids.shape or pm.shape != ids.shape or ids.size == 0:
            raise InputError(
                "input_ids, attention_mask and pool_mask must share one non-empty [batch, seq] "
                f"shape; got {ids.shape}, {att.shape}, {pm.shape}"
            )
        out = []
        for b in range(ids.shape[0]):
            n = int((att[b] != 0).sum())
            if n == 0 or np.any(att[b, :n] != 1) or np.any(att[b, n:] != 0):
                raise InputError(
                    f"attention_mask row {b} must be ones followed by zeros (right padding) with "
                    "at least one token"
                )
            if np.any((pm[b] != 0) & (pm[b] != 1)) or np.any(pm[b, n:] != 0) or not pm[b].any():
                raise InputError(
                    f"pool_mask row {b} must be 0/1, inside the attention mask, with at least one "
                    "pooled token"
                )
            row_ids = ids[b, :n]
            if row_ids.min() < 0 or row_ids.max() >= self.vocab_size:
                raise InputError(
                    f"input_ids row {b} has ids outside the vocabulary [0, {self.vocab_size})"
                )
            out.append(EncodedRow(row_ids.tolist(), pm[b, :n].tolist(), False))
        prefix = self.embedder.manifest.prefix_ids
        if prefix:  # a baked prefix: refuse this request alone, not the batch it would join
            strip_prefix(self.embedder.encoder(None).pad(out), prefix)
        return out

    def embed(self, requests: Sequence[Sequence[EncodedRow]]) -> list[np.ndarray]:
        """Pad every request's rows into ONE batch, run it, split: float32 [rows_i, hidden]."""
        flat = [r for req in requests for r in req]
        batch = self.embedder.encoder(None).pad(flat)
        emb = l2_normalize(np.asarray(self.embedder.runner.encode(batch), dtype=np.float32))
        out, start = [], 0
        for req in requests:
            out.append(emb[start : start + len(req)])
            start += len(req)
        return out
