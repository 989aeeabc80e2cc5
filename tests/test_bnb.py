"""bitsandbytes int8 / nf4 comparators of the PyTorch reference (CPU)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from echoembed.echo import Runner
from echoembed.errors import MissingDependencyError
from echoembed.reference import (
    BnbConfig,
    BnbConfigError,
    BnbEmbedder,
    ReferenceEmbedder,
    TorchRunner,
    quantize_bnb,
)
from echoembed.reference.bnb import require_bnb
from tests.helpers import SAMPLE_TEXTS, STSB_DEV

# Measured on the tiny random Llama (hidden 32), mean pooling: int8 cosine >= 0.99997,
# nf4 >= 0.967 (mean 0.985). The floors leave room for other CPUs / kernels.
FLOORS = {"int8": 0.9995, "nf4": 0.95}


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir):
    return ReferenceEmbedder.load(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_llama64_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama whose Linear shapes the fused AVX512-BF16 nf4 kernel accepts (hidden 64)."""
    import torch
    from transformers import AutoModel, LlamaConfig

    from tests.tiny_models import COMMON

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 64, "intermediate_size": 128})
    out = tmp_path_factory.mktemp("tiny-llama64")
    AutoModel.from_config(config).save_pretrained(out)
    smollm2_tokenizer[2].save_pretrained(out)
    return out


def _linear_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


@pytest.mark.parametrize(("mode", "bnb_class"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_tiny_model_quantizes_and_stays_close(tiny_reference, mode, bnb_class):
    bnb = require_bnb()

    fp32 = tiny_reference.encode(SAMPLE_TEXTS, "echo")
    q = BnbEmbedder.from_reference(tiny_reference, BnbConfig(mode))
    assert q.name == f"bnb-{mode}" and q.config.mode == mode
    assert _linear_types(q.loaded.model) == {bnb_class}  # every Linear, none left in fp32
    q_proj = q.loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, getattr(bnb.nn, bnb_class))
    assert str(q_proj.weight.dtype) == ("torch.int8" if mode == "int8" else "torch.uint8")
    assert not hasattr(q.loaded.model, "lm_head")
    emb = q.encode(SAMPLE_TEXTS, "echo")
    assert emb.shape == (5, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    cos = (emb * fp32).sum(axis=1)
    assert cos.min() > FLOORS[mode], cos
    assert cos.min() < 1 - 1e-7  # really quantized, not the fp32 weights
    # the fp32 reference shares tensors with the copy but is left untouched
    np.testing.assert_array_equal(tiny_reference.encode(SAMPLE_TEXTS, "echo"), fp32)
    assert _linear_types(tiny_reference.loaded.model) == {"Linear"}


def test_runner_interface_and_pooling(tiny_reference):
    q = BnbEmbedder.from_reference(tiny_reference, BnbConfig("int8"))
    runner = q.runner("last")
    assert isinstance(runner, TorchRunner) and isinstance(runner, Runner)
    enc = q.encoder("echo")
    batch = enc.pad(enc.encode_ids(SAMPLE_TEXTS[:3]))
    out = runner.encode(batch)
    assert out.shape == (3, 32) and out.dtype == np.float32
    last = q.encode(SAMPLE_TEXTS, "echo", pooling="last")
    ref_last = tiny_reference.encode(SAMPLE_TEXTS, "echo", pooling="last")
    assert (last * ref_last).sum(axis=1).min() > FLOORS["int8"]
    batched = q.encode(SAMPLE_TEXTS, "echo", batch_size=4)
    single = np.stack([q.encode([t], "echo")[0] for t in SAMPLE_TEXTS])
    np.testing.assert_allclose(batched, single, atol=2e-3)


def test_load_from_hf_directory_nf4_options(tiny_llama_dir, tiny_reference):
    cfg = BnbConfig("nf4", compute_dtype="bfloat16", double_quant=True)
    q = BnbEmbedder.load(tiny_llama_dir, config=cfg)
    assert q.name == "bnb-nf4-dq-bf16" and q.loaded.architecture == "llama"
    weight = q.loaded.model.layers[0].mlp.up_proj.weight
    assert weight.quant_state.nested  # double quant: the block scales are quantized too
    assert str(q.loaded.model.norm.weight.dtype) == "torch.bfloat16"
    emb = q.encode(SAMPLE_TEXTS, "echo")
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    cos = (emb * tiny_reference.encode(SAMPLE_TEXTS, "echo")).sum(axis=1)
    assert cos.min() > FLOORS["nf4"], cos


def test_nf4_cpu_kernel_shapes(tiny_reference, tiny_llama64_dir):
    # Where the CPU has AVX512-BF16, nf4 layers repack for a fused kernel on the first
    # inference call; it cannot take in_features % 64 or out_features % 32 != 0 (most of the
    # hidden-32 model): those layers must keep the plain path instead of crashing.
    bnb = require_bnb()

    fused = bool(bnb.functional.has_avx512bf16())
    ref64 = ReferenceEmbedder.load(tiny_llama64_dir)
    for ref, hidden in ((tiny_reference, 32), (ref64, 64)):
        q = BnbEmbedder.from_reference(ref, BnbConfig("nf4"))
        emb = q.encode(SAMPLE_TEXTS, "echo")
        assert emb.shape == (5, hidden) and np.isfinite(emb).all()
        assert (emb * ref.encode(SAMPLE_TEXTS, "echo")).sum(axis=1).min() > FLOORS["nf4"]
        layers = [m for m in q.loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        for m in layers:
            ok = fused and m.in_features % 64 == 0 and m.out_features % 32 == 0
            packed = getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            assert bool(m.support_avx512bf16_for_cpu) == ok and bool(packed) == ok
        if hidden == 64:
            assert all(m.support_avx512bf16_for_cpu for m in layers) == fused


def test_config_validation():
    assert BnbConfig().name == "bnb-int8" and BnbConfig("nf4").name == "bnb-nf4"
    with pytest.raises(BnbConfigError, match="int8' or 'nf4"):
        BnbConfig("fp4")  # type: ignore[arg-type]
    with pytest.raises(BnbConfigError, match="nf4 only"):
        BnbConfig("int8", double_quant=True)
    with pytest.raises(BnbConfigError, match="compute_dtype"):
        BnbConfig("nf4", compute_dtype="float16")  # type: ignore[arg-type]


def test_already_quantized_model_is_refused(tiny_reference):
    q = BnbEmbedder.from_reference(tiny_reference, BnbConfig("int8"))
    with pytest.raises(BnbConfigError, match="already quantized"):
        quantize_bnb(q.loaded, BnbConfig("nf4"))


def test_missing_bitsandbytes_gives_install_hint(monkeypatch, tiny_llama_dir, tiny_reference):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'echoembed\[bnb\]'"):
        BnbEmbedder.load(tiny_llama_dir, config=BnbConfig("nf4"))
    with pytest.raises(MissingDependencyError, match="bitsandbytes is required"):
        quantize_bnb(tiny_reference.loaded)


@pytest.mark.slow
def test_smollm2_bnb_close_to_fp32(smollm2_reference):
    from echoembed.calibration import read_texts_any

    texts = read_texts_any(STSB_DEV)[:32]
    fp32 = smollm2_reference.encode(texts, "echo", batch_size=32)
    # measured (32 STS-B dev sentences, echo, mean): int8 0.9958 mean, nf4 0.959 mean
    for mode, floor in (("int8", 0.99), ("nf4", 0.93)):
        q = BnbEmbedder.from_reference(smollm2_reference, BnbConfig(mode))
        cos = (q.encode(texts, "echo", batch_size=32) * fp32).sum(axis=1)
        assert cos.mean() >= floor, (mode, cos.mean(), cos.min())
