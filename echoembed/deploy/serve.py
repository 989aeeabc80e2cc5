"""Run a model repository on the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel.

That wheel carries a real Triton (Python backend and ensembles only) but four things must be
arranged before it serves echoembed's Python models, and ``TritonServer`` does them:

1. a backend directory whose ``python/`` holds ``libtriton_python.so``, the backend utils and the
   Python-backend stub built for *this* interpreter's version (symlinks in a temporary dir);
2. the stub must run in this environment (where echoembed is installed): its ``bin`` goes first
   on ``PATH``;
3. the stub may load another build of libpython than this interpreter's: this interpreter's own
   ``LIBDIR`` goes first on ``LD_LIBRARY_PATH``;
4. the stub is built against NumPy 1.x (its pybind11 reads NumPy's array descriptors with the
   1.x layout): under NumPy 2 every tensor it hands to a model is corrupted (each element reads
   as the first one; BYTES inputs crash the stub) and every output comes back empty. The stub
   runs Python isolated (no PYTHONPATH), so where this environment has NumPy 2 the server gets a
   throwaway virtual environment whose site directory puts a NumPy-1.26-only directory
   (``stub_site``, by default ``<sys.prefix>/triton-stub-site``, made once with
   ``pip install --no-deps --target DIR numpy==1.26.4``) before this environment's
   site-packages: echoembed, onnxruntime and tokenizers still come from here and run unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from echoembed.errors import BackendError, DeployError, MissingDependencyError

PYTRITON = "nvidia-pytriton==0.7.0"
INSTALL_HINT = f"pip install --no-deps {PYTRITON}"
STUB_NUMPY = "numpy==1.26.4"
STUB_SITE = "triton-stub-site"
SHM_DIR = Path("/dev/shm")
# Every endpoint binds to loopback only; expose a server through a reverse proxy of your own.
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """How to run ``tritonserver`` on a model repository."""

    repo: Path  # a model repository (`echoembed triton`)
    http_port: int | None = None  # None: a free port
    grpc_port: int | None = None
    metrics_port: int | None = None
    start_timeout_s: float = 120.0  # process start -> /v2/health/ready
    stop_timeout_s: float = 15.0  # SIGTERM -> exit, then SIGKILL
    log_file: Path | None = None  # None: a temporary file, removed at stop
    log_verbose: int = 0
    stub_site: Path | None = None  # NumPy 1.x for the stub (None: <sys.prefix>/triton-stub-site)


@dataclass(frozen=True)
class TritonInstall:
    """Where the pytriton wheel keeps its server."""

    root: Path  # .../pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_tritonserver() -> TritonInstall:
    """The tritonserver inside the installed pytriton wheel (found without importing pytriton,
    whose own dependencies ``--no-deps`` leaves out), or MissingDependencyError."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except ImportError:
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    install = next(
        (TritonInstall(Path(p) / "tritonserver") for p in locations),
        None,
    )
    if install is None or not install.binary.is_file():
        raise MissingDependencyError(
            f"tritonserver is not installed (it ships in the {PYTRITON} wheel); install it "
            f"with: {INSTALL_HINT}"
        )
    if not install.stub().is_file():
        raise MissingDependencyError(
            f"{PYTRITON} has no Python-backend stub for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} ({install.stub()}); run echoembed "
            "on Python 3.8-3.13"
        )
    return install


def _major(version: str) -> int:
    return int(version.split(".")[0])


def stub_site(configured: Path | None = None) -> Path | None:
    """The NumPy-1.x directory the stub needs, or None when this environment's NumPy is 1.x;
    MissingDependencyError (with the one command that makes it) when it is missing."""
    import numpy

    if _major(numpy.__version__) < 2:
        return None
    site = Path(configured) if configured is not None else Path(sys.prefix) / STUB_SITE
    found = sorted(site.glob("numpy-*.dist-info")) if site.is_dir() else []
    versions = [d.name[len("numpy-") : -len(".dist-info")] for d in found]
    if not (site / "numpy").is_dir() or not versions or _major(versions[-1]) >= 2:
        raise MissingDependencyError(
            f"the tritonserver Python-backend stub of {PYTRITON} needs NumPy 1.x but this "
            f"environment has NumPy {numpy.__version__}; install NumPy 1.26 for the stub only "
            f"with: pip install --no-deps --target {site} {STUB_NUMPY}"
        )
    return site.resolve()


def _stub_env(work: Path, site: Path | None) -> Path:
    """The ``bin`` directory to put first on the server's PATH: this environment's own, or a
    throwaway venv whose site directory reads ``site`` first, then this environment's."""
    if site is None:
        return Path(sys.prefix) / "bin"
    import site as site_module
    import venv

    env = work / "stub-env"
    venv.create(env, with_pip=False, symlinks=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    lines = [str(site)]
    lines += [f"import site; site.addsitedir({p!r})" for p in site_module.getsitepackages()]
    (env / "lib" / version / "site-packages" / "echoembed-triton-stub.pth").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )
    return env / "bin"


def free_port() -> int:
    """A port nothing listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (SO_REUSEADDR, as servers bind: a socket
    left in TIME_WAIT by a closed connection does not count, a listening one does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ports(config: ServeConfig) -> tuple[int, int, int]:
    wanted = (config.http_port, config.grpc_port, config.metrics_port)
    for name, port in zip(("http", "grpc", "metrics"), wanted, strict=True):
        if port is not None and not (0 < port < 65536):
            raise DeployError(f"--{name}-port must be in 1..65535, got {port}")
        if port is not None and not port_is_free(port):
            raise DeployError(
                f"{name} port {port} on {LOOPBACK} is in use; choose another or omit it "
                "for a free one"
            )
    taken = [p for p in wanted if p is not None]
    if len(set(taken)) != len(taken):
        raise DeployError(f"the http, grpc and metrics ports must differ, got {wanted}")
    out: list[int] = []
    for port in wanted:
        if port is None:
            port = free_port()
            while port in taken or port in out:
                port = free_port()
        out.append(port)
    return out[0], out[1], out[2]


def _check_repo(repo: Path) -> None:
    if not repo.is_dir():
        raise DeployError(f"{repo} is not a directory; write one with `echoembed triton`")
    if not any((p / "config.pbtxt").is_file() for p in repo.iterdir() if p.is_dir()):
        raise DeployError(
            f"{repo} holds no model (no */config.pbtxt); write one with `echoembed triton`"
        )


class TritonServer:
    """A ``tritonserver`` process on a model repository; a context manager (start/stop)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._workdir: Path | None = None
        self._log: Path | None = None
        self._shm_prefix = f"echoembed_triton_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def shm_files(self) -> list[Path]:
        """This server's Python-backend shared-memory regions in /dev/shm."""
        return sorted(SHM_DIR.glob(f"{self._shm_prefix}*")) if SHM_DIR.is_dir() else []

    def log_tail(self, lines: int = 40) -> str:
        if self._log is None or not self._log.is_file():
            return ""
        text = self._log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _command(self, install: TritonInstall, backends: Path) -> list[str]:
        c = self.config
        return [
            str(install.binary),
            f"--model-repository={Path(c.repo).resolve()}",
            f"--backend-directory={backends}",
            "--disable-auto-complete-config",
            "--http-address=127.0.0.1",  # loopback only (LOOPBACK)
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",  # loopback only (LOOPBACK)
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",  # loopback only (LOOPBACK)
            f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--exit-timeout-secs={max(1, int(c.stop_timeout_s) - 2)}",
            f"--log-verbose={c.log_verbose}",
        ]

    def _environment(self, bindir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env

    def _backend_dir(self, install: TritonInstall, work: Path) -> Path:
        python = work / "backends" / "python"
        python.mkdir(parents=True)
        for src in (
            install.python_backend / "libtriton_python.so",
            install.python_backend / "triton_python_backend_utils.py",
            install.stub(),
        ):
            (python / src.name).symlink_to(src)
        return work / "backends"

    def start(self) -> TritonServer:
        """Start and wait until ready (``start_timeout_s``); BackendError with the log tail when
        the server dies or never gets ready."""
        if self.process is not None:
            raise DeployError("this server is already started")
        c = self.config
        _check_repo(Path(c.repo))
        install = find_tritonserver()
        site = stub_site(c.stub_site)
        self.http_port, self.grpc_port, self.metrics_port = _ports(c)
        self._workdir = Path(tempfile.mkdtemp(prefix="echoembed-triton-"))
        self._log = Path(c.log_file) if c.log_file is not None else self._workdir / "server.log"
        self._log.parent.mkdir(parents=True, exist_ok=True)
        command = self._command(install, self._backend_dir(install, self._workdir))
        bindir = _stub_env(self._workdir, site)
        with open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(bindir),
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        url = f"http://{LOOPBACK}:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        proc = self.process
        while proc is not None and time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise BackendError(
                    f"tritonserver exited with status {code} while starting on {self.config.repo}"
                    f"; the end of its log:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise BackendError(
            f"tritonserver was not ready after {self.config.start_timeout_s:.0f} s on "
            f"{self.config.repo}; the end of its log:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM by PID, SIGKILL (its process group) after ``stop_timeout_s``; remove this
        server's shared-memory files and its temporary directory. Returns the exit status."""
        code = None
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.config.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            code = proc.returncode
            # The stubs are the server's children in its own session: none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.process = None
        for f in self.shm_files():
            f.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def wait(self) -> int:
        """Block until the server exits on its own; BackendError with the log tail then."""
        if self.process is None:
            raise DeployError("this server is not started")
        code = self.process.wait()
        raise BackendError(
            f"tritonserver exited with status {code}; the end of its log:\n{self.log_tail()}"
        )

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: ServeConfig, on_ready: Callable[[TritonServer], None]) -> int:
    """Run until Ctrl-C or SIGTERM (then stop cleanly and return 0); ``on_ready`` is called once
    the server is ready. A server that dies on its own raises BackendError."""

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    server = TritonServer(config)
    try:
        server.start()
        on_ready(server)
        server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
