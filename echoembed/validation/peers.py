"""Peers for ``echoembed bench``: pipelines a user would otherwise pick, run in their own venv.

The optimum-onnx peer (``ORTModelForFeatureExtraction`` exported from the same model, echo
pooling in numpy) needs transformers < 4.58, so it runs in ``.venv-peers`` (``make
bench-peers``) as a subprocess, ``benchmarks/peers/optimum_peer.py``, spoken to over JSON lines
(the protocol is described there). This module is torch-free (numpy + stdlib);
``prepare_optimum_peer`` imports the reference (torch) lazily::

    ref = ReferenceEmbedder.load("smollm2")
    config = prepare_optimum_peer(ref, "echo", "runs/peers", pooling="mean", threads=2)
    with OptimumPeer.start(config) as peer:
        emb = peer.embed(texts, batch_size=32)       # float32 [n, hidden], L2-normalized
        seconds = peer.timed(texts, batch_size=32)   # worker-side seconds, nothing written
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echoembed.echo import EchoEncoder, Pooling, Template, validate_texts
from echoembed.errors import (
    BackendError,
    InputError,
    InternalError,
    MissingDependencyError,
    ModelSourceError,
)

if TYPE_CHECKING:
    from echoembed.reference import ReferenceEmbedder

log = logging.getLogger(__name__)

ENCODER_FORMAT = 1  # the worker's encoder_from_json reads this format
# Probe texts whose ids and pool flags the worker must reproduce before it says ready.
PROBE_TEXTS = (
    "A man is playing a guitar.",
    "  Ünïcödé text — with  double spaces,\ttabs and an emoji 🙂 ",
)
STDERR_LINES = 200  # kept from the worker for error messages
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """How to start a peer worker. Relative paths are looked up in the working directory, then
    in the echoembed checkout this module comes from."""

    python: Path = Path(".venv-peers/bin/python")
    script: Path = Path("benchmarks/peers/optimum_peer.py")
    hf_dir: Path
    onnx_dir: Path
    encoder_json: str
    threads: int | None = None
    start_timeout_s: float = 900.0  # the first start exports the model (about 20 s for 135M)
    env: Mapping[str, str] | None = None  # extra environment for the worker


def encoder_to_json(
    encoder: EchoEncoder,
    pooling: Pooling | str = Pooling.MEAN,
    probes: Sequence[str] = PROBE_TEXTS,
    variables: Mapping[str, str] | None = None,
) -> str:
    """Everything the worker needs to build the same ``EchoEncoder`` (with its own tokenizer),
    plus probe texts encoded here that it must reproduce exactly."""
    cfg = encoder.config
    tpl: Template = cfg.template
    checks = []
    for text in probes:
        [(ids, flags, _)] = encoder.encode_ids([text], variables)
        checks.append({"text": text, "variables": variables, "ids": ids, "pool": flags})
    special = encoder.special
    return json.dumps(
        {
            "format": ENCODER_FORMAT,
            "template": {"source": tpl.source, "name": tpl.name, "defaults": dict(tpl.defaults)},
            "special": {"bos": special.bos, "eos": special.eos, "pad": special.pad},
            "max_length": cfg.max_length,
            "context_length": cfg.context_length,
            "overflow": cfg.overflow,
            "pooling": Pooling.parse(pooling).value,
            "checks": checks,
        }
    )


def _locate(path: Path) -> Path:
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    in_repo = _REPO_ROOT / path
    return in_repo if in_repo.exists() else path


class OptimumPeer:
    """A running peer worker; use as a context manager (``close`` ends it)."""

    def __init__(self, config: PeerConfig, process: subprocess.Popen):
        """Wrap a started worker process; prefer ``OptimumPeer.start``."""
        self.config = config
        self.process = process
        self.info: dict[str, Any] = {}
        self.last_seconds: float | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="echoembed-peer-"))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        threading.Thread(target=_pump, args=(process.stdout, self._lines), daemon=True).start()
        self._stderr_thread = threading.Thread(
            target=_drain, args=(process.stderr, self._stderr), daemon=True
        )
        self._stderr_thread.start()

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: PeerConfig) -> OptimumPeer:
        """Launch the worker and wait (up to ``config.start_timeout_s``) for its ready line."""
        python, script = _locate(config.python), _locate(config.script)
        if not python.exists():
            raise MissingDependencyError(
                f"the optimum-onnx peer needs its own virtual environment ({python} is missing; "
                "optimum-onnx 0.1.0 needs transformers < 4.58): run `make bench-peers` in the "
                "echoembed repository"
            )
        if not script.is_file():
            raise MissingDependencyError(
                f"the peer worker script {script} is missing: run from the echoembed repository "
                "root or pass PeerConfig(script=...)"
            )
        cmd = [
            str(python),
            str(script),
            "--hf-dir",
            str(config.hf_dir),
            "--onnx-dir",
            str(config.onnx_dir),
            "--encoder",
            config.encoder_json,
        ]
        if config.threads is not None:
            cmd += ["--threads", str(int(config.threads))]
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.update(config.env or {})
        log.info("starting peer: %s %s", python, script)
        try:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                bufsize=1,
                env=env,
            )
        except OSError as e:
            raise MissingDependencyError(
                f"cannot run {python} ({e}): run `make bench-peers` in the echoembed repository"
            ) from e
        peer = cls(config, process)
        try:
            ready = peer._reply(config.start_timeout_s, waiting_for="its ready line")
            if ready.get("ready") is not True:
                raise BackendError(f"the peer worker's first line is not 'ready': {ready}")
        except BaseException:
            peer.close(timeout=2.0)
            raise
        ready.pop("ready")
        peer.info = ready
        log.info("peer ready: %s", ready.get("name"))
        return peer

    # -- properties --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.info.get("name", "peer"))

    @property
    def versions(self) -> dict[str, str | None]:
        return dict(self.info.get("versions") or {})

    @property
    def export_seconds(self) -> float | None:
        return self.info.get("export_seconds")

    # -- requests ----------------------------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        variables: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` in the worker -> float32 [n, hidden], L2-normalized, input order.

        ``last_seconds`` is then the worker's own time for the call (tokenizing, batching,
        inference, pooling), without the transfer of the result.
        """
        with self._lock:
            self._check_open()
            fd, name = tempfile.mkstemp(suffix=".npy", dir=self._tmp)
            os.close(fd)
            out = Path(name)
            try:
                reply = self._request(texts, batch_size, variables, out, timeout_s)
                emb = np.load(out)
            finally:
                out.unlink(missing_ok=True)
        if emb.shape[0] != reply["n"]:
            raise BackendError(f"the peer wrote {emb.shape[0]} rows for {reply['n']} texts")
        return emb

    def timed(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        variables: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> float:
        """Embed ``texts`` in the worker without sending the result back; its seconds."""
        with self._lock:
            self._check_open()
            reply = self._request(texts, batch_size, variables, None, timeout_s)
        return float(reply["seconds"])

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the {self.name} peer is closed; start a new one")

    def _request(self, texts, batch_size, variables, out: Path | None, timeout_s):
        texts = validate_texts(texts)  # the same InputError as every other backend
        if not texts:
            raise InputError("nothing to encode: texts is empty")
        self._send(
            {
                "op": "embed",
                "texts": texts,
                "batch_size": batch_size,
                "variables": dict(variables) if variables else None,
                "out": str(out) if out is not None else None,
            }
        )
        reply = self._reply(timeout_s, waiting_for=f"the embeddings of {len(texts)} texts")
        if reply.get("ok") is not True:
            raise BackendError(f"{self.name} peer failed: {reply.get('error', reply)}")
        self.last_seconds = float(reply["seconds"])
        return reply

    def _stdin(self):
        if self.process.stdin is None:  # start() always opens a pipe
            raise InternalError(f"the {self.name} peer was started without a stdin pipe")
        return self.process.stdin

    def _send(self, message: Mapping[str, Any]) -> None:
        if self.process.poll() is not None:
            raise self._died("before the request")
        stdin = self._stdin()
        try:
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died("while receiving the request") from None

    def _reply(self, timeout_s: float | None, waiting_for: str) -> dict[str, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                self._kill()
                raise BackendError(
                    f"the {self.name} worker did not send {waiting_for} within {timeout_s:g} s "
                    f"(stopped it).{self._stderr_tail()}"
                ) from None
            if line is None:
                raise self._died(f"while we waited for {waiting_for}")
            text = line.strip()
            if not text.startswith("{"):
                log.debug("peer stdout (not protocol): %s", text)
                continue
            try:
                return json.loads(text)
            except ValueError:
                log.debug("peer stdout (not JSON): %s", text)

    # -- failure and shutdown ----------------------------------------------------------------
    def _stderr_tail(self, lines: int = 40) -> str:
        self._stderr_thread.join(timeout=2.0)
        tail = list(self._stderr)[-lines:]
        return ("\nworker stderr (last lines):\n" + "\n".join(tail)) if tail else ""

    def _died(self, when: str) -> BackendError:
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self.process.returncode
        return BackendError(
            f"the {self.name} worker ({self.config.script}) exited with code {code} {when}."
            f"{self._stderr_tail()}"
        )

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10.0)

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask the worker to quit (kill it after ``timeout``); returns its exit code."""
        self._closed = True
        if self.process.poll() is None:
            try:
                stdin = self._stdin()
                stdin.write(json.dumps({"op": "quit"}) + "\n")
                stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> OptimumPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pump(stream, lines: queue.Queue) -> None:
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


def _drain(stream, keep: collections.deque) -> None:
    try:
        for line in stream:
            line = line.rstrip("\n")
            keep.append(line)
            log.debug("peer: %s", line)
    except (OSError, ValueError):
        pass


def prepare_optimum_peer(
    reference: ReferenceEmbedder,
    template: Template | str,
    work_dir: str | os.PathLike[str],
    *,
    pooling: Pooling | str = Pooling.MEAN,
    max_length: int | None = None,
    threads: int | None = None,
    start_timeout_s: float = 900.0,
) -> PeerConfig:
    """Write the reference model as a HF directory for the peer (``work_dir/hf``, once) and the
    peer's config: same template, special tokens, lengths and pooling as ``reference``.

    ``save_hf_dir`` also writes the top-level rope keys, without which transformers 4 reads the
    wrong rope_theta (10000 instead of SmolLM2's 100000). The optimum export is cached in
    ``work_dir/optimum-onnx`` by the worker.
    """
    from echoembed.reference import save_hf_dir

    work = Path(work_dir)
    hf_dir = work / "hf"
    source = reference.loaded.source
    stamp = work / "hf-source.json"
    wanted = {"kind": source.kind, "name": source.name, "path": str(Path(source.path).resolve())}
    if (hf_dir / "config.json").is_file():
        if stamp.is_file() and json.loads(stamp.read_text()) != wanted:
            raise ModelSourceError(
                f"{hf_dir} holds another model ({json.loads(stamp.read_text())}); use another "
                f"work_dir or remove {work}"
            )
        log.info("reusing %s", hf_dir)
    else:
        work.mkdir(parents=True, exist_ok=True)
        save_hf_dir(reference.loaded, hf_dir)
        tmp = stamp.with_name(stamp.name + ".tmp")
        tmp.write_text(json.dumps(wanted, indent=2) + "\n")
        os.replace(tmp, stamp)
    encoder = reference.encoder(template, max_length)
    return PeerConfig(
        hf_dir=hf_dir,
        onnx_dir=work / "optimum-onnx",
        encoder_json=encoder_to_json(encoder, pooling),
        threads=threads,
        start_timeout_s=start_timeout_s,
    )
