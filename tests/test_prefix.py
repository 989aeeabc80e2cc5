"""Shared-prefix reuse (``ExportConfig(prefix_reuse=True)``): the template's constant leading
tokens are computed once at export time and baked into the graph; embeddings stay those of the
whole prompt (mean and last pooling, fused and traced routes, real and tiny models), and the
runtime refuses templates that do not start with the baked tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from echoembed.artifact import FORMAT_VERSION, Manifest, PrefixInfo, describe, read_manifest
from echoembed.calibration import CalibrationConfig, Int8DynamicConfig, QuantizeOptions, quantize
from echoembed.echo import (
    EchoEncoder,
    EncodedBatch,
    EncoderConfig,
    Pooling,
    get_template,
    l2_normalize,
    leading_fixed_ids,
    strip_prefix,
)
from echoembed.errors import InputError
from echoembed.exporter import ExportConfig, export, export_or_reuse
from echoembed.exporter.architectures import ARCHITECTURES
from echoembed.runtime import Embedder
from echoembed.validation.sts import read_sts
from tests.helpers import STSB_TEST
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

# <|im_start|>Rewrite the sentence:  (SmolLM2's BOS, then the echo template's instruction)
ECHO_PREFIX = (1, 66, 846, 16064, 260, 6330, 42)
# a custom template that starts with the same tokens (its own second line)
SAME_START = "%%bos%%Rewrite the sentence:{! %%text%%}\nOnce more:{ %%text%%}"
SMALL = QuantizeOptions(calibration=CalibrationConfig(samples=12, batch_size=4))


def _sentences(n: int, step: int = 1) -> list[str]:
    return read_sts(STSB_TEST).unique_sentences()[: n * step : step]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((l2_normalize(a) * l2_normalize(b)).sum(axis=1).min())


def _encoder(smollm2_tokenizer, template: str) -> EchoEncoder:
    tok, special, _ = smollm2_tokenizer
    return EchoEncoder(tok, special, EncoderConfig(get_template(template), context_length=512))


# --- the prefix of each template and the runtime's check --------------------------------------


@pytest.mark.parametrize(
    "template, ids",
    [
        ("echo", ECHO_PREFIX),
        ("classical", (1, 35658, 535, 42, 216)),  # "<|im_start|>Sentence: "
        ("document", (1, 24217, 42)),
        # "<|im_start|>Instruct:"; the capped {!%%prompt%%,} piece is never baked
        ("query", (1, 6744, 961, 42)),
    ],
)
def test_leading_fixed_ids_golden(smollm2_tokenizer, template, ids):
    enc = _encoder(smollm2_tokenizer, template)
    assert leading_fixed_ids(enc.plan()) == ids
    rows = enc.encode_ids(_sentences(20))
    assert all(tuple(r.ids[: len(ids)]) == ids for r in rows)
    assert all(not any(r.pool_flags[: len(ids)]) for r in rows)


def test_strip_prefix_slices_and_checks(smollm2_tokenizer):
    enc = _encoder(smollm2_tokenizer, "echo")
    batch = enc.encode(["A man is playing the guitar.", "Kids play."])
    rem = strip_prefix(batch, ECHO_PREFIX)
    p = len(ECHO_PREFIX)
    assert rem.input_ids.shape == (2, batch.input_ids.shape[1] - p)
    np.testing.assert_array_equal(rem.input_ids, batch.input_ids[:, p:])
    np.testing.assert_array_equal(rem.pool_mask, batch.pool_mask[:, p:])
    assert rem.pool_mask.sum() == batch.pool_mask.sum()  # nothing pooled was dropped
    assert strip_prefix(batch, ()) is batch
    other = _encoder(smollm2_tokenizer, "query").encode(["A man is playing the guitar."])
    with pytest.raises(InputError, match=r"row 0 .* 7 prefix ids"):
        strip_prefix(other, ECHO_PREFIX)
    pooled = dataclasses.replace(batch, pool_mask=batch.pool_mask.copy())
    pooled.pool_mask[1, 3] = 1
    with pytest.raises(InputError, match="row 1"):
        strip_prefix(pooled, ECHO_PREFIX)
    narrow = EncodedBatch(
        batch.input_ids[:, :p], batch.attention_mask[:, :p], batch.pool_mask[:, :p],
        batch.truncated,
    )  # fmt: skip
    with pytest.raises(InputError, match="tokens wide"):
        strip_prefix(narrow, ECHO_PREFIX)


def test_manifest_format_5_round_trips_the_prefix(tiny_artifact):
    m = dataclasses.replace(
        tiny_artifact.manifest,
        prefix=PrefixInfo(
            "echo", "<|im_start|>Rewrite the sentence:", ECHO_PREFIX, "gqa-capture", 1e-7
        ),  # fmt: skip
    )
    data = json.loads(m.to_json())
    assert FORMAT_VERSION == 5 and data["format_version"] == 5
    assert data["prefix"]["ids"] == list(ECHO_PREFIX) and data["prefix"]["method"] == "gqa-capture"
    again = Manifest.from_dict(data)
    assert again == m and again.prefix_ids == ECHO_PREFIX
    assert "prefix           7 tokens of template 'echo'" in describe(again)
    old = {k: v for k, v in data.items() if k != "prefix"} | {"format_version": 4}
    assert Manifest.from_dict(old).prefix is None and Manifest.from_dict(old).prefix_ids == ()


# --- tiny models: the traced route on every architecture, the fused route on head size 16 ----


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("prefix-tiny")
    return {mt: save_tiny_model(mt, root / mt, smollm2_tokenizer[2]) for mt in TINY_CONFIGS}


def _whole_vs_prefix(src, tmp_path, pooling: str, **kw):
    """(whole-prompt artifact, prefix artifact) of the same weights and settings."""
    whole = export(src, tmp_path / "whole", ExportConfig(pooling=pooling, **kw))
    pref = export(src, tmp_path / "prefix", ExportConfig(pooling=pooling, prefix_reuse=True, **kw))
    return whole, pref


def test_every_architecture_is_covered():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_traced_route_on_every_architecture(model_type, tiny_dirs, tmp_path):
    """The prefix graph embeds as the PyTorch reference computes the whole prompt (mean pooling;
    last pooling for Llama and GPT-2, whose learned positions must shift too), on padded batches
    of real sentences; the manifest records the prefix."""
    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(str(tiny_dirs[model_type]))
    poolings = ["mean", "last"] if model_type in ("llama", "gpt2") else ["mean"]
    texts = _sentences(24, step=7)
    for pooling in poolings:
        config = ExportConfig(pooling=pooling, prefix_reuse=True, fuse=False)
        art = export(ref.loaded, tmp_path / pooling, config)
        m = art.manifest
        assert m.prefix is not None and m.prefix.ids == ECHO_PREFIX, model_type
        assert m.prefix.method == "torch-cache" and m.prefix.template == "echo"
        assert m.prefix.max_abs_diff < 1e-5 and m.parity.passed
        got = Embedder.load(art.path).encode(texts, batch_size=8)
        want = ref.encode(texts, batch_size=8, pooling=pooling)
        assert _min_cosine(got, want) >= 0.99999, (model_type, pooling)


@pytest.fixture(scope="module")
def tiny16_llama(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama with head size 16: the fused stage applies (GroupQueryAttention)."""
    import torch
    from transformers import AutoModel

    config = TINY_CONFIGS["llama"]()
    config.hidden_size, config.head_dim = 64, 16
    out = tmp_path_factory.mktemp("prefix-tiny16") / "llama"
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    smollm2_tokenizer[2].save_pretrained(out)
    return out


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_fused_route_matches_whole_prompts(tiny16_llama, tmp_path, pooling):
    whole, pref = _whole_vs_prefix(tiny16_llama, tmp_path, pooling)
    assert whole.manifest.fusion.applied and pref.manifest.fusion.applied
    assert pref.manifest.prefix.method == "gqa-capture"
    texts = _sentences(40, step=11)
    for bs in (1, 5, 16):
        a = Embedder.load(whole.path).encode(texts, batch_size=bs)
        b = Embedder.load(pref.path).encode(texts, batch_size=bs)
        assert _min_cosine(a, b) >= 0.99999, (pooling, bs)


def test_template_check_at_runtime(tiny_dirs, tmp_path):
    art = export(tiny_dirs["llama"], tmp_path / "a", ExportConfig(prefix_reuse=True))
    emb = Embedder.load(art.path)
    with pytest.raises(InputError) as e:
        emb.encode(["A man is playing the guitar."], template="query")
    msg = str(e.value)  # names both templates and both texts, and the fix
    assert "'query'" in msg and "'echo'" in msg and "Rewrite the sentence:" in msg
    assert "Instruct:" in msg and "--prefix-reuse" in msg
    # a template that starts with the same tokens is exact (the prefix depends on them only)
    whole = export(tiny_dirs["llama"], tmp_path / "w", ExportConfig())
    texts = _sentences(6)
    got = emb.encode(texts, template=SAME_START)
    want = Embedder.load(whole.path).encode(texts, template=SAME_START)
    assert _min_cosine(got, want) >= 0.99999
    # the runner checks rows too (an EncodedBatch built by hand with another template)
    other = Embedder.load(whole.path).encoder("document").encode(texts)
    with pytest.raises(InputError, match="prefix ids"):
        emb.runner.encode(other)


def test_quantized_and_reused_artifacts_keep_the_prefix(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2"]
    art = export(src, tmp_path / "a", ExportConfig(prefix_reuse=True))
    # SmoothQuant runs the calibration reader through the prefix graph; the evaluator scores
    # candidates through it too (fed whole prompts, the recorded cosine would be far lower)
    q = quantize(art.path, tmp_path / "q", Int8DynamicConfig(smooth_alpha=0.5), SMALL)
    assert q.manifest.prefix == art.manifest.prefix and q.manifest.quantization.smoothed
    assert read_manifest(q.path).prefix_ids == ECHO_PREFIX
    texts = _sentences(32, step=5)
    a = Embedder.load(art.path).encode(texts)
    b = Embedder.load(q.path).encode(texts)
    cos = (l2_normalize(a) * l2_normalize(b)).sum(axis=1)
    assert cos.min() > 0.95  # INT8 of a random tiny model: close, not exact
    assert abs(q.manifest.quantization.mean_cosine - cos.mean()) < 1e-3  # 9e-6 measured
    from echoembed.reference.sources import load_model, resolve_source

    loaded = load_model(resolve_source(str(src)))
    same, reused = export_or_reuse(loaded, art.path, ExportConfig(prefix_reuse=True))
    assert reused and same.manifest.prefix == art.manifest.prefix
    again, reused = export_or_reuse(loaded, art.path, ExportConfig())
    assert not reused and again.manifest.prefix is None


def test_template_without_constant_start_is_refused(tiny_dirs, tmp_path):
    from echoembed.errors import ExportError

    with pytest.raises(ExportError, match="no constant leading tokens"):
        config = ExportConfig(template="{!%%text%%} again:{%%text%%}", prefix_reuse=True)
        export(tiny_dirs["llama"], tmp_path / "a", config)
    assert not (tmp_path / "a").exists()


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_prefix_artifact(tmp_path_factory, smollm2_reference):
    out = tmp_path_factory.mktemp("smollm2-prefix") / "a"
    return export(smollm2_reference.loaded, out, ExportConfig(prefix_reuse=True))


def test_real_model_fused_prefix_is_exact(smollm2_prefix_artifact, smollm2_artifact,
                                          smollm2_reference):  # fmt: skip
    """SmolLM2 (fused, GroupQueryAttention): the prefix artifact embeds as the whole-prompt
    artifact and the PyTorch reference on STS-B test sentences spread over the file."""
    m = smollm2_prefix_artifact.manifest
    assert m.prefix.ids == ECHO_PREFIX and m.prefix.method == "gqa-capture"
    assert m.prefix.text == "<|im_start|>Rewrite the sentence:"
    assert m.fusion.applied and m.parity.passed and m.parity.max_abs_diff < 1e-5
    texts = _sentences(64, step=37)
    pref = Embedder.load(smollm2_prefix_artifact.path).encode(texts, batch_size=16)
    whole = Embedder.load(smollm2_artifact.path).encode(texts, batch_size=16)
    ref = smollm2_reference.encode(texts, batch_size=16)
    assert _min_cosine(pref, whole) >= 0.99999
    assert _min_cosine(pref, ref) >= 0.99999
    assert pref.shape == (64, 576) and np.isfinite(pref).all()


def test_real_model_last_pooling_in_pytorch(smollm2_reference):
    """Last-token pooling with the prefix's cache (the module the traced route exports) equals
    the whole prompt on the real model (the ONNX graph pools as the module does)."""
    import torch

    from echoembed.exporter.head import EchoEmbeddingModel, PrefixEchoModel, prefix_cache

    base = smollm2_reference.loaded.model
    enc = smollm2_reference.encoder("echo")
    for pooling in (Pooling.LAST, Pooling.MEAN):
        whole = EchoEmbeddingModel(base, pooling).eval()
        pref = PrefixEchoModel(base, pooling, True, prefix_cache(base, ECHO_PREFIX)).eval()
        batch = enc.encode(_sentences(24, step=50))
        rem = strip_prefix(batch, ECHO_PREFIX)
        with torch.inference_mode():
            a = whole(*(torch.from_numpy(x) for x in batch.feed().values())).numpy()
            b = pref(*(torch.from_numpy(x) for x in rem.feed().values())).numpy()
        assert _min_cosine(a, b) >= 0.99999, pooling


def test_cli_export_prefix_reuse(tiny_dirs, tmp_path, capsys):
    from echoembed.cli.main import main

    out = tmp_path / "a"
    assert main(["export", str(tiny_dirs["llama"]), str(out), "--prefix-reuse", "--no-fuse"]) == 0
    assert read_manifest(out).prefix_ids == ECHO_PREFIX
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix           7 tokens of template 'echo'" in text and "torch-cache" in text


def test_fp16_export_uses_the_traced_route(tiny_dirs, tmp_path):
    """fp16 graphs are never fused: the prefix's fp16 cache is traced in, within fp16's tolerance
    of the whole prompt."""
    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(str(tiny_dirs["llama"]))
    art = export(ref.loaded, tmp_path / "h", ExportConfig(dtype="fp16", prefix_reuse=True))
    assert art.manifest.prefix.method == "torch-cache" and art.manifest.precision == "fp16"
    texts = _sentences(12, step=9)
    got = Embedder.load(art.path).encode(texts)
    assert _min_cosine(got, ref.encode(texts)) > 0.999
