"""Triton deployment: model repositories (every config parsed with Triton's own schema) and a
real tritonserver (the nvidia-pytriton wheel's) serving the SmolLM2 artifact over HTTP and gRPC.

Tests that start a server are marked ``triton``; one server is shared by the module. It serves
the SmolLM2 repository plus, renamed ``*_prefix``, the three models of a tiny prefix-reuse
artifact (manifest format 5).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from echoembed.cli.main import main
from echoembed.deploy.models import EncoderModel, TextModel
from echoembed.deploy.serve import ServeConfig, TritonServer, port_is_free
from echoembed.deploy.triton import MODEL_NAMES, TritonRepoConfig, write_triton_repo
from echoembed.errors import (
    ArtifactError,
    BackendError,
    DeployError,
    InputError,
    TemplateError,
)
from echoembed.runtime import Embedder
from echoembed.validation import read_sts
from tests.helpers import STSB_TEST

COSINE = 0.99999


def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return read_sts(STSB_TEST, limit=40).unique_sentences()[:48]


@pytest.fixture(scope="module")
def embedder(smollm2_artifact) -> Embedder:
    return Embedder.load(smollm2_artifact.path)


@pytest.fixture(scope="module")
def repo(smollm2_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    return write_triton_repo(TritonRepoConfig(smollm2_artifact.path, out, max_batch=16))


PREFIX_SUFFIX = "_prefix"


@pytest.fixture(scope="module")
def prefix_artifact(tiny_prefix_artifact):
    art = tiny_prefix_artifact
    assert len(art.manifest.prefix_ids) == 7
    return art


@pytest.fixture(scope="module")
def prefix_embedder(prefix_artifact) -> Embedder:
    return Embedder.load(prefix_artifact.path, threads=1)


@pytest.fixture(scope="module")
def served_repo(repo, prefix_artifact, tmp_path_factory) -> Path:
    """What the module's server serves: ``repo`` (hard links) and the prefix artifact's models
    (``--encoder python``, the only backend this server has) renamed ``*_prefix``."""
    base = tmp_path_factory.mktemp("triton-served")
    out = Path(shutil.copytree(repo, base / "repo", copy_function=os.link))
    prefix_repo = write_triton_repo(TritonRepoConfig(prefix_artifact.path, base / "prefix"))
    names = re.compile(r'"(' + "|".join(MODEL_NAMES) + r')"')
    for name in MODEL_NAMES:
        dest = out / (name + PREFIX_SUFFIX)
        shutil.copytree(prefix_repo / name, dest)
        config = (dest / "config.pbtxt").read_text(encoding="utf-8")
        renamed = names.sub(lambda m: f'"{m.group(1)}{PREFIX_SUFFIX}"', config)
        (dest / "config.pbtxt").write_text(renamed, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def server(served_repo):
    s = TritonServer(ServeConfig(served_repo, start_timeout_s=120, stop_timeout_s=15))
    s.start()
    yield s
    s.stop()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def http_infer(
    url: str,
    texts: list,
    templates: list | None = None,
    dtype: str = "BYTES",
    model: str = "echo_embedder",
):
    """One request to ``model`` over HTTP -> embeddings, or the exception it raised."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    try:
        return client.infer(model, _inputs(th, texts, templates, dtype)).as_numpy("embedding")
    except Exception as e:  # the InferenceServerException is what the test checks
        return e
    finally:
        client.close()


def _inputs(mod, texts: list, templates: list | None, dtype: str = "BYTES") -> list:
    def tensor(name, values):
        if dtype == "BYTES":
            arr = np.array(
                [[v.encode("utf-8") if isinstance(v, str) else v] for v in values], dtype=object
            )
        else:
            arr = np.array([[v] for v in values], dtype=np.int32)
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    out = [tensor("text", texts)]
    if templates is not None:
        out.append(tensor("template", templates))
    return out


# -- repositories: no server -------------------------------------------------------------------


def _plans(tmp_path: Path) -> dict[str, Path]:
    plans = {}
    for cc in ("8.9", "9.0"):
        p = tmp_path / f"engine-{cc}.plan"
        p.write_bytes(b"not a real plan " + cc.encode())
        plans[cc] = p
    return plans


@pytest.mark.parametrize("encoder", ["python", "onnxruntime", "tensorrt"])
def test_every_config_parses_with_tritons_schema(tiny_artifact, tmp_path, encoder):
    from tritonclient.grpc import model_config_pb2 as pb

    config = TritonRepoConfig(
        tiny_artifact.path,
        tmp_path / "repo",
        encoder=encoder,
        max_batch=8,
        instances=2,
        max_queue_delay_us=500,
        tensorrt_accelerator=encoder == "onnxruntime",
        tensorrt_plans=_plans(tmp_path) if encoder == "tensorrt" else None,
    )
    repo = write_triton_repo(config)
    hidden = tiny_artifact.manifest.hidden_size
    configs = {name: parse_config(repo / name / "config.pbtxt") for name in MODEL_NAMES}
    for name, c in configs.items():
        assert c.name == name and c.max_batch_size == 8
        assert (repo / name / "1").is_dir()
    tok, enc, ens = (configs[n] for n in MODEL_NAMES)

    assert tok.backend == "python" and tok.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in tok.input] == [
        ("text", pb.TYPE_STRING, [1], False),
        ("template", pb.TYPE_STRING, [1], True),
    ]
    assert [o.name for o in tok.output] == ["input_ids", "attention_mask", "pool_mask"]
    assert all(o.data_type == pb.TYPE_INT64 and list(o.dims) == [-1] for o in tok.output)
    assert tok.instance_group[0].count == 2
    assert tok.parameters["strip_prefix"].string_value == "false"  # no prefix: whole prompts

    assert enc.HasField("dynamic_batching")
    assert enc.dynamic_batching.max_queue_delay_microseconds == 500
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask", "pool_mask"]
    assert [(o.name, o.data_type, list(o.dims)) for o in enc.output] == [
        ("embedding", pb.TYPE_FP32, [hidden])
    ]
    version_dir = repo / "echo_encoder" / "1"
    if encoder == "python":
        assert enc.backend == "python"
        assert all(i.allow_ragged_batch for i in enc.input)
        assert (version_dir / "model.py").is_file()
        assert (version_dir / "artifact" / "model.onnx").is_file()
    elif encoder == "onnxruntime":
        assert enc.platform == "onnxruntime_onnx" and not enc.backend
        assert (version_dir / "model.onnx").read_bytes() == tiny_artifact.model_path.read_bytes()
        accel = enc.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accel] == ["tensorrt"]
        assert accel[0].parameters["precision_mode"] == "FP32"
        assert enc.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    else:
        assert enc.platform == "tensorrt_plan"
        assert dict(enc.cc_model_filenames) == {
            "8.9": "model.sm89.plan",
            "9.0": "model.sm90.plan",
        }
        assert (version_dir / "model.sm90.plan").read_bytes() == b"not a real plan 9.0"
        assert enc.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU

    assert ens.platform == "ensemble"
    assert [i.name for i in ens.input] == ["text", "template"] and ens.input[1].optional
    assert [(o.name, list(o.dims)) for o in ens.output] == [("embedding", [hidden])]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["echo_tokenizer", "echo_encoder"]
    assert dict(steps[0].input_map) == {"text": "text", "template": "template"}
    assert set(steps[0].output_map) == {"input_ids", "attention_mask", "pool_mask"}
    assert dict(steps[1].output_map) == {"embedding": "embedding"}

    # Self-contained and relocatable: no config names a path on this machine.
    for name in MODEL_NAMES:
        text = (repo / name / "config.pbtxt").read_text()
        assert str(tmp_path) not in text and str(tiny_artifact.path) not in text
    tok_files = sorted(p.name for p in (repo / "echo_tokenizer" / "1" / "artifact").iterdir())
    assert tok_files == ["manifest.json", "tokenizer.json"]


def test_onnxruntime_without_accelerator_has_no_optimization_block(tiny_artifact, tmp_path):
    repo = write_triton_repo(
        TritonRepoConfig(tiny_artifact.path, tmp_path / "r", encoder="onnxruntime")
    )
    enc = parse_config(repo / "echo_encoder" / "config.pbtxt")
    assert not enc.HasField("optimization")


def test_tensorrt_on_an_onnx_artifact_asks_for_an_engine_artifact(tiny_artifact, tmp_path, capsys):
    with pytest.raises(DeployError, match="engine artifact.*build-engine"):
        write_triton_repo(TritonRepoConfig(tiny_artifact.path, tmp_path / "r", encoder="tensorrt"))
    assert not (tmp_path / "r").exists()
    code = main(["triton", str(tiny_artifact.path), str(tmp_path / "r"), "--encoder", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and "build-engine" in err and len(err.strip().splitlines()) == 1


def test_repository_is_written_atomically_and_never_overwritten(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton", str(tiny_artifact.path), str(out), "--max-batch", "4"]) == 0
    assert "echoembed serve" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="--force"):
        write_triton_repo(TritonRepoConfig(tiny_artifact.path, out))
    write_triton_repo(TritonRepoConfig(tiny_artifact.path, out, max_batch=3, force=True))
    assert parse_config(out / "echo_embedder" / "config.pbtxt").max_batch_size == 3
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging leftovers
    with pytest.raises(DeployError, match="max_batch"):
        write_triton_repo(TritonRepoConfig(tiny_artifact.path, tmp_path / "x", max_batch=0))


def test_a_damaged_artifact_is_not_copied(tiny_artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact.path, bad)
    with open(bad / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="checksum"):
        write_triton_repo(TritonRepoConfig(bad, tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


# -- the models' logic, in process --------------------------------------------------------------


def test_text_model_encodes_as_the_embedder(smollm2_artifact, repo, embedder, sentences):
    model = TextModel(repo / "echo_tokenizer" / "1" / "artifact")
    texts = sentences[:6]
    raw = np.array([[t.encode()] for t in texts], dtype=object)
    templates = np.array([[b""], [b"classical"], [b"query"], [b""], [b"echo"], [b"document"]])
    got = model.encode(raw, templates.astype(object))
    for i, name in enumerate([None, "classical", "query", None, "echo", "document"]):
        want = embedder.encoder(name).encode([texts[i]])
        n = int(want.attention_mask.sum())
        assert got.input_ids[i, :n].tolist() == want.input_ids[0].tolist()
        assert got.pool_mask[i, :n].tolist() == want.pool_mask[0].tolist()
        assert got.attention_mask[i].sum() == n
    with pytest.raises(TemplateError, match="templates\\[0\\].*nope"):
        model.encode(raw[:1], np.array([[b"nope"]], dtype=object))
    with pytest.raises(TemplateError):  # template strings only when the repo allows them
        model.encode(raw[:1], np.array([[b"{%%text%%}"]], dtype=object))
    with pytest.raises(InputError, match="UTF-8"):
        model.encode(np.array([[b"\xc3"]], dtype=object))


def test_encoder_model_rejects_unusable_inputs(repo):
    model = EncoderModel(repo / "echo_encoder" / "1" / "artifact", threads=1)
    ok = np.array([[1, 2, 3, 0]]), np.array([[1, 1, 1, 0]]), np.array([[0, 1, 1, 0]])
    assert len(model.rows(*ok)) == 1
    bad = [
        (np.array([[1, 2]]), np.array([[0, 1]]), np.array([[0, 1]])),  # left padding
        (np.array([[1, 2]]), np.array([[1, 1]]), np.array([[0, 0]])),  # nothing pooled
        (np.array([[1, 10**9]]), np.array([[1, 1]]), np.array([[1, 1]])),  # id outside vocab
        (np.array([[1, 2]]), np.array([[1, 1, 1]]), np.array([[1, 1]])),  # shapes differ
    ]
    for ids, att, pm in bad:
        with pytest.raises(InputError):
            model.rows(ids, att, pm)


# -- a prefix-reuse artifact (manifest format 5), through the models' model.py ------------------


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str):
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class _FakeResponse:
    def __init__(self, output_tensors: list, error: _FakeError | None = None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


def _fake_pb_utils():
    """The few ``triton_python_backend_utils`` names the models use; a request is a dict."""
    import types

    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.TritonError, mod.InferenceResponse = _FakeTensor, _FakeError, _FakeResponse
    mod.get_input_tensor_by_name = lambda request, name: (
        _FakeTensor(name, request[name]) if name in request else None
    )
    mod.Logger = types.SimpleNamespace(log_warn=lambda message: None)
    return mod


def _load_model(monkeypatch, repo: Path, name: str):
    """``repo``'s ``name`` model.py, initialized as Triton would (its config as JSON)."""
    import importlib.util

    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    path = repo / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_triton_{name}_{id(repo)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(
        parse_config(repo / name / "config.pbtxt"), preserving_proto_field_name=True
    )
    args = {"model_config": json.dumps(config), "model_repository": str(repo / name)}
    model = module.TritonPythonModel()
    model.initialize({**args, "model_version": "1"})
    return model


def _text_request(texts: list[str], templates: list[str] | None = None) -> dict:
    req = {"text": np.array([[t.encode()] for t in texts], dtype=object)}
    if templates is not None:
        req["template"] = np.array([[t.encode()] for t in templates], dtype=object)
    return req


@pytest.fixture(scope="module")
def prefix_repos(prefix_artifact, tmp_path_factory) -> dict[str, Path]:
    """The prefix artifact's repository per encoder that feeds the graph or the runtime."""
    base = tmp_path_factory.mktemp("triton-prefix")
    return {
        enc: write_triton_repo(TritonRepoConfig(prefix_artifact.path, base / enc, encoder=enc))
        for enc in ("python", "onnxruntime")
    }


def test_prefix_tokenizer_config_strips_only_for_graph_encoders(prefix_repos):
    for encoder, strip in (("python", "false"), ("onnxruntime", "true")):
        tok = parse_config(prefix_repos[encoder] / "echo_tokenizer" / "config.pbtxt")
        assert tok.parameters["strip_prefix"].string_value == strip
        assert [list(o.dims) for o in tok.output] == [[-1]] * 3


def test_prefix_tokenizer_feeds_the_graph_without_the_prefix(monkeypatch, prefix_repos,
                                                             prefix_artifact, prefix_embedder,
                                                             sentences):  # fmt: skip
    import onnxruntime as ort

    from echoembed.echo import strip_prefix

    repo = prefix_repos["onnxruntime"]
    tokenizer = _load_model(monkeypatch, repo, "echo_tokenizer")
    texts = sentences[:6]
    good = _text_request(texts, ["", "echo", "", "", "echo", ""])
    wrong = _text_request(texts[:1], ["classical"])
    responses = tokenizer.execute([good, wrong])
    assert responses[0].error is None
    prefix = prefix_artifact.manifest.prefix_ids
    want = strip_prefix(prefix_embedder.encoder().encode(texts), prefix)
    got = responses[0].outputs
    assert sorted(got) == ["attention_mask", "input_ids", "pool_mask"]
    for name, array in want.feed().items():
        np.testing.assert_array_equal(got[name], array)
    err = responses[1].error
    assert err is not None and err.code == "INVALID_ARG"
    assert "template 'classical' starts with" in err.message()
    assert "prefix of template 'echo' baked in" in err.message()
    # what the onnxruntime_onnx backend would do: echo_encoder's model.onnx on those tensors
    session = ort.InferenceSession(
        str(repo / "echo_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (emb,) = session.run(["embedding"], got)
    assert cosines(emb, prefix_embedder.encode(texts)).min() >= COSINE


def test_prefix_python_encoder_takes_whole_prompts(monkeypatch, prefix_repos, prefix_artifact,
                                                   prefix_embedder, sentences):  # fmt: skip
    repo = prefix_repos["python"]
    tokenizer = _load_model(monkeypatch, repo, "echo_tokenizer")
    texts = sentences[6:12]
    (tok_out,) = tokenizer.execute([_text_request(texts)])
    assert tok_out.error is None
    whole = prefix_embedder.encoder().encode(texts)
    np.testing.assert_array_equal(tok_out.outputs["input_ids"], whole.input_ids)
    encoder = _load_model(monkeypatch, repo, "echo_encoder")
    p = len(prefix_artifact.manifest.prefix_ids)
    stripped = {k: v[:, p:] for k, v in tok_out.outputs.items()}
    # rows without the prefix are refused per request: the good request batched with them
    # is served
    ok, bad = encoder.execute([tok_out.outputs, stripped])
    assert ok.error is None and bad.error is not None
    assert f"does not start with the {p} prefix ids" in bad.error.message()
    assert cosines(ok.outputs["embedding"], prefix_embedder.encode(texts)).min() >= COSINE


# -- a real server -------------------------------------------------------------------------------


@pytest.mark.triton
def test_http_batches_match_the_embedder(server, embedder, sentences):
    texts = sentences[:16]
    got = http_infer(server.http_url, texts)
    assert isinstance(got, np.ndarray), got
    assert got.shape == (16, embedder.hidden_size) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, embedder.encode(texts)).min() >= COSINE


@pytest.mark.triton
def test_grpc_batches_match_the_embedder(server, embedder, sentences):
    import tritonclient.grpc as tg

    texts = sentences[16:32]
    with tg.InferenceServerClient(server.grpc_url) as client:
        got = client.infer("echo_embedder", _inputs(tg, texts, None)).as_numpy("embedding")
    assert got.shape == (16, embedder.hidden_size)
    assert cosines(got, embedder.encode(texts)).min() >= COSINE


@pytest.mark.triton
def test_concurrent_clients_are_batched_and_all_correct(server, embedder, sentences):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    texts = sentences[:40]
    want = dict(zip(texts, embedder.encode(texts), strict=True))
    stats = th.InferenceServerClient(server.http_url)
    before = stats.get_inference_statistics("echo_encoder")["model_stats"][0]
    results: dict[int, list] = {}

    def client(k: int) -> None:
        out = []
        grpc = k % 2 == 1  # half the clients over gRPC
        c = tg.InferenceServerClient(server.grpc_url) if grpc else None
        for j in range(50):
            text = texts[(k * 7 + j) % len(texts)]
            if grpc:
                emb = c.infer("echo_embedder", _inputs(tg, [text], None)).as_numpy("embedding")
            else:
                emb = http_infer(server.http_url, [text])
            out.append((text, emb))
        if c is not None:
            c.close()
        results[k] = out

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for out in results.values():
        assert len(out) == 50
        for text, emb in out:
            assert isinstance(emb, np.ndarray), emb
            assert float(cosines(emb, want[text][None])[0]) >= COSINE
    # Triton updates its statistics after a response is sent: the last request can be missing
    # from a read right after it (seen in CI: 399 of 400), so read until they settle (bounded)
    deadline = time.monotonic() + 30.0
    while True:
        after = stats.get_inference_statistics("echo_encoder")["model_stats"][0]
        done = int(after["inference_count"]) - int(before["inference_count"]) >= 400
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    stats.close()
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == 400
    # Requests of different lengths ran together: fewer ORT batches than requests.
    assert executions < inferences


@pytest.mark.triton
def test_each_bad_request_fails_alone(server, embedder, sentences):
    bad = {
        "empty": ([""], None, "BYTES", "empty or whitespace-only"),
        "whitespace": (["  \t "], None, "BYTES", "empty or whitespace-only"),
        "utf8": ([b"caf\xe9 au lait"], None, "BYTES", "not valid UTF-8"),
        "template": (["A cat."], ["no-such-template"], "BYTES", "not a template this server"),
        "oversized": (["word " * 40000], None, "BYTES", "over this server's limit"),
        "dtype": ([7], None, "INT32", "expects 'BYTES'"),
    }
    good = sentences[:12]
    want = embedder.encode(good)
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(bad) + len(good))

    def send(key, texts, templates, dtype):
        barrier.wait(timeout=60)
        results[key] = http_infer(server.http_url, texts, templates, dtype)

    jobs = [(k, *v[:3]) for k, v in bad.items()] + [(i, [t], None, "BYTES") for i, t in
                                                    enumerate(good)]  # fmt: skip
    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    from tritonclient.utils import InferenceServerException

    for key, (*_, message) in bad.items():
        err = results[key]
        assert isinstance(err, InferenceServerException), (key, err)
        assert err.status() == "400", (key, err.status())
        assert message in err.message(), (key, err.message())
    for i in range(len(good)):
        assert isinstance(results[i], np.ndarray), results[i]
        assert float(cosines(results[i], want[i][None])[0]) >= COSINE
    # ... and the server goes on serving.
    assert server.process.poll() is None
    assert cosines(http_infer(server.http_url, good[:2]), want[:2]).min() >= COSINE


@pytest.mark.triton
def test_a_bad_encoder_request_fails_alone(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    def request(ids):
        ids = np.array([ids], dtype=np.int64)
        inputs = []
        for name, arr in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                          ("pool_mask", np.ones_like(ids))):  # fmt: skip
            t = th.InferInput(name, list(arr.shape), "INT64")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        c = th.InferenceServerClient(server.http_url)
        try:
            return c.infer("echo_encoder", inputs).as_numpy("embedding")
        except InferenceServerException as e:
            return e
        finally:
            c.close()

    out = {}
    barrier = threading.Barrier(4)

    def send(k, ids):
        barrier.wait(timeout=60)
        out[k] = request(ids)

    jobs = [(0, [1, 2, 3]), (1, [5, 10**9]), (2, [4, 5, 6, 7, 8]), (3, [9])]
    threads = [threading.Thread(target=send, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(out[1], InferenceServerException) and out[1].status() == "400"
    assert "outside the vocabulary" in out[1].message()
    for k in (0, 2, 3):
        assert isinstance(out[k], np.ndarray) and out[k].shape[0] == 1, out[k]


@pytest.mark.triton
def test_template_input_changes_the_embedding_as_the_embedder(server, embedder, sentences):
    texts = sentences[:4]
    classical = http_infer(server.http_url, texts, ["classical"] * 4)
    assert cosines(classical, embedder.encode(texts, template="classical")).min() >= COSINE
    assert cosines(classical, embedder.encode(texts)).max() < 0.999  # a different embedding
    mixed = http_infer(server.http_url, texts, ["", "query", "classical", "document"])
    for i, name in enumerate([None, "query", "classical", "document"]):
        want = embedder.encode([texts[i]], template=name)
        assert float(cosines(mixed[i : i + 1], want)[0]) >= COSINE


@pytest.mark.triton
def test_prefix_artifact_is_served_as_the_embedder(server, prefix_embedder, sentences):
    model = "echo_embedder" + PREFIX_SUFFIX
    texts = sentences[:8]
    got = http_infer(server.http_url, texts, model=model)
    assert isinstance(got, np.ndarray), got
    assert got.shape == (8, prefix_embedder.hidden_size)
    assert cosines(got, prefix_embedder.encode(texts)).min() >= COSINE
    err = http_infer(server.http_url, texts[:2], ["echo", "document"], model=model)
    from tritonclient.utils import InferenceServerException

    assert isinstance(err, InferenceServerException) and err.status() == "400", err
    assert "template 'document' starts with" in err.message()
    assert "prefix of template 'echo' baked in" in err.message()


# -- start, stop, CLI ----------------------------------------------------------------------------


def test_busy_ports_are_refused_before_start(tmp_path):
    import socket

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DeployError, match=f"port {port}.*in use"):
            TritonServer(ServeConfig(tmp_path, http_port=port)).start()


@pytest.mark.triton
def test_a_server_that_dies_at_start_says_why(tmp_path):
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('this model refuses to load')\n"
    )
    server = TritonServer(ServeConfig(tmp_path / "repo", start_timeout_s=120))
    with pytest.raises(BackendError, match="(?s)exited with status.*refuses to load"):
        server.start()
    assert server.process is None and server.shm_files() == []


def _shm_of(pid: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"echoembed_triton_{pid}_*"))


@pytest.mark.triton
def test_cli_serve_prints_urls_and_stops_cleanly_on_sigterm(repo, embedder, sentences):
    proc = subprocess.Popen(
        [sys.executable, "-m", "echoembed.cli.main", "serve", str(repo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, timeout=150)
        m = re.search(r"HTTP (\S+)\s+gRPC (\S+)\s+metrics (\S+)\s+\(pid (\d+)", line)
        assert m, line
        http, grpc, pid = m.group(1), m.group(2), int(m.group(4))
        assert http.startswith("127.0.0.1:") and grpc.startswith("127.0.0.1:")
        got = http_infer(http, sentences[:2])
        assert cosines(got, embedder.encode(sentences[:2])).min() >= COSINE
        assert _shm_of(proc.pid)  # the Python backend's regions exist while it runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in (http, grpc, m.group(3))]
    assert all(port_is_free(p) for p in ports)
    assert _shm_of(proc.pid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"no ready line from `echoembed serve`: {proc.stderr.read()[-2000:]}")
    return box[0]


def test_missing_pytriton_exits_2_with_the_install_hint(repo):
    code = textwrap.dedent(
        f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pytriton":
                    raise ModuleNotFoundError(f"No module named {{name!r}} (test)")
                return None
        sys.meta_path.insert(0, _Block())
        from echoembed.cli.main import main
        sys.exit(main(["serve", {str(repo)!r}]))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps nvidia-pytriton==0.7.0" in lines[0], lines


@pytest.mark.triton
def test_server_stop_cleans_up(repo):
    s = TritonServer(ServeConfig(repo, start_timeout_s=120))
    with s:
        ports = (s.http_port, s.grpc_port, s.metrics_port)
        pid = s.pid
        assert s.is_ready() and s.shm_files()
        assert not any(port_is_free(p) for p in ports)
    assert s.process is None and s.shm_files() == []
    assert all(port_is_free(p) for p in ports)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert s.log_tail() == ""  # the temporary log went with its directory


def test_numpy2_without_the_stub_numpy_says_how_to_install_it(repo, tmp_path):
    from echoembed.errors import MissingDependencyError

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has NumPy 1.x: the stub needs no NumPy of its own")
    config = ServeConfig(repo, stub_site=tmp_path / "no-numpy-here")
    with pytest.raises(MissingDependencyError, match="pip install --no-deps --target .* numpy=="):
        TritonServer(config).start()
