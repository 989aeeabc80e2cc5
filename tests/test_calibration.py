"""Calibration data, quantization recipes (structure on a tiny model), the accuracy budget."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

from echoembed.calibration import (
    CalibrationConfig,
    FixedShapeReader,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
    load_calibration,
    quantize,
    read_texts_any,
    recipe_from_name,
)
from echoembed.errors import AccuracyBudgetError, ArtifactError, InputError, UserError
from echoembed.runtime import Embedder, read_manifest
from tests.helpers import SHARED_DATA, STSB_DEV

SMALL = QuantizeOptions(calibration=CalibrationConfig(samples=12, batch_size=4))


def ops(path):
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_readers_on_real_files(tmp_path):
    sts = read_texts_any(STSB_DEV)
    assert (
        "A man with a hard hat is dancing." in sts and "A man wearing a hard hat is dancing." in sts
    )
    banking = read_texts_any(SHARED_DATA / "banking77" / "test.tsv")
    assert len(banking) > 1000 and all(t.strip() for t in banking)
    corpus = read_texts_any(SHARED_DATA / "scifact" / "corpus.jsonl")
    assert len(corpus) > 5000
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\ntwo\none\n", encoding="utf-8")
    assert read_texts_any(txt) == ["one", "two"]
    bad = tmp_path / "b.tsv"
    bad.write_text("a\tb\nx\ty\n", encoding="utf-8")
    with pytest.raises(InputError, match="sentence1/sentence2 columns"):
        read_texts_any(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_texts_any(tmp_path / "missing.txt")


def test_calibration_split_is_disjoint_and_seeded():
    a = load_calibration(CalibrationConfig(path=STSB_DEV, samples=20, seed=1))
    b = load_calibration(CalibrationConfig(path=STSB_DEV, samples=20, seed=1))
    c = load_calibration(CalibrationConfig(path=STSB_DEV, samples=20, seed=2))
    assert len(a.calibration) == len(a.evaluation) == 20
    assert not set(a.calibration) & set(a.evaluation)
    assert a == b and a.sha256 == b.sha256 and a.sha256 != c.sha256


def test_fixed_shape_reader(smollm2_tokenizer):
    from echoembed.echo import EchoEncoder, EncoderConfig, get_template

    tok, special, _ = smollm2_tokenizer
    enc = EchoEncoder(tok, special, EncoderConfig(get_template("echo")))
    texts = ["short", "a much longer sentence than the first one, with more tokens", "mid size"]
    reader = FixedShapeReader(enc, texts, batch_size=2)
    shapes = []
    while (feed := reader.get_next()) is not None:
        shapes.append({k: v.shape for k, v in feed.items()})
    assert len(shapes) == 2 and all(s == shapes[0] for s in shapes)
    assert shapes[0]["input_ids"] == (2, reader.width)
    reader.rewind()
    assert reader.get_next() is not None


def test_int8_dynamic_structure(tiny_artifact, tmp_path):
    cfg = Int8DynamicConfig(exclude=("*.layers.1.mlp.down_proj/*",))
    start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    art = quantize(tiny_artifact.path, tmp_path / "int8", cfg, SMALL)
    found = ops(art.path / "model.onnx")
    # per-token activation scales (the default): one QuantizeLinear per quantized input; layer
    # 0's up projection skips its row scale (MatMulIntegerToFloat, folded into down_proj's);
    # layer 1's does not: its product feeds the excluded float down_proj, not a quantizer
    assert found.count("MatMulInteger") == 12 and "DynamicQuantizeLinear" not in found
    assert found.count("MatMulIntegerToFloat") == 1
    # q/k/v, o, gate/up and down in each layer, but layer 1's excluded down_proj
    assert found.count("QuantizeLinear") == 2 * 4 - 1
    import onnx

    nodes = onnx.load(str(art.path / "model.onnx")).graph.node
    names = {n.name for n in nodes}
    assert "base.layers.1.mlp.down_proj/MatMul" in names, "excluded layer stays a float MatMul"
    (folded,) = [n.name for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    assert folded.startswith("base.layers.0.mlp.up_proj/"), folded
    q = read_manifest(art.path).quantization
    assert q.recipe == "int8-dynamic" and q.excluded == ("base.layers.1.mlp.down_proj/MatMul",)
    assert q.smoothed[:2] == ("base.layers.0.mlp.down_proj", "base.layers.1.mlp.down_proj")
    assert "base.layers.0.mlp.gate_proj+base.layers.0.mlp.up_proj" in q.smoothed
    assert len(q.smoothed) == 2 + 4  # two MLPs, and q/k/v + gate/up in each of two layers
    assert q.calibration_texts == 12 and q.eval_texts == 12 and q.settings.per_channel is True
    assert 0.9 < q.mean_cosine <= 1.0 + 1e-6 and q.min_cosine <= q.mean_cosine
    assert read_manifest(art.path).precision == "int8-dynamic"
    assert datetime.datetime.fromisoformat(art.manifest.created) >= start, "its own creation time"
    emb = Embedder.load(art.path).encode(["hello world", "kids play"])
    assert emb.shape == (2, 32)


def test_int8_per_token_and_blockwise_do_not_depend_on_the_batch(tiny_artifact, tmp_path):
    """int8-dynamic with per-token activation scales (the default) and int8-blockwise (8-bit
    MatMulNBits, activations quantized per row block): a text embeds the same alone and beside a
    long batch-mate; int8-dynamic with one scale per tensor does not."""
    texts = ["kids play", "a man is slicing a tomato on the board " * 6]
    cfg = Int8BlockwiseConfig(block_size=16)
    art = quantize(tiny_artifact.path, tmp_path / "block", cfg, SMALL)
    found = ops(art.path / "model.onnx")
    assert found.count("MatMulNBits") == 14 and "DynamicQuantizeLinear" not in found
    q = read_manifest(art.path).quantization
    assert q.recipe == "int8-blockwise" and q.smoothed == () and q.settings.block_size == 16
    assert 0.99 < q.mean_cosine <= 1.0 + 1e-6
    token = quantize(tiny_artifact.path, tmp_path / "token", Int8DynamicConfig(), SMALL)
    tensor_cfg = Int8DynamicConfig(activation_scale="tensor")
    tensor = quantize(tiny_artifact.path, tmp_path / "tensor", tensor_cfg, SMALL)
    assert "DynamicQuantizeLinear" in ops(tensor.path / "model.onnx")
    assert read_manifest(token.path).quantization.settings.activation_scale == "token"
    gaps = {}
    for name, path in (("block", art.path), ("token", token.path), ("tensor", tensor.path)):
        emb = Embedder.load(path)
        alone = emb.encode(texts[:1])[0]
        batched = emb.encode(texts, batch_size=2)[0]
        gaps[name] = float(np.abs(alone - batched).max())
    assert gaps["block"] < 1e-5 and gaps["token"] < 1e-5, gaps
    assert gaps["tensor"] > 10 * max(gaps["block"], gaps["token"], 1e-6), gaps


def test_int8_folded_row_scales_match_unfolded(tiny_artifact, tmp_path):
    """``fold_row_scales`` (on by default with per-token scales) moves the up projections' row
    scales into the down projections' scales: the same math but for float rounding, so the
    embeddings agree with the unfolded graph's far inside the quantization error, and stay
    batch-independent. Off, the graph has no MatMulIntegerToFloat."""
    from echoembed.calibration.recipes import resolve_recipe

    assert resolve_recipe(Int8DynamicConfig()).fold_row_scales is True
    assert resolve_recipe(Int8DynamicConfig(activation_scale="tensor")).fold_row_scales is False
    with pytest.raises(UserError, match="fold_row_scales=True needs activation_scale='token'"):
        Int8DynamicConfig(activation_scale="tensor", fold_row_scales=True)
    folded = quantize(tiny_artifact.path, tmp_path / "fold", Int8DynamicConfig(), SMALL)
    cfg = Int8DynamicConfig(fold_row_scales=False)
    plain = quantize(tiny_artifact.path, tmp_path / "plain", cfg, SMALL)
    assert ops(folded.path / "model.onnx").count("MatMulIntegerToFloat") == 2  # 2 up_proj
    assert "MatMulIntegerToFloat" not in ops(plain.path / "model.onnx")
    assert read_manifest(folded.path).quantization.settings.fold_row_scales is True
    assert read_manifest(plain.path).quantization.settings.fold_row_scales is False
    texts = ["kids play", "a man is slicing a tomato on the board " * 6, "two dogs run"]
    a = Embedder.load(folded.path).encode(texts)
    b = Embedder.load(plain.path).encode(texts)
    ref = Embedder.load(tiny_artifact.path).encode(texts)
    cos = (a * b).sum(1)
    assert cos.min() > 0.9999, cos
    # both as close to fp32 as each other
    err_a, err_b = 1 - (a * ref).sum(1), 1 - (b * ref).sum(1)
    assert np.abs(err_a - err_b).max() < 0.5 * max(err_b.max(), 1e-4), (err_a, err_b)


def test_int8_dynamic_uint8_weights(tiny_artifact, tmp_path):
    """u8 x u8: uint8 weights with zero points, never saturating, so no 7-bit weights and no
    integer-kernel refusal on any CPU."""
    import onnx
    from onnx import numpy_helper

    from echoembed.runtime.cpu import runs_u8s8

    art = quantize(tiny_artifact.path, tmp_path / "u8", Int8DynamicConfig(weights="uint8"), SMALL)
    q = read_manifest(art.path).quantization
    assert q.settings.weights == "uint8" and q.settings.reduce_range is False
    assert not runs_u8s8(q.settings) and runs_u8s8(Int8DynamicConfig())
    model = onnx.load(str(art.path / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
    assert len(mm) == 14
    for n in mm:
        w = numpy_helper.to_array(inits[n.input[1]])
        assert w.dtype == np.uint8 and w.max() > 128  # the full 8-bit range
        w_zp = n.input[5 if n.op_type == "MatMulIntegerToFloat" else 3]
        assert numpy_helper.to_array(inits[w_zp]).dtype == np.uint8  # weight zero points
    assert q.mean_cosine > 0.9
    with pytest.raises(UserError, match="weights must be"):
        Int8DynamicConfig(weights="int4")


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_int4_structure(tiny_artifact, tmp_path, algorithm):
    art = quantize(
        tiny_artifact.path, tmp_path / algorithm, Int4WeightOnlyConfig(algorithm=algorithm), SMALL
    )
    found = ops(art.path / "model.onnx")
    assert found.count("MatMulNBits") == 14
    assert found.count("GatherBlockQuantized") == 1 and "Gather" not in found, "4-bit embedding"
    q = art.manifest.quantization
    assert q.recipe == f"int4-{algorithm}" and q.settings.block_size == 32
    assert q.settings.quantize_embedding is True and q.mean_cosine > 0.9


def test_int4_float_embedding(tiny_artifact, tmp_path):
    cfg = Int4WeightOnlyConfig(algorithm="rtn", quantize_embedding=False)
    art = quantize(tiny_artifact.path, tmp_path / "q", cfg, SMALL)
    found = ops(art.path / "model.onnx")
    assert "GatherBlockQuantized" not in found and found.count("Gather") == 1


def test_int8_static_structure(tiny_artifact, tmp_path):
    import onnx
    from onnx import numpy_helper

    cfg = Int8StaticConfig(exclude=("*.layers.1.mlp.down_proj/*",))
    art = quantize(tiny_artifact.path, tmp_path / "s", cfg, SMALL)
    model = onnx.load(str(art.model_path))
    found = [n.op_type for n in model.graph.node]
    # 14 linear layers read 8 distinct inputs (q/k/v and gate/up share theirs); one is excluded
    assert found.count("QuantizeLinear") == 7 and found.count("DequantizeLinear") == 7 + 13
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = [v for k, v in inits.items() if k.endswith(("act_zero", "weight_zero"))]
    assert len(zeros) == 7 + 13 and all(z.dtype == np.int8 and not z.any() for z in zeros)
    w = inits["base.layers.0.mlp.up_proj.weight_int8"]
    scale = inits["base.layers.0.mlp.up_proj.weight_scale"]
    assert w.dtype == np.int8 and np.abs(w).max() == 127 and scale.shape == (w.shape[1],)
    down = next(n for n in model.graph.node if n.name == "base.layers.1.mlp.down_proj/MatMul")
    assert not down.input[0].endswith("/dq"), "the excluded layer reads float activations"
    q = art.manifest.quantization
    assert q.recipe == "int8-static" and q.settings.method == "minmax"
    assert q.excluded == ("base.layers.1.mlp.down_proj/MatMul",) and len(q.smoothed) == 6
    assert q.mean_cosine > 0.99
    emb = Embedder.load(art.path).encode(["hello world", "kids play"])
    assert emb.shape == (2, 32) and np.isfinite(emb).all()
    assert q.settings.reduce_range is False  # int8 activations: never the u8 x s8 kernel
    # uint8 activations on the same grid, 7-bit weights on both sides: the fused u8 x s8 kernel
    # (exact on every CPU with 7-bit weights) against the float-emulated int8 Q/DQ graph
    u8 = quantize(
        tiny_artifact.path, tmp_path / "u8",
        Int8StaticConfig(activations="uint8", reduce_range=True), SMALL,
    )  # fmt: skip
    i8 = quantize(
        tiny_artifact.path, tmp_path / "i8",
        Int8StaticConfig(activations="int8", reduce_range=True), SMALL,
    )  # fmt: skip
    u8_inits = {i.name: i for i in onnx.load(str(u8.model_path)).graph.initializer}
    acts = [i for name, i in u8_inits.items() if "act_zero" in name]
    assert len(acts) == 8 and all(numpy_helper.to_array(i).item() == 128 for i in acts)
    assert acts[0].data_type == onnx.TensorProto.UINT8
    w7 = numpy_helper.to_array(u8_inits["base.layers.0.mlp.up_proj.weight_int8"])
    assert np.abs(w7).max() == 63 and u8.manifest.quantization.settings.reduce_range is True
    assert abs(u8.manifest.quantization.mean_cosine - i8.manifest.quantization.mean_cosine) < 1e-3


def test_static_calibrators_on_known_data():
    from echoembed.calibration.static import BINS, _entropy_threshold

    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=200_000))
    x[:3] = 40.0  # three outliers stretch the min/max range
    hist, _ = np.histogram(x, bins=BINS, range=(0, x.max()))
    thr = _entropy_threshold(hist, x.max() / BINS)
    assert 2.0 < thr < 10.0, "entropy clips the outliers but keeps the Gaussian body"


def test_static_methods_and_cache(tiny_artifact, tmp_path, caplog):
    from echoembed.calibration.static import read_cache

    cache = tmp_path / "cache" / "ranges.json"
    opts = QuantizeOptions(calibration=SMALL.calibration, calibration_cache=cache)
    msgs: list[str] = []
    quantize(tiny_artifact.path, tmp_path / "a", Int8StaticConfig(), opts, progress=msgs.append)
    assert cache.is_file() and any("wrote the calibration cache" in m for m in msgs)
    minmax = json.loads(cache.read_text())["ranges"]
    assert list(cache.parent.iterdir()) == [cache], "atomic write leaves no temp file"
    msgs.clear()
    quantize(tiny_artifact.path, tmp_path / "b", Int8StaticConfig(), opts, progress=msgs.append)
    assert any("from the cache" in m for m in msgs)
    # another calibration sample: the cache is stale, detected and recomputed
    other = QuantizeOptions(
        calibration=CalibrationConfig(samples=12, batch_size=4, seed=7), calibration_cache=cache
    )
    msgs.clear()
    with caplog.at_level("WARNING"):
        quantize(
            tiny_artifact.path, tmp_path / "c", Int8StaticConfig(), other, progress=msgs.append
        )
    assert "is stale (" in caplog.text and "calibration_sha256" in caplog.text
    assert not any("from the cache" in m for m in msgs)
    for method in ("percentile", "entropy"):
        quantize(tiny_artifact.path, tmp_path / method, Int8StaticConfig(method=method), opts)
        ranges = json.loads(cache.read_text())["ranges"]
        assert json.loads(cache.read_text())["key"]["method"] == method
        assert all(0 < ranges[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    cache.write_text("{not json", encoding="utf-8")
    assert read_cache(cache, None) is None


def test_recipe_from_name_overrides():
    assert recipe_from_name("int4-gptq", block_size=64).block_size == 64
    assert recipe_from_name("int8-static", method="entropy", block_size=None).method == "entropy"
    with pytest.raises(UserError, match="no setting 'method'.*int8-static"):
        recipe_from_name("int4-hqq", method="entropy")
    with pytest.raises(UserError, match="unknown recipe"):
        recipe_from_name("int3")


def test_spearman_budget(tiny_artifact, tmp_path):
    # The tiny random model's Spearman is noise (about -33); asymmetric 4-bit recipes happen to
    # gain on it, symmetric RTN loses about 2 points, so a zero budget is missed for certain.
    cfg = Int4WeightOnlyConfig(algorithm="rtn", symmetric=True)
    opts = QuantizeOptions(
        calibration=SMALL.calibration, max_drop=50.0, metric="spearman", sts=STSB_DEV, sts_limit=40
    )
    art = quantize(tiny_artifact.path, tmp_path / "s", cfg, opts)
    q = art.manifest.quantization
    assert q.metric == "spearman" and q.sts_pairs == 40 and q.within_budget
    assert q.parent_sts_spearman is not None and q.sts_spearman is not None
    assert q.parent_sts_spearman - q.sts_spearman <= 50.0
    assert q.sts_spearman < q.parent_sts_spearman - 0.5, "the set-up must lose STS points"
    refuse = QuantizeOptions(
        calibration=SMALL.calibration, max_drop=0.0, metric="spearman", sts=STSB_DEV,
        sts_limit=40, max_float_fraction=0.0,
    )  # fmt: skip
    with pytest.raises(AccuracyBudgetError, match="STS Spearman points"):
        quantize(tiny_artifact.path, tmp_path / "r", cfg, refuse)
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="needs STS pairs"):
        quantize(
            tiny_artifact.path,
            tmp_path / "x",
            Int8DynamicConfig(),
            QuantizeOptions(calibration=SMALL.calibration, max_drop=0.5, metric="spearman"),
        )
    with pytest.raises(UserError, match="Spearman points"):
        QuantizeOptions(max_drop=120.0, metric="spearman")


def test_smoothing_is_exact_in_float(tiny_artifact):
    import onnx
    import onnxruntime as ort

    from echoembed.calibration.graph import input_abs_max, linear_nodes
    from echoembed.calibration.smooth import mlp_pairs, norm_groups, smooth_mlp, smooth_norm_inputs

    model = onnx.load(str(tiny_artifact.model_path))
    rt = Embedder.load(tiny_artifact.path)
    reader = FixedShapeReader(rt.encoder(), ["one text here", "and another, longer text"], 2)
    linear = linear_nodes(model)
    downs = [d.input for _, d in mlp_pairs(model, linear)]
    groups = [lns[0].input for _, lns in norm_groups(model, linear)]
    assert len(downs) == 2 and len(groups) == 4
    amax = input_abs_max(model, downs + groups, reader)
    before = ort.InferenceSession(model.SerializeToString()).run(None, reader.batches[0])[0]
    assert smooth_mlp(model, amax, 0.7) == [
        "base.layers.0.mlp.down_proj",
        "base.layers.1.mlp.down_proj",
    ]
    assert len(smooth_norm_inputs(model, linear, amax, 0.7)) == 4
    after = ort.InferenceSession(model.SerializeToString()).run(None, reader.batches[0])[0]
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_gpt2_gemm_int8(tiny_dirs_gpt2_artifact, tmp_path):
    art = quantize(tiny_dirs_gpt2_artifact.path, tmp_path / "q", Int8DynamicConfig(), SMALL)
    assert art.manifest.quantization.smoothed == ()
    found = ops(art.path / "model.onnx")
    assert found.count("MatMulInteger") == 8 and "Gemm" not in found  # 2 layers x 4 Conv1D
    assert art.manifest.quantization.mean_cosine > 0.9
    q4 = quantize(tiny_dirs_gpt2_artifact.path, tmp_path / "q4", Int4WeightOnlyConfig(), SMALL)
    assert ops(q4.path / "model.onnx").count("MatMulNBits") == 8


def test_budget_search_and_refusal(tiny_artifact, tmp_path):
    opts = QuantizeOptions(calibration=SMALL.calibration, max_drop=0.0, max_float_fraction=0.25)
    target = tmp_path / "refused"
    with pytest.raises(AccuracyBudgetError, match="misses the budget.*no artifact was written"):
        quantize(tiny_artifact.path, target, Int4WeightOnlyConfig(algorithm="rtn"), opts)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    over = QuantizeOptions(
        calibration=SMALL.calibration, max_drop=0.0, max_float_fraction=0.25, allow_over_budget=True
    )
    art = quantize(tiny_artifact.path, target, Int4WeightOnlyConfig(algorithm="rtn"), over)
    q = art.manifest.quantization
    assert not q.within_budget and len(q.excluded) == 3  # 25% of 14 layers
    loose = QuantizeOptions(calibration=SMALL.calibration, max_drop=0.5)
    ok = quantize(tiny_artifact.path, tmp_path / "ok", Int4WeightOnlyConfig(), loose)
    assert ok.manifest.quantization.within_budget and ok.manifest.quantization.excluded == ()


def test_bad_inputs(tiny_artifact, tmp_path):
    with pytest.raises(
        TypeError,
        match="Int8DynamicConfig, Int8StaticConfig, Int8BlockwiseConfig, Int4WeightOnlyConfig",
    ):
        quantize(tiny_artifact.path, tmp_path / "x", {"recipe": "int8"})
    with pytest.raises(ArtifactError, match="matches no linear layer"):
        quantize(tiny_artifact.path, tmp_path / "x", Int8DynamicConfig(exclude=("nope*",)), SMALL)
    with pytest.raises(UserError, match="block_size"):
        Int4WeightOnlyConfig(block_size=20)
    with pytest.raises(UserError, match="max_drop"):
        QuantizeOptions(max_drop=-1)
    q = quantize(tiny_artifact.path, tmp_path / "q", Int4WeightOnlyConfig(algorithm="rtn"), SMALL)
    with pytest.raises(ArtifactError, match="quantize the fp32 artifact"):
        quantize(q.path, tmp_path / "qq", Int8DynamicConfig(), SMALL)
    with pytest.raises(ArtifactError, match="already exists"):
        quantize(tiny_artifact.path, q.path, Int8DynamicConfig(), SMALL)
    assert (
        json.loads((q.path / "manifest.json").read_text())["quantization"]["recipe"] == "int4-rtn"
    )


def test_gemm_rewrite_is_exact(tiny_dirs_gpt2_artifact):
    import onnx
    import onnxruntime as ort

    from echoembed.calibration.graph import gemm_to_matmul, linear_nodes

    model = onnx.load(str(tiny_dirs_gpt2_artifact.model_path))
    feed = Embedder.load(tiny_dirs_gpt2_artifact.path).encoder().encode(["a b c", "hello"]).feed()
    before = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert gemm_to_matmul(model) == 8
    assert all(n.endswith("/MatMul") for n in linear_nodes(model))
    after = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_real_model_int8_and_int4(smollm2_artifact, tmp_path):
    """SmolLM2: INT8 (SmoothQuant) and 4-bit HQQ (embedding table too) against the fp32 artifact
    on STS-B dev texts, and their size.

    Measured here (64 calibration texts): INT8 mean cosine 0.9954 at 0.41x size; 4-bit HQQ 0.9990
    at 0.19x (HQQ re-finds the Q4_1 grid of the bundled checkpoint for the linear layers; the
    4-bit RTN embedding table costs most of the rest). INT8 decides ``reduce_range`` from this
    CPU: with 8-bit weights on an AVX2-only CPU the mean cosine here was 0.969 (saturation).
    """
    opts = QuantizeOptions(calibration=CalibrationConfig(path=STSB_DEV, samples=24, seed=3))
    texts = read_texts_any(STSB_DEV)[-40:]
    want = Embedder.load(smollm2_artifact.path).encode(texts)
    fp32_size = smollm2_artifact.model_path.stat().st_size
    for config, floor, max_size in (
        (Int8DynamicConfig(), 0.99, 0.45),
        (Int4WeightOnlyConfig(), 0.998, 0.2),
    ):
        art = quantize(smollm2_artifact.path, tmp_path / config.recipe, config, opts)
        q = art.manifest.quantization
        assert q.mean_cosine >= floor and q.calibration_texts == 24
        got = Embedder.load(art.path).encode(texts)
        assert float((got * want).sum(axis=1).mean()) >= floor
        assert (art.path / "model.onnx").stat().st_size < max_size * fp32_size


def test_quantize_or_reuse(tiny_artifact, tmp_path):
    from echoembed.calibration.quantize import quantize_or_reuse

    cfg = Int4WeightOnlyConfig(algorithm="rtn")
    first, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "q", cfg, SMALL)
    assert not reused
    again, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "q", cfg, SMALL)
    assert reused and again.manifest == first.manifest
    other = Int4WeightOnlyConfig(algorithm="rtn", block_size=16)
    changed, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "q", other, SMALL)
    assert not reused and changed.manifest.quantization.settings.block_size == 16
    (tmp_path / "q" / "model.onnx").write_bytes(b"damaged")
    fixed, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "q", other, SMALL)
    assert not reused and Embedder.load(fixed.path).encode(["ok"]).shape == (1, 32)
    # reduce_range=None is decided before the comparison: the typed configs compare equal
    from echoembed.calibration.recipes import resolve_recipe

    int8 = Int8DynamicConfig()
    made, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "i8", int8, SMALL)
    assert not reused and made.manifest.quantization.settings == resolve_recipe(int8)
    again, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "i8", int8, SMALL)
    assert reused and isinstance(again.manifest.quantization.settings, Int8DynamicConfig)
    flipped = Int8DynamicConfig(reduce_range=not resolve_recipe(int8).reduce_range)
    _, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "i8", flipped, SMALL)
    assert not reused
    # a manifest that records the parent's opset (as older versions did) is not reused
    path = tmp_path / "q" / "manifest.json"
    data = json.loads(path.read_text())
    assert data["opset"] == 21 and data["opset_imports"] == {"": 21, "com.microsoft": 1}
    data["opset"], data["opset_imports"] = 18, {"": 18}
    path.write_text(json.dumps(data))
    msgs: list[str] = []
    redone, reused = quantize_or_reuse(
        tiny_artifact.path, tmp_path / "q", other, SMALL, progress=msgs.append
    )
    assert not reused and any("does not describe its graph" in m for m in msgs)
    assert read_manifest(redone.path).opset_imports == {"": 21, "com.microsoft": 1}


def test_fp16_recipe(tiny_artifact, tmp_path):
    import onnx

    from echoembed.calibration import Fp16Config

    art = quantize(tiny_artifact.path, tmp_path / "h", Fp16Config(), SMALL)
    model = onnx.load(str(art.model_path))
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= 15  # 14 projections and the embedding table
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT]
    q = art.manifest.quantization
    assert q.recipe == "fp16" and art.manifest.precision == "fp16" and q.mean_cosine > 0.999


def test_int4_gptq_recipe(tiny_artifact, tmp_path):
    cfg = Int4WeightOnlyConfig(algorithm="gptq", exclude=("*.layers.0.mlp.down_proj/*",))
    art = quantize(tiny_artifact.path, tmp_path / "g", cfg, SMALL)
    found = ops(art.path / "model.onnx")
    assert found.count("MatMulNBits") == 13 and found.count("GatherBlockQuantized") == 1
    q = art.manifest.quantization
    assert q.recipe == "int4-gptq" and q.settings.float_zero is True
    assert q.excluded == ("base.layers.0.mlp.down_proj/MatMul",) and q.mean_cosine > 0.9
    with pytest.raises(UserError, match="float_zero needs asymmetric"):
        Int4WeightOnlyConfig(algorithm="gptq", symmetric=True)
    hqq_sym = Int4WeightOnlyConfig(algorithm="hqq", symmetric=True)  # a manifest may say so
    with pytest.raises(UserError, match="HQQ quantizes asymmetrically"):
        quantize(tiny_artifact.path, tmp_path / "h", hqq_sym, SMALL)
    assert not (tmp_path / "h").exists()


def test_ort_preprocess_accepts_the_exported_graph(tiny_artifact, tmp_path):
    """ORT's symbolic shape inference used to fail on the head's ReduceL2 (no handler)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert "ReduceL2" not in ops(tiny_artifact.model_path)
    out = tmp_path / "pre.onnx"
    quant_pre_process(str(tiny_artifact.model_path), str(out))
    model = onnx.load(str(out))
    assert any(v.name == "embedding" for v in model.graph.output)
    feed = Embedder.load(tiny_artifact.path).encoder().encode(["a b c", "hello there"]).feed()
    before = ort.InferenceSession(str(tiny_artifact.model_path)).run(None, feed)[0]
    after = ort.InferenceSession(str(out)).run(None, feed)[0]
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_reduce_range_follows_the_cpu(tmp_path, monkeypatch):
    """7-bit INT8 weights where ONNX Runtime's u8 x s8 kernels saturate (x86-64 without VNNI)."""
    from echoembed.calibration.recipes import resolve_recipe
    from echoembed.runtime import cpu

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "CPUINFO", info)

    def fake(machine: str, flags: str | None):
        cpu.u8s8_saturates.cache_clear()
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
        if flags is None:
            info.unlink(missing_ok=True)
        else:
            info.write_text(
                f"processor\t: 0\nmodel name\t: Test CPU 9\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
            )

    try:
        fake("x86_64", "fpu sse2 avx avx2 fma")
        assert cpu.u8s8_saturates()
        assert resolve_recipe(Int8DynamicConfig()).reduce_range is True
        assert resolve_recipe(Int8StaticConfig(activations="uint8")).reduce_range is True
        assert resolve_recipe(Int8StaticConfig(activations="int8")).reduce_range is False
        assert resolve_recipe(Int8DynamicConfig(reduce_range=False)).reduce_range is False
        fake("x86_64", "avx2 avx512f avx512bw avx512_vnni")
        assert not cpu.u8s8_saturates()
        assert resolve_recipe(Int8DynamicConfig()).reduce_range is False
        fake("x86_64", "avx2 avx_vnni")
        assert not cpu.u8s8_saturates()
        assert cpu.cpu_model() == "Test CPU 9"
        assert cpu.cpu_id() == (
            "has avx2 avx_vnni; lacks avx512f avx512_vnni avx512_bf16 amx_int8"
        )  # no vendor, family or model lines in this fake cpuinfo
        info.write_text("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n")
        assert cpu.cpu_id() == "AuthenticAMD family 25 model 1"  # no flags line
        fake("x86_64", None)  # flags unreadable: assume the worst
        assert cpu.u8s8_saturates()
        assert cpu.cpu_model() is None and cpu.cpu_id() is None
        fake("aarch64", None)
        assert not cpu.u8s8_saturates()
        hqq = Int4WeightOnlyConfig()
        assert resolve_recipe(hqq) is hqq
    finally:
        cpu.u8s8_saturates.cache_clear()
    with pytest.raises(UserError, match="applies to: int8-dynamic, int8-static"):
        recipe_from_name("int4-hqq", reduce_range=True)


def test_saturating_cpu_warns_on_8bit_int8(tiny_artifact, tmp_path, monkeypatch, caplog):
    from echoembed.runtime import embedder

    tiny = tiny_artifact.path
    full = quantize(tiny, tmp_path / "w8", Int8DynamicConfig(reduce_range=False), SMALL)
    seven = quantize(tiny, tmp_path / "w7", Int8DynamicConfig(reduce_range=True), SMALL)
    for saturates, path, warned in (
        (True, full.path, True),
        (True, seven.path, False),
        (False, full.path, False),
        (True, tiny_artifact.path, False),  # fp32
    ):
        monkeypatch.setattr(embedder, "u8s8_saturates", lambda s=saturates: s)
        caplog.clear()
        with caplog.at_level("WARNING", logger="echoembed.runtime.embedder"):
            Embedder.load(path)
        assert ("no VNNI" in caplog.text) is warned, (saturates, path)
        if warned:
            assert "--reduce-range" in caplog.text


def _int4_weights(model) -> dict[str, tuple]:
    """MatMul node name -> (its DequantizeLinear, INT4 initializer, dequantized weight)."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq_of = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in dq_of:
            dq = dq_of[node.input[1]]
            w = inits[dq.input[0]]
            assert w.data_type == onnx.TensorProto.INT4, node.name
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            q = numpy_helper.to_array(w).astype(np.float32)
            s = numpy_helper.to_array(inits[dq.input[1]])
            deq = q * np.repeat(s, attrs["block_size"], axis=0)
            out[node.name] = (dq, w, deq)
    return out


def test_int4_qdq_structure(tiny_artifact, tmp_path):
    """int4-qdq: INT4 -> DequantizeLinear(axis 0, block_size, no zero point) -> MatMul on every
    linear layer, standard ONNX only, float embedding table; ORT's CPU provider runs it (and
    fuses each pair into MatMulNBits)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from echoembed.calibration import Int4QdqConfig
    from echoembed.calibration.graph import linear_nodes

    art = quantize(tiny_artifact.path, tmp_path / "q", Int4QdqConfig(), SMALL)
    model = onnx.load(str(art.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {imp.domain: imp.version for imp in model.opset_import} == {"": 21}
    assert art.manifest.opset == 21 and art.manifest.opset_imports == {"": 21}
    inits = {i.name: i for i in model.graph.initializer}
    weights = _int4_weights(model)
    assert len(weights) == 14 and not linear_nodes(model), "no float linear weight is left"
    parent = onnx.load(str(tiny_artifact.model_path))
    floats = {i.name: numpy_helper.to_array(i) for i in parent.graph.initializer}
    for name, ln in linear_nodes(parent).items():
        dq, w, deq = weights[name]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32} and len(dq.input) == 2, "no zero point"
        q = numpy_helper.to_array(w).astype(np.int8)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        k, n = q.shape
        assert scale.shape == (k // 32, n) and (scale > 0).all() and q.min() >= -8
        want = floats[ln.weight]
        assert want.shape == (k, n)
        step = np.repeat(scale, 32, axis=0)
        assert np.all(np.abs(deq - want) <= step / 2 + 1e-6), f"{name}: round to nearest"
    table = inits["base.embed_tokens.weight"]
    assert table.data_type == onnx.TensorProto.FLOAT, "the embedding table stays float"
    assert [n.op_type for n in model.graph.node].count("Gather") == 1
    q = art.manifest.quantization
    assert q.recipe == art.manifest.precision == "int4-qdq" and q.settings == Int4QdqConfig()
    assert q.mean_cosine > 0.99 and q.smoothed == ()
    texts = read_texts_any(STSB_DEV)[:16]
    want = Embedder.load(tiny_artifact.path).encode(texts)
    got = Embedder.load(art.path, providers=["CPUExecutionProvider"]).encode(texts)
    cos = (got * want).sum(axis=1)
    assert cos.mean() > 0.99 and cos.min() > 0.98, cos
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art.model_path), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("MatMulNBits") == 14 and "DequantizeLinear" not in fused


def test_int4_qdq_grid_and_packing():
    """Signed RTN on TensorRT's INT4 grid: positive scales, each the smallest whose -8..7 holds
    its block; the packed INT4 bytes read back as the same values through onnx."""
    from onnx import TensorProto, helper, numpy_helper

    from echoembed.calibration.int4qdq import pack_int4, rtn_int4

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 6)).astype(np.float32)
    w[:16, 0] = 0.0  # an all-zero block gets a positive scale too
    w[16:32, 1] = np.linspace(-1.0, 0.5, 16)  # the negative end is the larger: -8 * scale
    q, scale = rtn_int4(w, 16)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    assert scale.shape == (4, 6) and (scale > 0).all()
    assert scale[1, 1] == pytest.approx(1.0 / 8) and q[16, 1] == -8
    blocks = w.reshape(4, 16, 6)
    tight = np.maximum(blocks.max(axis=1) / 7, -blocks.min(axis=1) / 8)
    np.testing.assert_allclose(scale[tight > 0], tight[tight > 0], rtol=1e-6)
    err = np.abs(q * np.repeat(scale, 16, axis=0) - w)
    assert np.all(err <= np.repeat(scale, 16, axis=0) / 2 + 1e-7)
    for shape in ((64, 6), (3, 5)):  # an odd count pads the last byte
        vals = rng.integers(-8, 8, size=shape).astype(np.int8)
        t = helper.make_tensor("t", TensorProto.INT4, list(shape), pack_int4(vals), raw=True)
        np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), vals)


def test_int4_qdq_gptq_and_refusals(tiny_artifact, tmp_path):
    import onnx

    from echoembed.calibration import Int4QdqConfig

    cfg = Int4QdqConfig(algorithm="gptq", block_size=16, exclude=("*.layers.0.mlp.down_proj/*",))
    art = quantize(tiny_artifact.path, tmp_path / "g", cfg, SMALL)
    weights = _int4_weights(onnx.load(str(art.model_path)))
    assert len(weights) == 13 and "base.layers.0.mlp.down_proj/MatMul" not in weights
    from onnx import helper

    blocks = {helper.get_attribute_value(a) for dq, _, _ in weights.values() for a in dq.attribute
              if a.name == "block_size"}  # fmt: skip
    assert blocks == {16}
    q = art.manifest.quantization
    assert q.settings == cfg and q.excluded == ("base.layers.0.mlp.down_proj/MatMul",)
    assert q.mean_cosine > 0.99
    assert recipe_from_name("int4-qdq", algorithm="gptq").algorithm == "gptq"
    with pytest.raises(UserError, match="no setting 'accuracy_level'"):
        recipe_from_name("int4-qdq", accuracy_level=4)
    with pytest.raises(UserError, match="algorithm must be 'rtn' or 'gptq'"):
        Int4QdqConfig(algorithm="hqq")
    # the tiny model's q/k/v/o/gate/up read K = 32: a 64-row block does not divide it
    with pytest.raises(UserError, match="block_size 64 does not divide.*12 layers"):
        quantize(tiny_artifact.path, tmp_path / "b", Int4QdqConfig(block_size=64), SMALL)
    assert not (tmp_path / "b").exists()


def test_int4_qdq_budget_search_and_reuse(tiny_artifact, tmp_path):
    import onnx

    from echoembed.calibration import Int4QdqConfig
    from echoembed.calibration.graph import linear_nodes
    from echoembed.calibration.quantize import quantize_or_reuse

    over = QuantizeOptions(
        calibration=SMALL.calibration, max_drop=0.0, max_float_fraction=0.25, allow_over_budget=True
    )
    art = quantize(tiny_artifact.path, tmp_path / "q", Int4QdqConfig(), over)
    q = art.manifest.quantization
    assert not q.within_budget and len(q.excluded) == 3  # 25% of 14 layers
    model = onnx.load(str(art.model_path))
    assert set(linear_nodes(model)) == set(q.excluded), "the searched layers stay float MatMuls"
    assert len(_int4_weights(model)) == 11
    cfg = Int4QdqConfig(block_size=16)
    first, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "r", cfg, SMALL)
    again, reused_again = quantize_or_reuse(tiny_artifact.path, tmp_path / "r", cfg, SMALL)
    assert not reused and reused_again and again.manifest == first.manifest
    _, reused = quantize_or_reuse(tiny_artifact.path, tmp_path / "r", Int4QdqConfig(), SMALL)
    assert not reused, "another block size is another artifact"


def test_int4_qdq_cli(tiny_artifact, tmp_path, capsys):
    from echoembed.cli.main import main

    base = ["quantize", str(tiny_artifact.path), "--samples", "8", "--recipe"]
    rc = main(base[:2] + [str(tmp_path / "g"), *base[2:], "int4-qdq", "--algorithm", "gptq",
                          "--block-size", "16"])  # fmt: skip
    assert rc == 0 and "precision        int4-qdq, opset 21" in capsys.readouterr().out
    settings = read_manifest(tmp_path / "g").quantization.settings
    assert (settings.algorithm, settings.block_size) == ("gptq", 16)
    rc = main(base[:2] + [str(tmp_path / "h"), *base[2:], "int4-hqq", "--algorithm", "gptq"])
    assert rc == 2 and "--algorithm applies to int4-qdq" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
