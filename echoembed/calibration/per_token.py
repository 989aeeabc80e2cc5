"""Per-token activation scales for ``int8-dynamic`` graphs (``Int8DynamicConfig.activation_scale``).

ONNX Runtime's ``DynamicQuantizeLinear`` gives a whole activation tensor one uint8 scale and zero
point, from the min and max over every token of every text in the batch. So a text's embedding
depends on the texts it is batched with (SmolLM2 prefix artifact, STS-B test, AVX-512 Zen 5:
58.45 with each text alone, 57.82 at batch 32; fp32 58.43).

This rewrite replaces every ``DynamicQuantizeLinear`` with a symmetric scale per token (per row
of the last axis): ``s = max|x_row| / 127`` (ReduceMax and ReduceMin, no temporary), then
``q = round(x / s) + 128`` (``QuantizeLinear``, opset 21, one block per row) with the same zero
point 128 for every row. ``MatMulInteger`` keeps a scalar zero point, so ONNX Runtime runs the
same u8 x s8 kernels, and the scale product ``s x weight_scale`` broadcasts over the rows; ONNX
Runtime still fuses it into ``MatMulIntegerToFloat``. A token's quantization then depends on that
token alone: the same artifact with per-token scales scores 58.61 at batch 32 and alone, for 0.80x
the per-tensor form's batch-32 throughput (2-core Xeon with AMX; ``benchmarks/README.md``).
"""

from __future__ import annotations

import numpy as np

from echoembed.artifact import graph_opset_imports
from echoembed.calibration.graph import rewrite_graph
from echoembed.errors import InternalError, require

# ops whose meaning changed between ai.onnx opsets 18 and 21 (the rest only gained types)
_CHANGED_BY_OPSET_21 = frozenset({"GroupNormalization"})
PREFIX = "per_token/"


def _raise_opset(model) -> None:
    """Blocked ``QuantizeLinear`` needs ai.onnx opset 21: raise an older import (>= 18) to it."""
    version = graph_opset_imports(model).get("", 0)
    if version >= 21:
        return
    changed = sorted({n.op_type for n in model.graph.node} & _CHANGED_BY_OPSET_21)
    if version < 18 or changed:
        raise InternalError(
            f"per-token activation scales need ai.onnx opset 21; this graph has opset {version}"
            + (f" and {changed}, whose meaning changed by 21" if changed else "")
        )
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 21


def _consumers(model) -> dict[str, list[tuple[object, int]]]:
    out: dict[str, list[tuple[object, int]]] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            out.setdefault(name, []).append((n, k))
    return out


def _check_uses(node, uses) -> None:
    """The pattern ``quantize_dynamic`` writes: q -> MatMulInteger's A, zero point -> its
    a_zero_point, scale -> Mul (with the weight scale)."""
    q, scale, zp = node.output
    wanted = {q: ("MatMulInteger", 0), zp: ("MatMulInteger", 2), scale: ("Mul", None)}
    for name, (op, index) in wanted.items():
        found = uses.get(name, [])
        if not found or any(c.op_type != op or index not in (None, k) for c, k in found):
            raise InternalError(
                f"{node.name}: output {name} is read by "
                f"{[(c.op_type, k) for c, k in found]}, not only by {op}"
                + ("" if index is None else f" input {index}")
                + "; not the graph quantize_dynamic writes"
            )


def per_token_activations(model) -> int:
    """Rewrite ``model`` in place; returns how many ``DynamicQuantizeLinear`` were replaced."""
    require("onnx", "export")
    from onnx import helper, numpy_helper

    dqls = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    if not dqls:
        return 0
    _raise_opset(model)
    uses = _consumers(model)
    inits = {i.name: i for i in model.graph.initializer}
    for node in dqls:
        _check_uses(node, uses)
    zp, inv, floor, axes = (PREFIX + s for s in ("zero_point", "inv127", "floor", "axes"))
    constants = [
        numpy_helper.from_array(np.array(128, np.uint8), zp),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), inv),
        # an all-zero row gets a tiny positive scale, not 0 (x / 0)
        numpy_helper.from_array(np.array(1e-30, np.float32), floor),
        numpy_helper.from_array(np.array([-1], np.int64), axes),
    ]
    out = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            out.append(node)
            continue
        x = node.input[0]
        q, scale, old_zp = node.output
        p = f"{node.name or x}/{PREFIX}"
        out += [
            helper.make_node("ReduceMax", [x, axes], [p + "max"], p + "ReduceMax", keepdims=1),
            helper.make_node("ReduceMin", [x, axes], [p + "min"], p + "ReduceMin", keepdims=1),
            helper.make_node("Neg", [p + "min"], [p + "neg_min"], p + "Neg"),
            helper.make_node("Max", [p + "max", p + "neg_min", floor], [p + "amax"], p + "Max"),
            helper.make_node("Mul", [p + "amax", inv], [scale], p + "Scale"),
            helper.make_node("Shape", [scale], [p + "shape"], p + "Shape"),
            helper.make_node("Expand", [zp, p + "shape"], [p + "zero_points"], p + "Expand"),
            helper.make_node(
                "QuantizeLinear",
                [x, scale, p + "zero_points"],
                [q],
                p + "QuantizeLinear",
                axis=-1,
                block_size=_row_length(node, uses, inits),
            ),
        ]
        for consumer, k in uses[old_zp]:
            consumer.input[k] = zp
    rewrite_graph(model, out, constants)
    return len(dqls)


def _row_length(node, uses, inits: dict) -> int:
    """K, the length of a row: the rows of the weights the quantized activation multiplies
    (the block size of one block per row)."""
    ks = {
        int(inits[c.input[1]].dims[0]) if c.input[1] in inits else None
        for c, _ in uses[node.output[0]]
    }
    if len(ks) != 1 or None in ks:
        raise InternalError(f"{node.name}: no single constant weight K among its MatMulIntegers")
    return ks.pop()
