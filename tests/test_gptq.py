"""GPTQ into MatMulNBits: packing matches onnxruntime, GPTQ beats RTN, a whole graph works."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.calibration.gptq import (
    collect_hessians,
    dequantize,
    gptq_quantize,
    gptq_weight,
    to_matmulnbits,
)
from echoembed.calibration.graph import LinearNode, linear_nodes


def rtn(w: np.ndarray, block: int, symmetric: bool = False, float_zero: bool = False):
    """Plain round-to-nearest 4-bit codes per block of rows (the range holds 0 unless
    ``float_zero``: then plain min/max and a fractional zero point)."""
    k, n = w.shape
    groups = -(-k // block)
    codes = np.empty((k, n), np.uint8)
    scales = np.empty((groups, n), np.float32)
    zeros = np.empty((groups, n), np.float32 if float_zero else np.uint8)
    for g in range(groups):
        rows = w[g * block : (g + 1) * block]
        if symmetric:
            scale = np.abs(rows).max(axis=0) / 8.0
            zero = np.full(n, 8.0)
        elif float_zero:
            scale = (rows.max(axis=0) - rows.min(axis=0)) / 15.0
            zero = -rows.min(axis=0) / scale
        else:
            lo, hi = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
            scale = (hi - lo) / 15.0
            zero = np.clip(np.rint(-lo / scale), 0, 15)
        codes[g * block : (g + 1) * block] = np.clip(np.rint(rows / scale + zero), 0, 15)
        scales[g], zeros[g] = scale, zero
    return codes, scales, zeros


def one_matmul(w: np.ndarray):
    """An ONNX model y = x @ w with x [batch, tokens, K]."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="lin/MatMul")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


NODE = LinearNode("lin/MatMul", "MatMul", "lin", "w", "x")


@pytest.mark.parametrize(
    ("k", "n", "block", "kind"),
    [
        (64, 24, 32, "asymmetric"),
        (80, 24, 32, "asymmetric"),  # K not a multiple of the block, an odd number of blocks
        (100, 8, 16, "asymmetric"),
        (72, 16, 32, "symmetric"),
        (80, 24, 32, "float_zero"),
    ],
)
def test_packing_round_trip_in_onnxruntime(k, n, block, kind):
    rng = np.random.default_rng(k + n)
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    codes, scales, zeros = rtn(w, block, kind == "symmetric", kind == "float_zero")
    model = one_matmul(w)
    to_matmulnbits(model, NODE, codes, scales, zeros, block, accuracy_level=0)

    (node,) = model.graph.node
    assert (node.op_type, node.domain, node.name) == ("MatMulNBits", "com.microsoft", "lin/MatMul")
    assert [i.name for i in model.graph.initializer if i.name == "w"] == []
    assert any(op.domain == "com.microsoft" for op in model.opset_import)
    assert len(node.input) == (3 if kind == "symmetric" else 4)  # zero point 8 is the default
    want = x @ dequantize(codes, scales, zeros, block)
    np.testing.assert_allclose(run(model, x), want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - x @ w).max() > 1e-2  # the check above compares quantized weights


def test_packing_matches_onnxruntime_quantizer():
    """Our bytes for RTN codes equal onnxruntime's own MatMulNBits quantizer's (K = 80: a padded
    last block, an odd number of blocks)."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    w = np.random.default_rng(0).normal(size=(80, 24)).astype(np.float32)
    algo = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4)
    q = MatMulNBitsQuantizer(one_matmul(w), bits=4, block_size=32, algo_config=algo)
    q.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    model = one_matmul(w)
    to_matmulnbits(model, NODE, *rtn(w, 32), 32, accuracy_level=0)
    ours = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    b, b_ref = ours["lin/MatMul_Q4"], theirs["w_Q4"]
    assert b.shape == b_ref.shape == (24, 3, 16)
    np.testing.assert_array_equal(b[:, :2], b_ref[:, :2])
    np.testing.assert_array_equal(b[:, 2, :8], b_ref[:, 2, :8])  # rows 64..79
    # rows 80..95 are padding: onnxruntime leaves 0 there, we write the zero point (decodes to 0)
    zp = ours["lin/MatMul_zero_points"][:, 1] & 0x0F
    np.testing.assert_array_equal(b[:, 2, 8:], np.repeat((zp | zp << 4)[:, None], 8, axis=1))
    np.testing.assert_allclose(ours["lin/MatMul_scales"], theirs["w_scales"], rtol=1e-6)
    np.testing.assert_array_equal(ours["lin/MatMul_zero_points"], theirs["w_zero_points"])


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(1)
    k, n = 128, 48
    x = (rng.normal(size=(2048, k)) @ rng.normal(size=(k, k))).astype(np.float32)
    x[:, 5] = 0.0  # a dead input channel
    w = rng.normal(size=(k, n)).astype(np.float32)
    h = 2.0 / len(x) * (x.T.astype(np.float64) @ x)

    def error(q):
        return float(np.linalg.norm(x @ w - x @ dequantize(*q, 32)))

    base = error(rtn(w, 32))
    for act_order in (False, True):
        codes, scales, zeros = gptq_weight(w, h, 32, symmetric=False, act_order=act_order)
        assert codes.dtype == zeros.dtype == np.uint8 and codes.max() <= 15 and zeros.max() <= 15
        assert codes.shape == (k, n) and scales.shape == zeros.shape == (4, n)
        assert error((codes, scales, zeros)) <= 0.8 * base
        assert (dequantize(codes, scales, zeros, 32)[5] == 0).all()  # dead channel -> 0
    codes, scales, zeros = gptq_weight(w, h, 32, symmetric=True)
    assert (zeros == 8).all() and error((codes, scales, zeros)) <= 0.8 * error(rtn(w, 32, True))


def test_float_zero_is_exact_on_q4_1_weights():
    """Weights on a Q4_1 grid (per block of 32: min + d * code, as in GGUF files) come back
    exactly with fractional zero points; integer zero points cannot hold that grid."""
    rng = np.random.default_rng(3)
    k, n = 96, 16
    lo = np.repeat(rng.uniform(-1.0, -0.1, size=(3, n)), 32, axis=0)
    d = np.repeat(rng.uniform(0.01, 0.1, size=(3, n)), 32, axis=0)
    code = rng.integers(0, 16, size=(k, n))
    code[::32], code[1::32] = 0, 15  # every block spans its grid
    w = (lo + d * code).astype(np.float32)
    x = rng.normal(size=(512, k)).astype(np.float32)
    h = 2.0 / len(x) * (x.T.astype(np.float64) @ x)
    exact = dequantize(*gptq_weight(w, h, 32, symmetric=False, float_zero=True), 32)
    np.testing.assert_allclose(exact, w, atol=1e-5)
    assert np.abs(dequantize(*gptq_weight(w, h, 32, symmetric=False), 32) - w).max() > 1e-3


class Batches:
    """A reader over fixed feeds (the FixedShapeReader protocol)."""

    def __init__(self, feeds):
        self.feeds, self.at = feeds, 0

    def get_next(self):
        self.at += 1
        return self.feeds[self.at - 1] if self.at <= len(self.feeds) else None

    def rewind(self):
        self.at = 0

    def __len__(self):
        return len(self.feeds)


def test_collect_hessians_counts_real_tokens_only():
    """Right-padded batches of different real lengths (regrouped by length inside): H is
    2/n sum x x^T over the real tokens only, and the model keeps its outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 12)).astype(np.float32)
    ids = [
        helper.make_tensor_value_info(n, TensorProto.INT64, [None, None])
        for n in ("input_ids", "attention_mask")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="lin/MatMul"),
        ],
        "g",
        ids,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(rng.normal(size=(12, 4)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lengths = [[7, 2], [1, 9], [4, 4]]
    feeds, real = [], []
    for batch in lengths:
        tok = rng.integers(1, 50, size=(2, 9))
        mask = (np.arange(9) < np.array(batch)[:, None]).astype(np.int64)
        feeds.append({"input_ids": tok * mask, "attention_mask": mask})
        real += [emb[tok[r, : batch[r]]] for r in range(2)]
    x = np.concatenate(real).astype(np.float64)
    hessians = collect_hessians(model, ["h"], Batches(feeds))
    np.testing.assert_allclose(hessians["h"], 2.0 / len(x) * x.T @ x, rtol=1e-5, atol=1e-6)
    assert [o.name for o in model.graph.output] == ["y"]


def test_gptq_on_a_tiny_graph(tiny_artifact, tmp_path):
    import onnx

    from echoembed.calibration import FixedShapeReader
    from echoembed.echo import embed_texts
    from echoembed.runtime import Embedder, OrtRunner

    texts = [
        "A man is playing a guitar.",
        "The cat sleeps on the warm windowsill.",
        "Stocks fell sharply after the announcement.",
        "She is reading a book in the park.",
        "Two dogs run across a snowy field.",
        "The recipe needs three eggs and some flour.",
    ]
    runtime = Embedder.load(tiny_artifact.path)
    encoder = runtime.encoder()
    model = onnx.load(str(tiny_artifact.path / tiny_artifact.manifest.model_file))
    linear = linear_nodes(model)
    assert len(linear) == 14
    reader = FixedShapeReader(encoder, texts[:4], batch_size=2)
    hessians = collect_hessians(model, sorted({ln.input for ln in linear.values()}), reader)
    assert all(np.allclose(h, h.T) and (np.diagonal(h) >= 0).all() for h in hessians.values())
    outputs = len(model.graph.output)

    messages: list[str] = []
    gptq_quantize(model, linear, list(linear), reader, block_size=16, progress=messages.append)
    assert len(model.graph.output) == outputs and messages
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sum(op == "MatMulNBits" for op in ops.values()) == 14
    assert all(ops[name] == "MatMulNBits" for name in linear)
    assert not linear_nodes(model)  # no float linear MatMul left
    path = tmp_path / "gptq.onnx"
    onnx.save_model(model, str(path))
    got = embed_texts(OrtRunner(path, providers=["CPUExecutionProvider"]), encoder, texts)
    want = runtime.encode(texts, show_progress=False)
    cos = (got * want).sum(axis=1)
    assert cos.mean() > 0.9, cos
