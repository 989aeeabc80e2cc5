"""Peers for ``echoembed bench``: pipelines a user would otherwise pick, run in their own venv.

The optimum-onnx peer (``ORTModelForFeatureExtraction`` exported from the same model, echo
pooling in numpy) needs transformers < 4.58, so it runs in ``.venv-peers`` (``make
bench-peers``) as a subprocess, ``python -m echoembed.validation.optimum_worker`` (shipped in the
package, so no checkout is needed; the peer venv must have echoembed installed), spoken to over
JSON lines (the protocol is described there). This module is torch-free (numpy + stdlib) and
never imports the worker; ``prepare_optimum_peer`` imports the reference (torch) lazily::

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
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echoembed.artifact import atomic_write
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
STDERR_JOIN_S = 10.0  # how long an error waits for the worker's stderr to reach EOF
WORKER_MODULE = "echoembed.validation.optimum_worker"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """How to start a peer worker: ``python -m module``, or ``python script`` when ``script`` is
    set (a stand-in worker). A relative ``python`` or ``script`` is looked up in the working
    directory, then in the echoembed checkout this module comes from (``make bench-peers``
    creates ``.venv-peers`` there)."""

    python: Path = Path(".venv-peers/bin/python")
    module: str = WORKER_MODULE
    script: Path | None = None
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
        [row] = encoder.encode_ids([text], variables)
        checks.append(
            {"text": text, "variables": variables, "ids": row.ids, "pool": row.pool_flags}
        )
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
        # Scratch space for reply files: the worker writes each one atomically, we read and
        # delete it; nothing here is renamed into place by the client.
        self._tmpdir = tempfile.TemporaryDirectory(prefix="echoembed-peer-")
        self._tmp = Path(self._tmpdir.name)
        self._replies = 0
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
        peer = cls.launch(config)
        try:
            peer.wait_ready(config.start_timeout_s)
        except BaseException:
            peer.close(timeout=2.0)
            raise
        return peer

    @classmethod
    def launch(cls, config: PeerConfig) -> OptimumPeer:
        """Start the worker process without waiting for it; ``wait_ready`` comes next."""
        python = _locate(config.python)
        if not python.exists():
            raise MissingDependencyError(
                f"the optimum-onnx peer needs its own virtual environment ({python} is missing; "
                "optimum-onnx 0.1.0 needs transformers < 4.58): run `make bench-peers` in the "
                "echoembed repository"
            )
        if config.script is not None:
            script = _locate(config.script)
            if not script.is_file():
                raise MissingDependencyError(
                    f"the peer worker script {script} is missing: pass an existing "
                    f"PeerConfig(script=...), or leave it unset to run -m {config.module}"
                )
            worker = [str(script)]
        else:
            worker = ["-m", config.module]
        cmd = [
            str(python),
            *worker,
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
        log.info("starting peer: %s %s", python, " ".join(worker))
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
        return cls(config, process)

    def wait_ready(self, timeout_s: float | None) -> dict[str, Any]:
        """Wait up to ``timeout_s`` for the ready line (stopping the worker if it does not
        come); returns the worker's info (name, versions, ...), also kept in ``info``."""
        try:
            ready = self._reply(timeout_s, waiting_for="its ready line")
        except BackendError as e:
            exited = self.process.poll() is not None and self.process.returncode > 0
            if exited and any("No module named" in line for line in self.stderr_lines):
                raise MissingDependencyError(
                    f"{e}\nThe peer venv lacks a module the worker needs: run `make "
                    "bench-peers` in the echoembed repository (it installs echoembed and "
                    "optimum-onnx there)"
                ) from e
            raise
        if ready.get("ready") is not True:
            raise BackendError(f"the peer worker's first line is not 'ready': {ready}")
        ready.pop("ready")
        self.info = ready
        log.info("peer ready: %s", ready.get("name"))
        return dict(ready)

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

    @property
    def stderr_lines(self) -> list[str]:
        """The worker's stderr lines read so far (the last ``STDERR_LINES``)."""
        return list(self._stderr)

    @property
    def worker(self) -> str:
        """What runs the worker, for messages: its script or ``-m module``."""
        return str(self.config.script) if self.config.script else f"-m {self.config.module}"

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
            self._replies += 1
            out = self._tmp / f"reply-{self._replies}.npy"  # a private dir: no name clash
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
        # The worker has exited or been killed, so its stderr reaches EOF now; the bound only
        # matters when a grandchild still holds the pipe open.
        self._stderr_thread.join(timeout=STDERR_JOIN_S)
        tail = list(self._stderr)[-lines:]
        return ("\nworker stderr (last lines):\n" + "\n".join(tail)) if tail else ""

    def _died(self, when: str) -> BackendError:
        try:
            code = self.process.wait(timeout=30.0)  # it closed stdout, so it is exiting
        except subprocess.TimeoutExpired:
            self._kill()
            code = self.process.returncode
        return BackendError(
            f"the {self.name} worker ({self.worker}) exited with code {code} {when}."
            f"{self._stderr_tail()}"
        )

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60.0)  # SIGKILL: returns as soon as it is gone

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
        self._tmpdir.cleanup()
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
        atomic_write(stamp, json.dumps(wanted, indent=2) + "\n")
    encoder = reference.encoder(template, max_length)
    return PeerConfig(
        hf_dir=hf_dir,
        onnx_dir=work / "optimum-onnx",
        encoder_json=encoder_to_json(encoder, pooling),
        threads=threads,
        start_timeout_s=start_timeout_s,
    )
