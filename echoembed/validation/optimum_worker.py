"""The optimum-onnx peer of ``echoembed bench``: a worker run by ``.venv-peers/bin/python``.

Run as ``python -m echoembed.validation.optimum_worker --hf-dir ... --onnx-dir ... --encoder ...``
by the peer venv's interpreter (``OptimumPeer.start`` does), so it ships inside the package and
needs no echoembed checkout. ``echoembed.validation`` never imports it (it needs optimum).

optimum-onnx 0.1.0 needs transformers < 4.58 while echoembed runs on transformers 5, so this
pipeline (what a user would otherwise pick: ``ORTModelForFeatureExtraction`` exported from the
same model, echo pooling in numpy) lives in its own venv (``make bench-peers``) and is driven by
``echoembed.validation.peers.OptimumPeer`` over JSON lines:

    worker -> {"ready": true, "name": "optimum-onnx fp32", "versions": {...},
               "export_seconds": float | null, "inputs": [...]}
    client -> {"op": "embed", "texts": [...], "batch_size": 32, "out": "x.npy" | null,
               "variables": {...} | null}
    worker -> {"ok": true, "n": int, "seconds": float}     (float32 [n, hidden] written to out)
           |  {"ok": false, "error": "..."}
    client -> {"op": "quit"}                                (exit 0; so does EOF on stdin)

stdout carries the protocol only: the real stdout is kept for it and fd 1 is pointed at stderr,
so whatever the libraries print lands in the log. The echo inputs are built by
``echoembed.echo`` from ``--encoder`` (JSON written by the client from its own ``EchoEncoder``),
with ``tokenizer.json`` of ``--hf-dir``, and batched by ``echoembed.echo.embed_texts`` exactly
as echoembed batches (length-sorted, ``batch_size``). Only stdlib, numpy, ``echoembed.echo`` and
``echoembed.artifact`` (its atomic writers; stdlib + numpy) are imported at module level, so the
protocol can be tested without optimum, and ``make bench-peers`` can install echoembed with
``--no-deps`` into the peer venv.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from echoembed.artifact import atomic_save_npy, staged_dir
from echoembed.echo import (
    EchoEncoder,
    EncodedBatch,
    EncoderConfig,
    Pooling,
    SpecialTokens,
    Template,
    embed_texts,
    pool,
)

log = logging.getLogger("optimum_worker")

NAME = "optimum-onnx fp32"
ENCODER_FORMAT = 1
EXPORT_STAMP = "echoembed-peer.json"
VERSION_PACKAGES = (
    "optimum-onnx",
    "optimum",
    "transformers",
    "onnxruntime",
    "onnx",
    "torch",
    "tokenizers",
    "numpy",
    "echoembed",
)


class EncoderCheckError(RuntimeError):
    """The peer's tokenization of a probe text differs from the client's."""


# ---------------------------------------------------------------------------------------------
# echo inputs, exactly as the client builds them


def encoder_from_json(tokenizer, spec: str | Mapping[str, Any]) -> tuple[EchoEncoder, Pooling]:
    """Rebuild the client's ``EchoEncoder`` (and pooling) from ``encoder_to_json``'s output.

    Every ``checks`` entry (a probe text with the client's ids and pool flags) is re-encoded here
    and must match exactly, so a tokenizer difference between the two venvs fails at start.
    """
    data = json.loads(spec) if isinstance(spec, str) else dict(spec)
    if data.get("format") != ENCODER_FORMAT:
        raise ValueError(
            f"encoder JSON format {data.get('format')!r}; this worker reads {ENCODER_FORMAT}"
        )
    tpl = data["template"]
    template = Template(tpl["source"], name=tpl.get("name", "custom"), defaults=tpl["defaults"])
    config = EncoderConfig(
        template,
        max_length=data.get("max_length"),
        context_length=data.get("context_length"),
        overflow=data.get("overflow", "truncate"),
    )
    encoder = EchoEncoder(tokenizer, SpecialTokens(**data["special"]), config)
    for check in data.get("checks", []):
        [row] = encoder.encode_ids([check["text"]], check.get("variables"))
        if row.ids != check["ids"] or row.pool_flags != check["pool"]:
            raise EncoderCheckError(
                f"the peer tokenizes {check['text']!r} differently from echoembed: ids {row.ids} "
                f"vs {check['ids']}, pool flags {row.pool_flags} vs {check['pool']} (tokenizers "
                f"{_version('tokenizers')} here)"
            )
    return encoder, Pooling.parse(data.get("pooling", "mean"))


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 of the real tokens of each row (pads get 1), as HF generate builds them.

    echoembed right-pads (``EchoEncoder.pad``), so on real tokens this equals ``arange(seq)``:
    the positions the PyTorch reference uses when it is given no position_ids.
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos


class OptimumRunner:
    """echoembed runner over an optimum model: last_hidden_state, then ``echo.pool``."""

    def __init__(self, model: Callable[..., Any], input_names: Sequence[str], pooling="mean"):
        self.model = model
        self.input_names = tuple(input_names)
        self.pooling = Pooling.parse(pooling)

    def hidden_states(self, batch: EncodedBatch) -> np.ndarray:
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "position_ids" in self.input_names:
            feed["position_ids"] = position_ids(batch.attention_mask)
        out = self.model(**feed)
        return np.asarray(out.last_hidden_state, dtype=np.float32)

    def encode(self, batch: EncodedBatch) -> np.ndarray:
        return pool(self.hidden_states(batch), batch.pool_mask, self.pooling)


# ---------------------------------------------------------------------------------------------
# the protocol


def claim_stdout() -> IO[str]:
    """Keep the real stdout for the protocol and send fd 1 (and ``sys.stdout``) to stderr."""
    proto = open(os.dup(1), "w", encoding="utf-8", buffering=1)  # noqa: SIM115
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def send(out: IO[str], message: Mapping[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def handle(request: Mapping[str, Any], runner, encoder: EchoEncoder) -> dict[str, Any]:
    """One ``embed`` request -> its reply (exceptions propagate to ``serve``)."""
    texts = request["texts"]
    batch_size = request.get("batch_size", 32)
    t0 = time.perf_counter()
    emb = embed_texts(
        runner,
        encoder,
        texts,
        batch_size=batch_size,
        variables=request.get("variables"),
        show_progress=False,
    )
    seconds = time.perf_counter() - t0
    if request.get("out"):
        atomic_save_npy(Path(request["out"]), np.ascontiguousarray(emb, dtype=np.float32))
    return {"ok": True, "n": int(emb.shape[0]), "seconds": seconds}


def serve(
    runner,
    encoder: EchoEncoder,
    ready: Mapping[str, Any],
    inp: IO[str] | None = None,
    out: IO[str] | None = None,
) -> int:
    """Announce ``ready``, then answer request lines until ``quit`` or EOF; returns 0."""
    inp = inp if inp is not None else io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
    out = out if out is not None else sys.stdout
    send(out, {"ready": True, **ready})
    for line in inp:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError(f"a request must be a JSON object, got {type(request).__name__}")
            op = request.get("op")
            if op == "quit":
                log.info("quit")
                return 0
            if op != "embed":
                raise ValueError(f"unknown op {op!r}; expected 'embed' or 'quit'")
            reply = handle(request, runner, encoder)
            log.info("embedded %d texts in %.3f s", reply["n"], reply["seconds"])
        except Exception as e:  # every failure becomes an error reply; the worker lives on
            log.error("request failed:\n%s", traceback.format_exc())
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        send(out, reply)
    log.info("stdin closed")
    return 0


# ---------------------------------------------------------------------------------------------
# optimum: export (cached), load


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {d: _version(d) for d in VERSION_PACKAGES}


def _fingerprint(hf_dir: Path) -> dict[str, Any]:
    """What the export depends on: the HF directory's files and the exporter's versions."""
    files = {}
    for p in sorted(hf_dir.iterdir()):
        if not p.is_file():
            continue
        st = p.stat()
        if p.suffix == ".json":
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            files[p.name] = [st.st_size, st.st_mtime_ns]
    keep = ("optimum-onnx", "optimum", "transformers", "torch", "onnx")
    return {
        "format": 1,
        "hf_dir": str(hf_dir.resolve()),
        "files": files,
        "versions": {d: _version(d) for d in keep},
    }


def export_if_needed(hf_dir: Path, onnx_dir: Path) -> float | None:
    """Export ``hf_dir`` with optimum into ``onnx_dir`` (atomically) unless a matching export
    is already there; returns the export's seconds, or None when reused."""
    fingerprint = _fingerprint(hf_dir)
    stamp = onnx_dir / EXPORT_STAMP
    if stamp.is_file() and (onnx_dir / "model.onnx").is_file():
        try:
            if json.loads(stamp.read_text()) == fingerprint:
                log.info("reusing the optimum export in %s", onnx_dir)
                return None
        except ValueError:
            pass
        log.info("%s was exported from something else: exporting again", onnx_dir)
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    # A stale export is replaced (force=True) only once the new one is complete.
    with staged_dir(onnx_dir, force=True) as stage:
        log.info("exporting %s with optimum (feature-extraction) ...", hf_dir)
        t0 = time.perf_counter()
        model = ORTModelForFeatureExtraction.from_pretrained(hf_dir, export=True)
        model.save_pretrained(stage.path)
        seconds = time.perf_counter() - t0
        del model
        stamp_text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
        (stage.path / EXPORT_STAMP).write_text(stamp_text)  # inside the stage: renamed with it
    log.info("exported in %.1f s to %s", seconds, onnx_dir)
    return seconds


def load_model(onnx_dir: Path, threads: int | None):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    options = None
    if threads is not None:  # as echoembed's OrtRunner does
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ORTModelForFeatureExtraction.from_pretrained(
        onnx_dir, provider="CPUExecutionProvider", session_options=options
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", type=Path, required=True, help="from echoembed's save_hf_dir")
    ap.add_argument("--onnx-dir", type=Path, required=True, help="optimum export cache")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--encoder", required=True, help="JSON from peers.encoder_to_json")
    args = ap.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[optimum-peer] %(levelname)s %(message)s"
    )
    proto = claim_stdout()
    from tokenizers import Tokenizer

    tok_path = args.hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        log.error("%s is missing: --hf-dir must be written by echoembed's save_hf_dir", tok_path)
        return 2
    try:
        encoder, pooling = encoder_from_json(Tokenizer.from_file(str(tok_path)), args.encoder)
    except EncoderCheckError as e:
        log.error("%s", e)
        return 2
    export_seconds = export_if_needed(args.hf_dir, args.onnx_dir)
    model = load_model(args.onnx_dir, args.threads)
    inputs = [i.name for i in model.session.get_inputs()]
    log.info("graph inputs %s; pooling %s; threads %s", inputs, pooling.value, args.threads)
    runner = OptimumRunner(model, inputs, pooling)
    ready = {
        "name": NAME,
        "versions": versions(),
        "export_seconds": export_seconds,
        "inputs": inputs,
        "pooling": pooling.value,
        "threads": args.threads,
    }
    return serve(runner, encoder, ready, out=proto)


if __name__ == "__main__":
    sys.exit(main())
