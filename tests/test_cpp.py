"""examples/cpp (echoembed-cpp) on the real SmolLM2 artifact: the same ids as echoembed.echo, the
same embeddings as the runtime, the same truncation, clear errors. `make test` builds it first
(`make cpp`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from echoembed.artifact import read_manifest
from echoembed.echo import EchoEncoder, EncoderConfig, embed_texts
from echoembed.runtime import Embedder
from echoembed.validation import read_sts
from tests.helpers import STSB_TEST

BINARY = Path(__file__).resolve().parents[1] / "examples" / "cpp" / "build" / "echoembed-cpp"
TEMPLATES = ["echo", "classical", "query", "document"]
LONG = " ".join(["The committee discussed the proposal at considerable length."] * 20)


pytestmark = pytest.mark.skipif(
    not BINARY.is_file(),
    reason=f"{BINARY} is not built: run `make cpp` (`make test` builds it first)",
)


@pytest.fixture(scope="module")
def binary() -> Path:
    return BINARY


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    texts = read_sts(STSB_TEST, limit=40).unique_sentences()[:50]
    assert len(texts) == 50
    return texts


@pytest.fixture(scope="module")
def runtime(smollm2_artifact) -> Embedder:
    return Embedder.load(smollm2_artifact.path, threads=2)


def _run(binary: Path, artifact: Path, lines: str | bytes, *args: str):
    data = lines.encode("utf-8") if isinstance(lines, str) else lines
    return subprocess.run(
        [str(binary), str(artifact), *args], input=data, capture_output=True, timeout=300
    )


def _ids(binary: Path, artifact: Path, texts: list[str], *args: str) -> list[tuple]:
    r = _run(binary, artifact, "\n".join(texts) + "\n", "--ids", *args)
    assert r.returncode == 0, r.stderr.decode()
    rows = []
    for line in r.stdout.decode().splitlines():
        ids, flags, truncated = line.split("\t")
        rows.append(([int(x) for x in ids.split()], [int(x) for x in flags.split()], truncated))
    return [(ids, flags, t == "1") for ids, flags, t in rows]


def _embeddings(binary: Path, artifact: Path, texts: list[str], *args: str) -> np.ndarray:
    r = _run(binary, artifact, "\n".join(texts) + "\n", "--threads", "2", *args)
    assert r.returncode == 0, r.stderr.decode()
    return np.array([[float(x) for x in ln.split()] for ln in r.stdout.decode().splitlines()])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("template", TEMPLATES)
def test_token_ids_are_echos(binary, smollm2_artifact, runtime, sentences, template):
    got = _ids(binary, smollm2_artifact.path, sentences, "--template", template)
    want = runtime.encoder(template).encode_ids(sentences)
    assert len(got) == 50
    assert got == [tuple(r) for r in want]
    assert not any(r.truncated for r in want)


@pytest.mark.parametrize("template", [None, "query"])
def test_embeddings_are_the_runtimes(binary, smollm2_artifact, runtime, sentences, template):
    args = () if template is None else ("--template", template)
    got = _embeddings(binary, smollm2_artifact.path, sentences, *args)
    want = runtime.encode(sentences, template)
    assert got.shape == want.shape == (50, runtime.hidden_size)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert _cosines(got, want).min() >= 0.99999


@pytest.fixture(scope="module")
def small_context(tmp_path_factory, smollm2_artifact, runtime):
    """The artifact with its plans rebuilt for max_length 24 and a context of 40 tokens (model
    and tokenizer linked, not copied), and the matching Python encoder."""
    root = tmp_path_factory.mktemp("small-context")
    for name in ("model.onnx", "tokenizer.json"):
        (root / name).symlink_to(smollm2_artifact.path / name)
    cfg = EncoderConfig(runtime.template("echo"), max_length=24, context_length=40)
    enc = EchoEncoder(runtime.tokenizer, runtime.special, cfg)
    m = dataclasses.replace(read_manifest(smollm2_artifact.path), prompt_plans=(enc.plan(),))
    (root / "manifest.json").write_text(m.to_json(), encoding="utf-8")
    return root, enc


def test_truncation_matches_python(binary, small_context, runtime, sentences):
    root, enc = small_context
    texts = [LONG, sentences[0], LONG[:150], sentences[1]]
    want = enc.encode_ids(texts)
    assert [r.truncated for r in want] == [True, False, True, False]
    assert all(len(r.ids) <= 40 for r in want)
    assert _ids(binary, root, texts) == [tuple(r) for r in want]
    got = _embeddings(binary, root, texts)
    expected = embed_texts(runtime.runner, enc, texts)
    assert _cosines(got, expected).min() >= 0.99999


def test_lines_split_like_python(binary, smollm2_artifact, runtime):
    data = "First one.\r\nSecond\u2028third\x85fourth\rfifth\u00a0text\n"
    texts = data.splitlines()
    assert len(texts) == 5
    got = _ids(binary, smollm2_artifact.path, [data.rstrip("\n")])
    assert got == [tuple(r) for r in runtime.encoder().encode_ids(texts)]


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("one\n\nthree\n", "stdin:2 is blank"),
        ("one\n \u3000\t\n", "stdin:2 is blank"),
        ("", "holds no texts"),
        ("fine\nnul\x00here\n", "stdin:2 holds a NUL character"),
        (b"ok\n\xff\xfe\n", "not valid UTF-8"),
        (b"\xed\xa0\x80 surrogate\n", "not valid UTF-8"),
    ],
)
def test_bad_input_is_a_clear_error(binary, smollm2_artifact, data, fragment):
    r = _run(binary, smollm2_artifact.path, data)
    assert r.returncode == 2 and fragment in r.stderr.decode()
    assert r.stdout == b""


def test_bad_artifact_or_template_is_a_clear_error(binary, smollm2_artifact, tmp_path):
    r = _run(binary, smollm2_artifact.path, "hi\n", "--template", "nope")
    assert r.returncode == 2
    assert "unknown template nope; this artifact has: echo, classical, query, document" in (
        r.stderr.decode()
    )
    r = _run(binary, tmp_path / "missing", "hi\n")
    assert r.returncode == 2 and "is not a directory" in r.stderr.decode()
    r = _run(binary, tmp_path, "hi\n")
    assert r.returncode == 2 and "has no manifest.json" in r.stderr.decode()
    old = tmp_path / "format2"
    shutil.copytree(smollm2_artifact.path, old, ignore=shutil.ignore_patterns("model.onnx*"))
    data = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    data["format_version"] = 2
    del data["prompt_plans"]
    (old / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
    r = _run(binary, old, "hi\n")
    err = r.stderr.decode()
    assert r.returncode == 2 and "(format 2) records no prompt plans" in err
    assert "re-export the artifact" in err
    r = _run(binary, smollm2_artifact.path, "hi\n", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size needs a positive integer" in r.stderr.decode()


# -- a prefix-reuse artifact (manifest format 5) ----------------------------------------------


@pytest.fixture(scope="module")
def prefix_artifact(tiny_prefix_artifact):
    art = tiny_prefix_artifact
    assert art.manifest.prefix is not None and art.manifest.prefix.template == "echo"
    return art


@pytest.fixture(scope="module")
def prefix_runtime(prefix_artifact) -> Embedder:
    return Embedder.load(prefix_artifact.path, threads=2)


def test_prefix_artifact_embeddings_are_the_runtimes(binary, prefix_artifact, prefix_runtime,
                                                     sentences):  # fmt: skip
    texts = [*sentences[:24], LONG]
    prefix = list(prefix_artifact.manifest.prefix_ids)
    # --ids prints the whole prompt, as the encoder makes it (and `echoembed tokenize` + prefix)
    got_ids = _ids(binary, prefix_artifact.path, texts)
    assert got_ids == [tuple(r) for r in prefix_runtime.encoder().encode_ids(texts)]
    assert all(ids[: len(prefix)] == prefix for ids, _, _ in got_ids)
    # ... and the graph gets them without the prefix: the runtime's embeddings, in any batching
    want = prefix_runtime.encode(texts)
    for batch in ("32", "5"):
        got = _embeddings(binary, prefix_artifact.path, texts, "--batch-size", batch)
        assert got.shape == want.shape == (len(texts), prefix_runtime.hidden_size)
        assert _cosines(got, want).min() >= 0.99999


def test_prefix_artifact_refuses_other_templates(binary, prefix_artifact):
    for args in (("--template", "classical"), ("--template", "query", "--ids")):
        r = _run(binary, prefix_artifact.path, "A cat.\n", *args)
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"", err
        assert f"template {args[1]} starts with [1 " in err
        assert "but this artifact has the prefix of template echo baked in" in err
        assert "'<|im_start|>Rewrite the sentence:', 7 tokens [1 66 846" in err
        assert "use --template echo" in err and "without --prefix-reuse" in err
    r = _run(binary, prefix_artifact.path, "A cat.\n", "--template", "echo")
    assert r.returncode == 0 and len(r.stdout.decode().splitlines()) == 1


def _doctored(src: Path, dest: Path, edit) -> Path:
    """``src`` with its manifest edited by ``edit(dict)`` (model and tokenizer linked)."""
    dest.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (dest / name).symlink_to(src / name)
    data = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    edit(data)
    (dest / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
    return dest


def test_prefix_rows_are_checked_and_the_manifest_read_strictly(binary, prefix_artifact,
                                                                tmp_path):  # fmt: skip
    def nothing_after_prefix(m):
        # a plan whose prompt is the prefix alone: the text piece cut to 0 tokens, nothing after
        plan = next(p for p in m["prompt_plans"] if p["template"] == "echo")
        plan["pieces"] = plan["pieces"][:2]
        plan["pieces"][1]["pooled"] = True
        plan["max_length"] = 0

    root = _doctored(prefix_artifact.path, tmp_path / "empty-rest", nothing_after_prefix)
    r = _run(binary, root, "A cat.\nA dog.\n")
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", err
    assert "stdin:1: the prompt does not start with the 7 prefix ids baked into this" in err
    assert "[1 66 846 16064 260 6330 42], template echo" in err
    assert _run(binary, root, "A cat.\n", "--ids").returncode == 0  # --ids feeds no graph

    root = _doctored(prefix_artifact.path, tmp_path / "no-ids", lambda m: m["prefix"].pop("ids"))
    r = _run(binary, root, "A cat.\n")
    assert r.returncode == 2 and "malformed manifest" in r.stderr.decode()
    root = _doctored(prefix_artifact.path, tmp_path / "null", lambda m: m.update(prefix=None))
    r = _run(binary, root, "A cat.\n", "--template", "classical", "--ids")
    assert r.returncode == 0, r.stderr.decode()  # no prefix: every template
    root = _doctored(prefix_artifact.path, tmp_path / "v6", lambda m: m.update(format_version=6))
    r = _run(binary, root, "A cat.\n")
    assert r.returncode == 2 and "format 6 is newer than this program reads (5)" in (
        r.stderr.decode()
    )
