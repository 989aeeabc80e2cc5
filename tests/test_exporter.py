"""Exporter: every architecture from a tiny random config, the pooling head, failure paths."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.echo import Pooling, pool
from echoembed.errors import ArtifactError, ExportError, ParityError, UnsupportedArchitectureError
from echoembed.exporter import ARCHITECTURES, ExportConfig, export
from echoembed.reference import ReferenceEmbedder
from echoembed.runtime import Embedder, read_manifest
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

TEXTS = [
    "A man is playing the guitar.",
    "Hi",
    "The stock market fell sharply after the announcement of new tariffs on steel imports.",
    "Kids play in the park while their parents watch from a bench nearby.",
    "ok",
]


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer[2]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("tiny-models")
    return {mt: save_tiny_model(mt, root / mt, hf_tokenizer) for mt in TINY_CONFIGS}


def test_every_supported_architecture_has_a_tiny_model():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_export_architecture_parity(model_type, tiny_dirs, tmp_path):
    pooling = "last" if model_type in ("gpt2", "qwen3", "gemma2") else "mean"
    art = export(tiny_dirs[model_type], tmp_path / "art", ExportConfig(pooling=pooling))
    m = art.manifest
    assert m.architecture == model_type and m.pooling == pooling and m.parity.passed
    assert m.parity.max_abs_diff <= 1e-4 and m.opset >= 17
    ref = ReferenceEmbedder.load(tiny_dirs[model_type])
    rt = Embedder.load(art.path)
    want = ref.encode(TEXTS, "echo", pooling=pooling)
    for bs in (1, 2, 5):
        got = rt.encode(TEXTS, batch_size=bs)
        assert np.abs(got - want).max() <= 1e-4, f"batch size {bs}"


def test_torchscript_exporter_and_both_poolings(tiny_dirs, tmp_path):
    for pooling in ("mean", "last"):
        cfg = ExportConfig(exporter="torchscript", pooling=pooling)
        art = export(tiny_dirs["llama"], tmp_path / pooling, cfg)
        assert art.manifest.exporter == "torchscript" and art.manifest.parity.max_abs_diff < 1e-4
    import onnx

    names = {n.name for n in onnx.load(str(art.model_path)).graph.node}
    assert "base.layers.0.self_attn.q_proj/MatMul" in names


def test_graph_contract(tiny_dirs, tmp_path):
    import onnx

    art = export(tiny_dirs["llama"], tmp_path / "a", ExportConfig(pooling="last"))
    model = onnx.load(str(art.model_path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "pool_mask"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param and not d.dim_value for d in dims), "batch and sequence are dynamic"
    out = model.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT and out.shape.dim[1].dim_value == 32
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    assert "ArgMax" not in ops
    linear = [n.name for n in model.graph.node if n.op_type == "MatMul" and "/" in n.name]
    assert len(linear) == 2 * 7 and "base.layers.1.mlp.down_proj/MatMul" in linear
    assert {"input_ids", "attention_mask", "pool_mask"} <= {i.name for i in art.manifest.inputs}
    assert set(art.manifest.files) == {"model.onnx", "tokenizer.json"}
    assert art.manifest.versions["torch"] and art.manifest.source.kind == "hf_dir"
    # the manifest describes the graph that is there: opset imports as saved
    saved = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    assert art.manifest.opset_imports == saved and art.manifest.opset == saved[""] == 18
    assert read_manifest(art.path) == art.manifest
    assert art.manifest.special_tokens.bos is not None and art.manifest.output_name == "embedding"


@pytest.mark.parametrize("pooling", list(Pooling))
def test_head_mirrors_numpy_pooling(pooling):
    import torch

    from echoembed.exporter.head import EchoEmbeddingModel

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=np.int64)

    class Base(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            class Out:
                last_hidden_state = torch.from_numpy(hidden)

            return Out()

    head = EchoEmbeddingModel(Base(), pooling, normalize=False)
    ids = torch.zeros((3, 6), dtype=torch.int64)
    got = head(ids, ids, torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, pool(hidden, mask, pooling), atol=1e-6)


def test_parity_failure_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    from echoembed.exporter import head

    original = head.EchoEmbeddingModel.forward

    def skewed(self, input_ids, attention_mask, pool_mask):  # a graph that drifts by ~1%
        out = original(self, input_ids, attention_mask, pool_mask)
        return out + 0.01 * out.roll(1, dims=1)

    monkeypatch.setattr(head.EchoEmbeddingModel, "forward", skewed)
    target = tmp_path / "art"
    with pytest.raises(ParityError, match=r"batch size 1.*\n.*max abs diff") as info:
        export(tiny_dirs["llama"], target, ExportConfig(exporter="torchscript"))
    assert "no artifact was written" in str(info.value)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary directory left behind"


def test_existing_target_needs_force(tiny_dirs, tmp_path):
    target = tmp_path / "art"
    first = export(tiny_dirs["llama"], target, ExportConfig(exporter="torchscript"))
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        export(tiny_dirs["llama"], target, ExportConfig(exporter="torchscript"))
    second = export(
        tiny_dirs["llama"], target, ExportConfig(exporter="torchscript", pooling="last", force=True)
    )
    assert read_manifest(target).pooling == "last" != first.manifest.pooling
    assert second.path == target and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_external_data(tiny_dirs, tmp_path):
    art = export(tiny_dirs["llama"], tmp_path / "ext", ExportConfig(external_data=True))
    files = set(art.manifest.files)
    assert files == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    graph_size = (art.path / "model.onnx").stat().st_size
    data_size = (art.path / "model.onnx.data").stat().st_size
    assert graph_size < 0.1 * data_size, "weights live in the data file"
    want = ReferenceEmbedder.load(tiny_dirs["llama"]).encode(TEXTS, "echo")
    np.testing.assert_allclose(Embedder.load(art.path).encode(TEXTS), want, atol=1e-4)
    (art.path / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="model.onnx.data.*missing"):
        Embedder.load(art.path)


def test_unsupported_architecture_lists_supported(tmp_path, hf_tokenizer):
    import torch
    from transformers import AutoModel, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=49152,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "neox")
    hf_tokenizer.save_pretrained(tmp_path / "neox")
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox.*llama \\(Llama\\).*gpt2"):
        export(tmp_path / "neox", tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_bad_config_values(tiny_dirs, tmp_path):
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export(tiny_dirs["llama"], tmp_path / "a", ExportConfig(opset=13))
    with pytest.raises(Exception, match="unknown pooling"):
        export(tiny_dirs["llama"], tmp_path / "a", ExportConfig(pooling="max"))


def test_fp16_export(tiny_dirs, tmp_path):
    import onnx

    fp32 = export(tiny_dirs["llama"], tmp_path / "fp32", ExportConfig(exporter="torchscript"))
    fp16 = export(tiny_dirs["llama"], tmp_path / "fp16", ExportConfig(dtype="fp16"))
    assert fp16.manifest.precision == "fp16" and fp16.manifest.parity.passed
    assert fp16.manifest.parity.tolerance == 5e-3
    model = onnx.load(str(fp16.model_path))
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.model_path.stat().st_size < 0.6 * fp32.model_path.stat().st_size
    want = ReferenceEmbedder.load(tiny_dirs["llama"]).encode(TEXTS, "echo")
    got = Embedder.load(fp16.path).encode(TEXTS)
    assert (got * want).sum(axis=1).min() > 0.999


def test_export_or_reuse(tiny_dirs, tmp_path):
    from echoembed.exporter import export_or_reuse
    from echoembed.reference.sources import load_model, resolve_source

    loaded = load_model(resolve_source(tiny_dirs["llama"]))
    cfg = ExportConfig(exporter="torchscript")
    first, reused = export_or_reuse(loaded, tmp_path / "a", cfg)
    assert not reused
    again, reused = export_or_reuse(loaded, tmp_path / "a", cfg)
    assert reused and again.manifest == first.manifest
    changed, reused = export_or_reuse(
        loaded, tmp_path / "a", ExportConfig(exporter="torchscript", pooling="last")
    )
    assert not reused and changed.manifest.pooling == "last"
    (tmp_path / "a" / "tokenizer.json").write_text("{}")  # damaged: exported again
    repaired, reused = export_or_reuse(
        loaded, tmp_path / "a", ExportConfig(exporter="torchscript", pooling="last")
    )
    assert not reused and Embedder.load(repaired.path).encode(["hi"]).shape == (1, 32)


def test_reuse_compares_the_requested_opset_not_the_graphs(tiny_dirs, tmp_path):
    """The dynamo exporter may write a newer opset than asked for; the manifest records both
    (``opset``: the graph's, ``requested_opset``: the request), and reuse compares the request."""
    import onnx

    from echoembed.exporter import export_or_reuse
    from echoembed.reference.sources import load_model, resolve_source

    loaded = load_model(resolve_source(tiny_dirs["llama"]))
    cfg = ExportConfig(opset=17)
    first, reused = export_or_reuse(loaded, tmp_path / "a", cfg)
    graph = {o.domain: o.version for o in onnx.load(str(first.model_path)).opset_import}
    m = first.manifest
    assert not reused and m.requested_opset == 17 and m.opset == graph[""] >= 17
    again, reused = export_or_reuse(loaded, tmp_path / "a", cfg)
    assert reused and again.manifest == first.manifest
    _, reused = export_or_reuse(loaded, tmp_path / "a", ExportConfig(opset=19))
    assert not reused
