"""The optimum-onnx peer of ``echoembed bench``: client, protocol and worker logic.

CI has no ``.venv-peers``: the client is tested against stand-in workers run by this venv's
python. The main stand-in imports the real worker module (``echoembed.validation.optimum_worker``,
shipped in the package) and serves echoembed's own runtime on a tiny artifact, so the protocol
code under test is the worker's. The test against the real optimum pipeline is ``slow`` and
needs ``make bench-peers``.

No assertion depends on how fast the machine is: every timeout below is either a bound on a hang
(never reached when the test passes) or applied only once the state it tests is reached.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import textwrap
import time
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from echoembed.errors import BackendError, InputError, MissingDependencyError, ModelSourceError
from echoembed.validation.peers import (
    PROBE_TEXTS,
    WORKER_MODULE,
    OptimumPeer,
    PeerConfig,
    encoder_to_json,
    prepare_optimum_peer,
)
from tests.helpers import STSB_DEV, run_blocked

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
HANG_GUARD_S = 600.0  # the most a stand-in may take to start or quit; a passing run takes seconds

TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an instrument on a stage in front of a small crowd.",
    "A cat.",
    "Ünïcödé — and an emoji 🙂",
    "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun for hours.",
]


@pytest.fixture(scope="module")
def worker():
    """The packaged worker module (only numpy, echoembed.echo and echoembed.artifact at import)."""
    return importlib.import_module(WORKER_MODULE)


# A stand-in worker: the real module's protocol, echoembed's runtime as the model.
STAND_IN = """
import argparse, sys
from echoembed.validation import optimum_worker as peer
ap = argparse.ArgumentParser()
ap.add_argument("--hf-dir"); ap.add_argument("--onnx-dir"); ap.add_argument("--encoder")
ap.add_argument("--threads", type=int)
args = ap.parse_args()
proto = peer.claim_stdout()
print("library noise on stdout must not break the protocol")
from echoembed.runtime import Embedder
emb = Embedder.load(args.hf_dir, threads=args.threads)
encoder, pooling = peer.encoder_from_json(emb.tokenizer, args.encoder)
ready = {"name": "stand-in runtime", "versions": peer.versions(), "export_seconds": None}
sys.exit(peer.serve(emb.runner, encoder, ready, out=proto))
"""


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _config(script: Path | None, tmp_path: Path, **kw) -> PeerConfig:
    base = dict(
        python=Path(sys.executable),
        script=script,
        hf_dir=tmp_path / "hf",
        onnx_dir=tmp_path / "onnx",
        encoder_json="{}",
        start_timeout_s=HANG_GUARD_S,
    )
    return PeerConfig(**{**base, **kw})


def _wait_for(condition: Callable[[], bool], what: str, bound_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition`` until it holds; ``bound_s`` only stops a hang."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {bound_s:g} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tiny_embedder(tiny_artifact):
    from echoembed.runtime import Embedder

    return Embedder.load(tiny_artifact.path, threads=1)


@pytest.fixture(scope="module")
def stand_in_peer(tiny_artifact, tiny_embedder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stand-in")
    script = _script(tmp, "stand_in.py", STAND_IN)
    enc = tiny_embedder.encoder()
    config = _config(
        script,
        tmp,
        hf_dir=Path(tiny_artifact.path),
        encoder_json=encoder_to_json(enc, tiny_embedder.pooling),
        threads=1,
    )
    peer = OptimumPeer.start(config)
    try:
        yield peer
    finally:
        code = peer.close(timeout=HANG_GUARD_S)
    assert code == 0  # quit -> exit 0


# ---------------------------------------------------------------------------------------------
# client <-> a worker speaking the protocol for real


def test_stand_in_embeddings_equal_the_runtime(stand_in_peer, tiny_embedder):
    assert stand_in_peer.name == "stand-in runtime"
    assert stand_in_peer.versions["numpy"] == np.__version__
    assert stand_in_peer.export_seconds is None
    for batch_size in (2, 32):
        got = stand_in_peer.embed(TEXTS, batch_size=batch_size)
        want = tiny_embedder.encode(TEXTS, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert stand_in_peer.last_seconds is not None and stand_in_peer.last_seconds > 0
    # nothing left behind in the client's temp dir
    assert list(stand_in_peer._tmp.iterdir()) == []


def test_stand_in_timed_and_row_order(stand_in_peer, tiny_embedder):
    seconds = stand_in_peer.timed(TEXTS * 3, batch_size=4)
    assert seconds > 0
    got = stand_in_peer.embed(TEXTS[::-1], batch_size=3)
    np.testing.assert_allclose(got, tiny_embedder.encode(TEXTS[::-1], batch_size=3), atol=1e-6)


def test_stand_in_error_reply_keeps_worker_alive(stand_in_peer):
    with pytest.raises(BackendError, match="batch_size"):
        stand_in_peer.embed(TEXTS, batch_size=0)
    with pytest.raises(BackendError, match="variable"):
        stand_in_peer.embed(TEXTS, variables={"nope": "x"})
    assert stand_in_peer.embed(TEXTS[:1]).shape[0] == 1  # still serving


def test_bad_texts_fail_in_the_client(stand_in_peer):
    with pytest.raises(InputError, match="empty"):
        stand_in_peer.embed(["fine", "   "])
    with pytest.raises(InputError, match="not str"):
        stand_in_peer.embed(["fine", 3])
    with pytest.raises(InputError, match="empty"):
        stand_in_peer.timed([])
    with pytest.raises(InputError, match=r"texts\[1\] cannot be encoded as UTF-8"):
        stand_in_peer.embed(["fine", "bad \ud800"])
    assert stand_in_peer.embed(["fine"]).shape[0] == 1  # the worker never saw them


def test_handle_writes_the_reply_atomically(worker, tiny_embedder, tmp_path):
    out = tmp_path / "replies" / "r.npy"
    request = {"texts": TEXTS, "batch_size": 2, "out": str(out)}
    reply = worker.handle(request, tiny_embedder.runner, tiny_embedder.encoder())
    assert reply["ok"] is True and reply["n"] == len(TEXTS)
    emb = np.load(out)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, tiny_embedder.encode(TEXTS, batch_size=2), atol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["r.npy"]  # no temporary file left


def test_serve_answers_malformed_lines(worker, tiny_embedder):
    import io

    out = io.StringIO()
    lines = ["not json\n", "[1]\n", '{"op": "dance"}\n', "\n", '{"op": "quit"}\n', "unread\n"]
    code = worker.serve(tiny_embedder.runner, tiny_embedder.encoder(), {"name": "x"}, lines, out)
    replies = [json.loads(x) for x in out.getvalue().splitlines()]
    assert code == 0
    assert replies[0] == {"ready": True, "name": "x"}
    assert [r["ok"] for r in replies[1:]] == [False, False, False]
    assert "unknown op 'dance'" in replies[3]["error"]


# ---------------------------------------------------------------------------------------------
# failures


def test_missing_peer_venv_says_make_bench_peers(tmp_path):
    config = _config(None, tmp_path, python=tmp_path / ".venv-peers" / "bin" / "python")
    with pytest.raises(MissingDependencyError, match="make bench-peers") as info:
        OptimumPeer.start(config)
    assert isinstance(info.value, ImportError)


def test_default_config_paths():
    config = PeerConfig(hf_dir=Path("h"), onnx_dir=Path("o"), encoder_json="{}")
    assert config.python == Path(".venv-peers/bin/python")
    assert config.module == WORKER_MODULE == "echoembed.validation.optimum_worker"
    assert config.script is None
    # shipped inside the package, not in the repository's benchmarks/
    spec = importlib.util.find_spec(WORKER_MODULE)
    package = Path(importlib.util.find_spec("echoembed").origin).parent
    assert Path(spec.origin) == package / "validation" / "optimum_worker.py"


def test_default_worker_runs_from_the_package_anywhere(tmp_path, monkeypatch):
    """``python -m echoembed.validation.optimum_worker`` from a directory that is no checkout:
    the real worker's main starts and rejects an --hf-dir without tokenizer.json."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "hf").mkdir()
    with pytest.raises(BackendError) as info:
        OptimumPeer.start(_config(None, tmp_path))
    msg = str(info.value)
    assert "must be written by echoembed's save_hf_dir" in msg and "code 2" in msg
    assert f"-m {WORKER_MODULE}" in msg


def test_peer_venv_without_the_worker_module_says_make_bench_peers(tmp_path):
    config = _config(None, tmp_path, module="echoembed.validation.no_such_worker")
    with pytest.raises(MissingDependencyError, match="make bench-peers") as info:
        OptimumPeer.start(config)
    assert "No module named echoembed.validation.no_such_worker" in str(info.value)


def test_missing_stand_in_script(tmp_path):
    with pytest.raises(MissingDependencyError, match="script"):
        OptimumPeer.start(_config(tmp_path / "nope.py", tmp_path))


def test_worker_crash_at_start_reports_stderr(tmp_path):
    script = _script(
        tmp_path,
        "crash.py",
        """
        import sys
        print("Traceback (most recent call last): ...", file=sys.stderr)
        print("RuntimeError: boom, the model could not be loaded", file=sys.stderr)
        sys.exit(3)
        """,
    )
    with pytest.raises(BackendError) as info:
        OptimumPeer.start(_config(script, tmp_path))
    msg = str(info.value)
    assert "boom, the model could not be loaded" in msg and "code 3" in msg


def test_worker_death_mid_request_reports_stderr(tmp_path):
    script = _script(
        tmp_path,
        "die.py",
        """
        import json, os, sys
        print(json.dumps({"ready": True, "name": "dying"}), flush=True)
        sys.stdin.readline()
        print("fatal: killed while embedding (out of memory?)", file=sys.stderr, flush=True)
        os._exit(7)
        """,
    )
    with OptimumPeer.start(_config(script, tmp_path)) as peer:
        with pytest.raises(BackendError) as info:
            peer.embed(TEXTS)
        msg = str(info.value)
        assert "out of memory" in msg and "code 7" in msg and "dying" in msg
        with pytest.raises(BackendError, match="code 7"):  # later calls fail the same way
            peer.embed(TEXTS)
    with pytest.raises(BackendError, match="closed"):
        peer.embed(TEXTS)
    assert not peer._tmp.exists()  # close removed the reply directory


def test_worker_that_never_gets_ready_is_stopped(tmp_path):
    """The start timeout is applied only after the worker's stderr line has been read, and the
    worker can never become ready, so nothing here races the machine's speed."""
    script = _script(
        tmp_path,
        "hang.py",
        """
        import sys
        print("exporting ...", file=sys.stderr, flush=True)
        sys.stdin.read()  # never ready; returns only when the client closes stdin
        """,
    )
    peer = OptimumPeer.launch(_config(script, tmp_path))
    try:
        _wait_for(lambda: "exporting ..." in peer.stderr_lines, "the worker's stderr line")
        with pytest.raises(BackendError, match=r"ready line within 0\.2 s") as info:
            peer.wait_ready(0.2)
        assert "exporting ..." in str(info.value)
        assert peer.process.returncode is not None and peer.process.returncode < 0  # killed
    finally:
        peer.close(timeout=HANG_GUARD_S)


def test_worker_first_line_not_ready(tmp_path):
    script = _script(tmp_path, "odd.py", 'import json; print(json.dumps({"hello": 1}))\n')
    with pytest.raises(BackendError, match="not 'ready'"):
        OptimumPeer.start(_config(script, tmp_path))


# ---------------------------------------------------------------------------------------------
# the worker's logic, in process


def test_encoder_json_round_trip(worker, smollm2_tokenizer):
    from echoembed.echo import EchoEncoder, EncoderConfig, get_template

    tok, special, _ = smollm2_tokenizer
    long = "word " * 60
    cases = [
        (EncoderConfig(get_template("echo")), None),
        (EncoderConfig(get_template("query"), max_length=9), {"prompt": "Find the answer"}),
        (EncoderConfig(get_template("document"), context_length=40), None),
    ]
    for cfg, variables in cases:
        enc = EchoEncoder(tok, special, cfg)
        spec = json.loads(encoder_to_json(enc, "last"))
        assert [c["text"] for c in spec["checks"]] == list(PROBE_TEXTS)
        rebuilt, pooling = worker.encoder_from_json(tok, json.dumps(spec))
        assert pooling.value == "last"
        assert rebuilt.config == enc.config and rebuilt.special == enc.special
        texts = [*TEXTS, long]
        assert rebuilt.encode_ids(texts, variables) == enc.encode_ids(texts, variables)


def test_encoder_check_catches_a_different_tokenization(worker, smollm2_tokenizer):
    from echoembed.echo import EchoEncoder, EncoderConfig, get_template

    tok, special, _ = smollm2_tokenizer
    spec = json.loads(
        encoder_to_json(EchoEncoder(tok, special, EncoderConfig(get_template("echo"))))
    )
    spec["checks"][0]["ids"][-1] += 1
    with pytest.raises(worker.EncoderCheckError, match="differently"):
        worker.encoder_from_json(tok, spec)
    spec["format"] = 99
    with pytest.raises(ValueError, match="format"):
        worker.encoder_from_json(tok, spec)


def test_position_ids_right_padding(worker):
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pos = worker.position_ids(mask)
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos[mask == 1], np.concatenate([np.arange(3), np.arange(5)]))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_optimum_runner_matches_reference(worker, tiny_llama_dir, pooling):
    """The worker's runner (explicit position_ids, numpy pooling) on the tiny model, driven
    through torch in place of the ONNX session, equals the PyTorch reference."""
    import torch

    from echoembed.echo import embed_texts
    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(tiny_llama_dir)
    seen = []

    def fake_ort(**feed):
        seen.append(sorted(feed))
        with torch.inference_mode():
            out = ref.loaded.model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        return SimpleNamespace(last_hidden_state=out.last_hidden_state.numpy())

    runner = worker.OptimumRunner(
        fake_ort, ["input_ids", "attention_mask", "position_ids"], pooling
    )
    got = embed_texts(runner, ref.encoder("echo"), TEXTS, batch_size=3)
    want = ref.encode(TEXTS, "echo", pooling=pooling, batch_size=3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert seen[0] == ["attention_mask", "input_ids", "position_ids"]


def test_prepare_optimum_peer(tiny_llama_dir, tmp_path, monkeypatch):
    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(tiny_llama_dir)
    config = prepare_optimum_peer(ref, "query", tmp_path / "w", pooling="last", threads=2)
    assert config.hf_dir == tmp_path / "w" / "hf"
    assert config.onnx_dir == tmp_path / "w" / "optimum-onnx"
    assert config.threads == 2
    cfg = json.loads((config.hf_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0  # the legacy key transformers 4 reads
    assert (config.hf_dir / "tokenizer.json").is_file()
    spec = json.loads(config.encoder_json)
    assert spec["pooling"] == "last" and spec["template"]["name"] == "query"
    assert spec["context_length"] == ref.loaded.context_length
    assert spec["special"]["bos"] == ref.loaded.special.bos

    # already written: reused, not rewritten
    def no_save(*a, **k):
        raise AssertionError("save_hf_dir called again")

    monkeypatch.setattr("echoembed.reference.save_hf_dir", no_save)
    again = prepare_optimum_peer(ref, "query", tmp_path / "w", pooling="last", threads=2)
    assert again == config

    # another model in the same work dir is refused
    stamp = tmp_path / "w" / "hf-source.json"
    stamp.write_text(json.dumps({"kind": "hf_dir", "name": "other", "path": "/elsewhere"}))
    with pytest.raises(ModelSourceError, match="another model"):
        prepare_optimum_peer(ref, "query", tmp_path / "w")


def test_peers_module_is_torch_free():
    r = run_blocked(
        """
        import echoembed.validation, echoembed.validation.peers as p
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        assert "echoembed.validation.optimum_worker" not in sys.modules  # needs optimum
        print(p.PeerConfig.__name__)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "PeerConfig"


def test_worker_module_imports_without_torch_or_optimum():
    """What ``make bench-peers`` gives the worker: echoembed --no-deps, numpy, tokenizers."""
    r = run_blocked(
        """
        import echoembed.validation.optimum_worker as w
        peer_venv = {"numpy", "tokenizers", "tqdm", "echoembed"}  # plus the stdlib
        loaded = {m.split(".")[0] for m in sys.modules if not m.startswith("_")}
        extra = loaded - set(sys.stdlib_module_names) - peer_venv
        assert not extra, sorted(extra)
        print(w.NAME)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "optimum-onnx fp32"


class _FakeOptimumModel:
    """Stands in for ``ORTModelForFeatureExtraction`` in ``export_if_needed``."""

    exports = 0
    fail = False

    @classmethod
    def from_pretrained(cls, path, export=False):
        assert export is True
        if cls.fail:
            raise RuntimeError("export failed half-way")
        cls.exports += 1
        return cls()

    def save_pretrained(self, out) -> None:
        (Path(out) / "model.onnx").write_text(f"export {type(self).exports}")


def test_export_if_needed_swaps_the_cache_atomically(worker, tmp_path, monkeypatch):
    onnxruntime = types.ModuleType("optimum.onnxruntime")
    onnxruntime.ORTModelForFeatureExtraction = _FakeOptimumModel
    monkeypatch.setitem(sys.modules, "optimum", types.ModuleType("optimum"))
    monkeypatch.setitem(sys.modules, "optimum.onnxruntime", onnxruntime)
    monkeypatch.setattr(_FakeOptimumModel, "exports", 0)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"a": 1}')
    cache = tmp_path / "cache" / "optimum-onnx"

    assert worker.export_if_needed(hf, cache) is not None  # exported
    assert (cache / "model.onnx").read_text() == "export 1"
    mask = os.umask(0)
    os.umask(mask)
    assert (cache.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's owner-only 0700
    assert json.loads((cache / worker.EXPORT_STAMP).read_text())["files"]["config.json"]
    assert worker.export_if_needed(hf, cache) is None  # same source: reused
    assert _FakeOptimumModel.exports == 1

    (hf / "config.json").write_text('{"a": 2}')  # another model: exported again, replaced
    monkeypatch.setattr(_FakeOptimumModel, "fail", True)
    with pytest.raises(RuntimeError, match="half-way"):
        worker.export_if_needed(hf, cache)
    assert (cache / "model.onnx").read_text() == "export 1"  # the old cache is untouched
    assert [p.name for p in cache.parent.iterdir()] == ["optimum-onnx"]  # no temporaries
    monkeypatch.setattr(_FakeOptimumModel, "fail", False)
    assert worker.export_if_needed(hf, cache) is not None
    assert (cache / "model.onnx").read_text() == "export 2"
    assert [p.name for p in cache.parent.iterdir()] == ["optimum-onnx"]


# ---------------------------------------------------------------------------------------------
# the real optimum-onnx pipeline (.venv-peers)


@pytest.fixture(scope="module")
def peer_work(tmp_path_factory):
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} is missing: run `make bench-peers`")
    return tmp_path_factory.mktemp("optimum-peer")


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_optimum_peer_matches_pytorch_reference(peer_work, smollm2_reference, pooling):
    from echoembed.validation import read_sts

    texts = read_sts(STSB_DEV, limit=15).unique_sentences()[:20]
    assert len(texts) == 20
    config = prepare_optimum_peer(smollm2_reference, "echo", peer_work, pooling=pooling, threads=2)
    peer = OptimumPeer.start(config)
    try:
        assert peer.name == "optimum-onnx fp32"
        assert peer.versions["optimum-onnx"] == "0.1.0"
        major_minor = tuple(int(x) for x in peer.versions["transformers"].split(".")[:2])
        assert major_minor < (4, 58)
        assert peer.info["inputs"] == ["input_ids", "attention_mask", "position_ids"]
        got = peer.embed(texts, batch_size=8)
    finally:
        peer.close(timeout=HANG_GUARD_S)
    want = smollm2_reference.encode(texts, "echo", pooling=pooling)
    cos = (got * want).sum(axis=1)
    print(f"optimum peer vs reference ({pooling}): min {cos.min():.7f} mean {cos.mean():.7f}")
    assert cos.min() > 0.9999
    assert peer.process.returncode == 0
