"""fp16 conversion (echoembed.calibration.fp16) on the tiny Llama artifact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from echoembed.calibration.fp16 import to_fp16
from echoembed.errors import UserError

FP32_OPS = (
    "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "ReduceSum", "ReduceL2", "Div",
    "CumSum", "Range", "Sin", "Cos",
)  # fmt: skip
TEXTS = [
    "A man is playing a guitar.",
    "The cat sits on the mat, looking bored.",
    "Stocks fell sharply on Monday after the announcement.",
    "hi",
    "Three children are running through a field of tall grass near the river.",
]
KEPT = "base.layers.1.mlp.down_proj/MatMul"


@pytest.fixture(scope="module")
def fp32_model(tiny_artifact):
    return onnx.load(str(tiny_artifact.path / "model.onnx"))


@pytest.fixture(scope="module")
def fp16_model(fp32_model):
    return to_fp16(fp32_model, FP32_OPS)


def _weights(model) -> dict[str, int]:
    """MatMul node name -> data type of its constant weight."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    return {n.name: inits[n.input[1]] for n in nodes}


def _embed(model, tiny_artifact, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    from echoembed.echo import embed_texts
    from echoembed.runtime import Embedder, OrtRunner

    path = tmp_path / "f16.onnx"
    onnx.save(model, str(path))
    rt = Embedder.load(tiny_artifact.path)
    runner = OrtRunner(path, providers=["CPUExecutionProvider"])
    return embed_texts(runner, rt.encoder(), TEXTS), rt.encode(TEXTS)


def test_structure(fp32_model, fp16_model):
    weights = _weights(fp16_model)
    assert len(weights) == 14 and set(weights.values()) == {TensorProto.FLOAT16}
    embed = next(i for i in fp16_model.graph.initializer if i.name == "base.embed_tokens.weight")
    assert embed.data_type == TensorProto.FLOAT16
    io = [*fp16_model.graph.input, *fp16_model.graph.output]
    assert [v.type.tensor_type.elem_type for v in io] == [
        v.type.tensor_type.elem_type for v in [*fp32_model.graph.input, *fp32_model.graph.output]
    ]
    assert fp16_model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(fp16_model)
    onnx.shape_inference.infer_shapes(fp16_model, check_type=True, strict_mode=True)
    assert fp32_model.graph.initializer[0].data_type == TensorProto.FLOAT, "input left untouched"


def test_fp32_chains_do_not_round_trip(fp16_model):
    """The RMSNorm chain Pow -> ReduceMean -> Add(eps) -> Sqrt stays fp32 end to end (the cause
    of SmolLM2's failure with onnxruntime's converter: x^2 cast to fp16 between Pow and
    ReduceMean overflows at the BOS position)."""
    producer = {o: n for n in fp16_model.graph.node for o in n.output}
    norms = 0
    for node in fp16_model.graph.node:
        if node.op_type == "ReduceMean":
            assert producer[node.input[0]].op_type == "Pow", node.name
        if node.op_type == "Sqrt" and producer[node.input[0]].op_type == "Add":
            add = producer[node.input[0]]  # RMSNorm: sqrt(mean(x^2) + eps), no Cast between
            assert producer[add.input[0]].op_type == "ReduceMean", node.name
            norms += 1
        elif node.op_type == "Sqrt":  # the head's L2 norm: sqrt(sum(x * x)), fp32 pooling
            assert producer[node.input[0]].op_type == "ReduceSum", node.name
    assert norms == 5  # two layers x two norms, and the final norm
    big = [
        i.name
        for i in fp16_model.graph.initializer
        if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        and np.abs(onnx.numpy_helper.to_array(i).astype(np.float32)).max(initial=0) > 65504
    ]
    assert not big, "float32-min mask constants are clamped to the fp16 range"


def test_runs_and_matches_fp32(fp16_model, tiny_artifact, tmp_path):
    got, want = _embed(fp16_model, tiny_artifact, tmp_path)
    cos = (got * want).sum(1)
    assert np.isfinite(got).all() and cos.min() > 0.999


def test_keep_nodes(fp32_model, tiny_artifact, tmp_path):
    model = to_fp16(fp32_model, FP32_OPS, keep_nodes=[KEPT])
    weights = _weights(model)
    assert weights.pop(KEPT) == TensorProto.FLOAT
    assert set(weights.values()) == {TensorProto.FLOAT16}
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    got, want = _embed(model, tiny_artifact, tmp_path)
    assert (got * want).sum(1).min() > 0.999


def test_unknown_keep_node(fp32_model):
    with pytest.raises(UserError, match="keep_nodes"):
        to_fp16(fp32_model, FP32_OPS, keep_nodes=["nope/MatMul"])


def test_constant_shared_by_fp16_and_fp32_consumers():
    """A weight read by an fp16 MatMul and by an fp32 op gets an fp16 copy for the MatMul; the
    fp32 op keeps reading the fp32 original (both edits must reach the saved graph)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="lin/MatMul"),
            helper.make_node("ReduceSum", ["w"], ["s"], name="sum", keepdims=0),
            helper.make_node("Add", ["y", "s"], ["out"], name="add"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    half = to_fp16(model, FP32_OPS)
    inits = {i.name: i.data_type for i in half.graph.initializer}
    assert inits == {"w": TensorProto.FLOAT, "w_fp16": TensorProto.FLOAT16}
    by_name = {n.name: n for n in half.graph.node}
    assert by_name["lin/MatMul"].input[1] == "w_fp16" and by_name["sum"].input[0] == "w"
    onnx.checker.check_model(half)
    onnx.shape_inference.infer_shapes(half, check_type=True, strict_mode=True)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    got = ort.InferenceSession(half.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w + w.sum(), atol=1e-2)
