"""The fused export stage (``echoembed.exporter.fusion``): where it applies the graph carries ORT's
fused kernels and embeds as the unfused graph and the reference do; where it does not, the export
falls back to the unfused graph and records why."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import pytest

from echoembed.artifact import read_manifest
from echoembed.calibration import (
    CalibrationConfig,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
    quantize,
)
from echoembed.exporter import ExportConfig, export, export_or_reuse
from echoembed.exporter.architectures import ARCHITECTURES
from echoembed.runtime import Embedder
from echoembed.validation.sts import read_sts
from tests.helpers import STSB_TEST
from tests.tiny_models import TINY_CONFIGS

SMALL = QuantizeOptions(calibration=CalibrationConfig(samples=12, batch_size=4))

# What the stage does on each registered architecture, with tiny models of head size 16 (ORT's
# CPU attention kernels need a multiple of 16): fused, or the start of the recorded reason.
EXPECTED = {
    "llama": True,
    "qwen2": True,
    "qwen3": True,
    "mistral": "sliding-window attention",
    "gemma2": "sliding-window attention",
    "gemma3_text": "sliding-window attention",
    "phi3": "ONNX Runtime fails on the fused graph",
    "gpt2": "ONNX Runtime does not load the fused graph",
}


def _ops(path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


def _sts_sentences(n: int) -> list[str]:
    return read_sts(STSB_TEST).unique_sentences()[:n]


def _tiny16(model_type: str, out, hf_tokenizer):
    """A tiny random model of ``model_type`` with head size 16 (4 heads, hidden 64)."""
    import torch
    from transformers import AutoModel

    config = TINY_CONFIGS[model_type]()
    if model_type == "gpt2":
        config.n_embd = 64
    else:
        config.hidden_size = 64
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = 16
        if hasattr(config, "query_pre_attn_scalar"):
            config.query_pre_attn_scalar = 16
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    hf_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("tiny16")
    return {mt: _tiny16(mt, root / mt, smollm2_tokenizer[2]) for mt in EXPECTED}


@pytest.fixture(scope="module")
def fused_llama(tiny16, tmp_path_factory):
    return export(tiny16["llama"], tmp_path_factory.mktemp("fused-llama") / "a")


def test_every_architecture_has_an_expected_outcome():
    assert set(EXPECTED) == set(ARCHITECTURES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_stage_on_every_architecture(model_type, tiny16, tmp_path):
    """Fused where expected (and then equal to the unfused export of the same weights on padded
    batches of real sentences; mean pooling, and last for Llama); otherwise unfused with the
    reason."""
    texts = _sts_sentences(24)
    for pooling in ("mean", "last") if model_type == "llama" else ("mean",):
        art = export(tiny16[model_type], tmp_path / pooling, ExportConfig(pooling=pooling))
        f = art.manifest.fusion
        ops = _ops(art.model_path)
        assert f is not None and f.requested
        if EXPECTED[model_type] is True:
            assert f.applied and f.reason == "" and f.requires_right_padding
            # the last step: GroupQueryAttention -> RotaryEmbedding x2 + ONNX Attention-23
            assert f.ops["Attention"] == ops["Attention"] == 2 and "GroupQueryAttention" not in ops
            assert f.ops["RotaryEmbedding"] == ops["RotaryEmbedding"] == 4
            assert f.ops["SkipSimplifiedLayerNormalization"] == 4 and art.manifest.opset == 23
            assert f.nodes_after < f.nodes_before and f.max_abs_diff < 1e-4
            plain = export(
                tiny16[model_type], tmp_path / f"{pooling}-plain",
                ExportConfig(pooling=pooling, fuse=False),
            )  # fmt: skip
            assert "GroupQueryAttention" not in _ops(plain.model_path)
            assert not plain.manifest.fusion.requested and not plain.manifest.fusion.applied
            got = Embedder.load(art.path).encode(texts, batch_size=8)
            want = Embedder.load(plain.path).encode(texts, batch_size=8)
            assert float((got * want).sum(axis=1).min()) >= 0.99999
        else:
            assert not f.applied and f.reason.startswith(EXPECTED[model_type]), f.reason
            assert not f.ops and "GroupQueryAttention" not in ops
            assert art.manifest.parity.passed  # the unfused graph is what was checked and kept


def test_head_size_the_kernels_refuse_falls_back(tiny_artifact):
    """The shared tiny Llama has head size 8: ORT's CPU GroupQueryAttention refuses it."""
    f = tiny_artifact.manifest.fusion
    assert not f.applied and "head size [8] is not a multiple of 16" in f.reason
    assert "GroupQueryAttention" not in _ops(tiny_artifact.model_path)


def test_fp16_is_not_fused(tiny16, tmp_path):
    art = export(tiny16["llama"], tmp_path / "h", ExportConfig(dtype="fp16"))
    assert not art.manifest.fusion.applied and "fp16" in art.manifest.fusion.reason


def test_fusion_record_round_trips_and_reuse_follows_the_flag(fused_llama, tiny16, tmp_path):
    m = read_manifest(fused_llama.path)
    assert m.format_version == 5 and m.fusion == fused_llama.manifest.fusion
    from echoembed.reference.sources import load_model, resolve_source

    loaded = load_model(resolve_source(str(tiny16["llama"])))
    target = tmp_path / "r"
    first, reused = export_or_reuse(loaded, target)
    assert not reused and first.manifest.fusion.applied
    _, reused = export_or_reuse(loaded, target)
    assert reused
    gqa, reused = export_or_reuse(loaded, target, ExportConfig(onnx_attention=False))
    assert not reused and gqa.manifest.fusion.ops["GroupQueryAttention"] == 2
    _, reused = export_or_reuse(loaded, target, ExportConfig(onnx_attention=False))
    assert reused
    again, reused = export_or_reuse(loaded, target, ExportConfig(fuse=False))
    assert not reused and not again.manifest.fusion.applied


def test_gqa_kept_on_request_equals_onnx_attention(fused_llama, tiny16, tmp_path):
    """``onnx_attention=False`` keeps GroupQueryAttention (opset 18); both graphs embed alike."""
    gqa = export(tiny16["llama"], tmp_path / "g", ExportConfig(onnx_attention=False))
    ops = _ops(gqa.model_path)
    assert ops["GroupQueryAttention"] == 2 and "Attention" not in ops and gqa.manifest.opset == 18
    assert "Attention-23" not in gqa.manifest.fusion.tool
    assert "Attention-23" in fused_llama.manifest.fusion.tool
    texts = _sts_sentences(24)
    got = Embedder.load(fused_llama.path).encode(texts, batch_size=8)
    want = Embedder.load(gqa.path).encode(texts, batch_size=8)
    assert float((got * want).sum(axis=1).min()) >= 0.99999


def test_onnx_attention_refuses_what_it_cannot_rewrite_exactly():
    """A GroupQueryAttention node with a local window, or whose present keys are read, has no
    exact causal ONNX Attention form: the rewrite refuses and leaves the graph as it was."""
    import onnx_ir as ir

    from echoembed.exporter.fusion import FusionNotApplied, to_onnx_attention

    def graph(attributes: dict, read_present: bool):
        x = [ir.Value(name=n) for n in ("q", "k", "v")]
        node = ir.node("GroupQueryAttention", x, attributes=attributes, domain="com.microsoft",
                       num_outputs=3, name="attn")  # fmt: skip
        outs = [node.outputs[0]]
        nodes = [node]
        if read_present:
            ident = ir.node("Identity", [node.outputs[1]], name="reads_present")
            nodes.append(ident)
            outs.append(ident.outputs[0])
        return ir.Model(ir.Graph(x, outs, nodes=nodes, opset_imports={"": 18}), ir_version=10)

    heads = {"num_heads": 4, "kv_num_heads": 2}
    for attributes, read, reason in (
        ({**heads, "local_window_size": 8}, False, "local attention window"),
        (heads, True, "present keys/values are used"),
        ({**heads, "softcap": 30.0}, False, "softcap"),
    ):
        model = graph(attributes, read)
        with pytest.raises(FusionNotApplied, match=reason):
            to_onnx_attention(model)
        assert [n.op_type for n in model.graph][0] == "GroupQueryAttention"
        assert model.opset_imports[""] == 18
    model = graph(heads, False)
    assert to_onnx_attention(model) == 1
    assert [n.op_type for n in model.graph] == ["Attention"] and model.opset_imports[""] == 23


@pytest.mark.parametrize(
    "config",
    [
        Int8DynamicConfig(),
        Int8StaticConfig(),
        Int8BlockwiseConfig(block_size=16),
        Int4WeightOnlyConfig(algorithm="rtn"),
    ],
)
def test_quantizers_work_on_the_fused_graph(fused_llama, config, tmp_path):
    """The quantized graph keeps the fused kernels, and SmoothQuant finds the fused RMSNorm
    groups (q/k/v after input_layernorm, gate/up after post_attention_layernorm)."""
    art = quantize(fused_llama.path, tmp_path / config.recipe, config, SMALL)
    q = art.manifest.quantization
    ops = _ops(art.model_path)
    assert ops["Attention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    if config.recipe in ("int8-dynamic", "int8-static"):
        groups = [s for s in q.smoothed if "+" in s]
        assert len(groups) == 4, q.smoothed  # 2 norm-fed groups per layer
    texts = _sts_sentences(16)
    got = Embedder.load(art.path).encode(texts)
    want = Embedder.load(fused_llama.path).encode(texts)
    assert np.isfinite(got).all() and float((got * want).sum(axis=1).mean()) > 0.9


def test_real_model_is_fused_and_exact(
    smollm2_artifact, smollm2_unfused_artifact, smollm2_reference
):
    """SmolLM2: attention fused in all 30 layers (GroupQueryAttention, then RotaryEmbedding + ONNX
    Attention), RMSNorm fused; on 96 STS-B test sentences in padded batches of 16 the fused
    graph equals the unfused one and the PyTorch reference."""
    f = smollm2_artifact.manifest.fusion
    assert f.applied and f.ops["Attention"] == 30 and f.ops["RotaryEmbedding"] == 60
    assert f.ops["SkipSimplifiedLayerNormalization"] == 60
    assert f.nodes_before > 2000 and f.nodes_after < 500  # measured: 2,186 -> 426 -> 475
    ops = _ops(smollm2_artifact.model_path)
    assert ops["Attention"] == 30 and "GroupQueryAttention" not in ops and "Softmax" not in ops
    texts = _sts_sentences(96)
    fused = Embedder.load(smollm2_artifact.path).encode(texts, batch_size=16)
    plain = Embedder.load(smollm2_unfused_artifact.path).encode(texts, batch_size=16)
    ref = smollm2_reference.encode(texts, "echo", batch_size=16)
    assert float((fused * plain).sum(axis=1).min()) >= 0.99999
    assert float((fused * ref).sum(axis=1).min()) >= 0.99999


def test_a_fused_graph_on_a_gpu_provider_is_warned_about(fused_llama, tiny_artifact):
    from echoembed.runtime.embedder import fused_on_gpu_warning

    m = fused_llama.manifest
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "--no-fuse" in fused_on_gpu_warning(m, cuda)
    assert "Attention" in m.fusion.ops
    assert "refused at run time on CUDA" in fused_on_gpu_warning(m, cuda)
    gqa = dataclasses.replace(
        m, fusion=dataclasses.replace(m.fusion, ops={"GroupQueryAttention": 2})
    )
    assert "run on the CPU" in fused_on_gpu_warning(gqa, cuda)
    assert fused_on_gpu_warning(m, ["CPUExecutionProvider"]) is None
    assert fused_on_gpu_warning(tiny_artifact.manifest, cuda) is None  # not fused


def test_fused_graph_with_external_data(tiny16, fused_llama, tmp_path):
    """Weights in model.onnx.data stay there through the stage, checksummed and loadable."""
    art = export(tiny16["llama"], tmp_path / "x", ExportConfig(external_data=True))
    assert art.manifest.fusion.applied
    assert set(art.manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert not (art.path / ".fusion").exists()
    texts = _sts_sentences(8)
    got = Embedder.load(art.path).encode(texts)
    want = Embedder.load(fused_llama.path).encode(texts)
    assert float((got * want).sum(axis=1).min()) >= 0.99999
