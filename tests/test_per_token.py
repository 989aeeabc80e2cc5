"""Per-token activation scales and folded row scales on small handmade MLP graphs (float ONNX ->
ORT's ``quantize_dynamic`` -> ``per_token_activations`` -> ``fold_row_scales``), run in ONNX
Runtime: which projections fold, and that folding changes nothing but float rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from echoembed.calibration.per_token import fold_row_scales, per_token_activations

K, F = 32, 48


def _mlp(path: Path, gate: str) -> None:
    """x -> gate/up projections -> act(gate) * up -> down projection (``gate``: ``silu``,
    ``none`` (a bilinear GLU) or ``up-only`` (``silu(up)``: no product to fold into))."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((K, F)).astype(np.float32) / 6, "w_gate"),
        numpy_helper.from_array(rng.standard_normal((K, F)).astype(np.float32) / 6, "w_up"),
        numpy_helper.from_array(rng.standard_normal((F, K)).astype(np.float32) / 7, "w_down"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["up"], "up_proj")]
    if gate == "up-only":
        nodes += [
            helper.make_node("Sigmoid", ["up"], ["sig"], "sig"),
            helper.make_node("Mul", ["up", "sig"], ["h"], "silu"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w_gate"], ["g"], "gate_proj"))
        act = "g"
        if gate == "silu":
            nodes += [
                helper.make_node("Sigmoid", ["g"], ["sig"], "sig"),
                helper.make_node("Mul", ["g", "sig"], ["a"], "silu"),
            ]
            act = "a"
        nodes.append(helper.make_node("Mul", [act, "up"], ["h"], "glu"))
    nodes.append(helper.make_node("MatMul", ["h", "w_down"], ["y"], "down_proj"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    save(model, str(path))


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(("gate", "folds"), [("silu", 1), ("none", 2), ("up-only", 0)])
def test_fold_row_scales_on_a_gated_mlp(tmp_path, gate, folds):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _mlp(tmp_path / "f.onnx", gate)
    quantize_dynamic(
        str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True,
        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
    )  # fmt: skip
    plain = onnx.load(str(tmp_path / "q.onnx"))
    assert per_token_activations(plain) == 2  # x (shared by the projections) and the product
    folded = onnx.ModelProto()
    folded.CopyFrom(plain)
    assert fold_row_scales(folded) == folds
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("MatMulIntegerToFloat") == folds
    assert ops.count("MatMulInteger") == (2 if gate != "up-only" else 1) + 1 - folds
    if folds:
        assert any(o.domain == "com.microsoft" for o in folded.opset_import)
        # the down projection's scale product reads its row scale times each folded one
        chain = [n for n in folded.graph.node if n.name.startswith("per_token/fold/")]
        assert len(chain) == folds and all(n.op_type == "Mul" for n in chain)
    else:
        assert folded == plain
    rng = np.random.default_rng(1)
    # rows of very different magnitudes: what per-token scales are for
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x *= np.array([0.1, 1, 10, 3, 0.5], np.float32)[None, :, None]
    want = _run(onnx.load(str(tmp_path / "f.onnx")), x)
    a, b = _run(folded, x), _run(plain, x)
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    err = float(np.abs(b - want).max() / np.abs(want).max())
    assert rel < 0.2 * err + 1e-6, (rel, err)  # far inside the quantization error
    assert err < 0.05, err
    # per row: a row's result does not depend on the other rows (per-token scales)
    alone = _run(folded, x[:1, 2:3])
    np.testing.assert_allclose(alone[0, 0], a[0, 2], rtol=1e-5, atol=1e-6)
