"""fp16 conversion of an fp32 artifact graph: fp16 weights and compute, fp32 inputs/outputs.

Why not ``onnxruntime.transformers.float16.convert_float_to_float16``: it casts the output of
every blocked (fp32) node back to fp16, so a chain of blocked ops round-trips through fp16
between them, and it leaves unblocked glue such as RMSNorm's ``mean + eps`` Add in fp16.
SmolLM2 has massive activations at the BOS position (|x| up to ~2.5e4, ``mean(x^2)`` up to
~1.1e6): measured on one STS-B sentence, ``Pow -> Cast(fp16) -> Cast(fp32) -> ReduceMean`` turns
x^2 = 8.4e4 (layer 2's input norm) into inf, rsqrt into 0, and the BOS row of every later norm
output into 0; the embedding cosine vs fp32 drops to ~0.05. (The float32-min attention mask
clamped to -65504 also differs but is harmless.)

This converter follows the data instead: a node computes in fp16 when it is not blocked and it
reads an fp16 activation or a constant weight of rank >= 2 (MatMul/Gemm/Gather weights); every
other float node stays fp32 and its outputs stay fp32, so consecutive fp32 ops never see fp16
in between. One Cast is inserted per (tensor, dtype) where precisions meet. In practice for a
Llama graph: fp16 = embedding table, projections, attention matmuls, RoPE application, SiLU,
the residual stream; fp32 = ``fp32_ops`` (RMSNorm's Pow/ReduceMean/Sqrt/Reciprocal, Softmax,
pooling), everything between them that only reads fp32 (``mean + eps``), and the RoPE angle /
attention-mask subgraphs, which read no fp16 data (positions x inv_freq needs fp32 precision).
Finite float constants outside the fp16 range (the exporter's float32-min mask fill) are clamped
to +-65504 so that casting them to fp16 stays finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from echoembed.errors import UserError, require

if TYPE_CHECKING:
    from onnx import ModelProto

FP16_MAX = float(np.finfo(np.float16).max)
# Inputs that keep their own float type whatever the node computes in (op_type -> indices).
_FIXED_FLOAT_INPUTS = {"Resize": (2,)}
# Ops whose outputs are never float, used only where type inference left a tensor untyped.
_NON_FLOAT_OUTPUT_OPS = frozenset(
    "Shape Size IsNaN IsInf Equal Less LessOrEqual Greater GreaterOrEqual Not And Or Xor "
    "ArgMax ArgMin NonZero".split()
)


def to_fp16(
    model: ModelProto, fp32_ops: tuple[str, ...], keep_nodes: Sequence[str] = ()
) -> ModelProto:
    """A copy of ``model`` with fp16 weights and compute; graph inputs and outputs stay fp32.

    ``fp32_ops``: op types computed in fp32 (their float inputs are cast up); ``keep_nodes``: node
    names kept in fp32 as well (their weights stay fp32). See the module docstring for the rule.
    """
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = {n.name for n in graph.node}
    missing = [k for k in keep_nodes if k not in names]
    if missing:
        raise UserError(f"keep_nodes not in the graph: {missing[:5]}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _hoist_float_constants(g, numpy_helper)
    types = _elem_types(out, onnx, helper)
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

    def is_float(name: str) -> bool:
        return types.get(name) == FLOAT

    graph_inputs = {i.name for i in g.input}
    consts = {
        i.name: i for i in g.initializer if i.data_type == FLOAT and i.name not in graph_inputs
    }
    blocked_ops, keep = set(fp32_ops), set(keep_nodes)
    half: set[str] = set()  # float activations stored as fp16
    const_use: dict[str, set[int]] = {}  # constant -> dtypes its consumers need
    half_slots: dict[str, list] = {}  # constant -> (node, input index) of its fp16 consumers
    casts: dict[tuple[str, int], str] = {}
    nodes = []

    for node in g.node:
        ins = [(i, n) for i, n in enumerate(node.input) if n and is_float(n)]
        if not ins and not any(o and is_float(o) for o in node.output):
            nodes.append(node)
            continue
        for o in node.output:  # untyped outputs of float ops: assume they carry the float type
            if o and o not in types and ins and node.op_type not in _NON_FLOAT_OUTPUT_OPS:
                types[o] = FLOAT
        fixed = _FIXED_FLOAT_INPUTS.get(node.op_type, ())
        blocked = (
            node.op_type in blocked_ops
            or node.name in keep
            or node.domain not in ("", "ai.onnx")
            or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
        )
        seed = any(n in consts and len(consts[n].dims) >= 2 for _, n in ins)
        fp16 = not blocked and (seed or any(n in half for _, n in ins))
        for i, name in ins:
            want = HALF if fp16 and i not in fixed else FLOAT
            if name in consts:
                const_use.setdefault(name, set()).add(want)
                if want == HALF:
                    half_slots.setdefault(name, []).append((node, i))
            elif (want == HALF) != (name in half):
                key = (name, want)
                if key not in casts:
                    casts[key] = f"{name}_to_{'fp16' if want == HALF else 'fp32'}"
                    nodes.append(
                        helper.make_node("Cast", [name], [casts[key]], name=casts[key], to=want)
                    )
                    types[casts[key]] = FLOAT
                    if want == HALF:
                        half.add(casts[key])
                node.input[i] = casts[key]
        if fp16:
            half.update(o for o in node.output if o and is_float(o))
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == FLOAT:
                        a.i = HALF
        nodes.append(node)

    # fp16 graph outputs: rename the tensor inside, cast back to fp32 under the output's name
    for o in g.output:
        if o.name in half:
            inner = f"{o.name}_fp16"
            for n in nodes:
                n.input[:] = [inner if x == o.name else x for x in n.input]
                n.output[:] = [inner if x == o.name else x for x in n.output]
            nodes.append(
                helper.make_node("Cast", [inner], [o.name], name=inner + "_cast", to=FLOAT)
            )
            half.discard(o.name)
            half.add(inner)

    del g.node[:]
    g.node.extend(nodes)
    _convert_constants(g, consts, const_use, half_slots, numpy_helper)
    init_types = {i.name: i.data_type for i in g.initializer}
    for vi in g.value_info:  # the exporter also writes value_info for initializers
        tt = vi.type.tensor_type
        if vi.name in init_types:
            tt.elem_type = init_types[vi.name]
        elif vi.name in half and tt.elem_type == FLOAT:
            tt.elem_type = HALF
    return out


def _hoist_float_constants(g, numpy_helper) -> None:
    """Turn float ``Constant`` nodes (``value`` attribute) into initializers."""
    from onnx import TensorProto

    outputs = {o.name for o in g.output}
    keep = []
    for n in g.node:
        t = next((a.t for a in n.attribute if a.name == "value"), None)
        if (
            n.op_type == "Constant"
            and n.domain in ("", "ai.onnx")
            and t is not None
            and t.data_type == TensorProto.FLOAT
            and n.output[0] not in outputs
        ):
            init = g.initializer.add()
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), n.output[0]))
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _elem_types(model, onnx, helper) -> dict[str, int]:
    """Element type of every tensor, by onnx type inference on a weightless copy (no size limit)."""
    g = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    known = {i.name for i in g.input}
    lg.input.extend(
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
        for i in g.initializer
        if i.name not in known
    )
    try:
        light = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False)
    except Exception:  # fall back to the value_info the exporter wrote
        pass
    lg = light.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*lg.value_info, *lg.input, *lg.output)}
    return {k: v for k, v in types.items() if v}


def _convert_constants(g, consts, const_use, half_slots, numpy_helper) -> None:
    """fp16 constants for fp16 consumers (a ``<name>_fp16`` copy when fp32 consumers share it);
    finite values beyond the fp16 range are clamped to +-65504 in both copies."""
    from onnx import TensorProto

    for name, init in consts.items():
        use = const_use.get(name)
        if not use:
            continue
        arr = numpy_helper.to_array(init)
        big = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
        if big.any():
            arr = np.where(big, np.clip(arr, -FP16_MAX, FP16_MAX), arr).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, name))
        if TensorProto.FLOAT16 not in use:
            continue
        h = numpy_helper.from_array(arr.astype(np.float16), name)
        if TensorProto.FLOAT in use:
            h.name = f"{name}_fp16"
            g.initializer.append(h)
            for node, i in half_slots[name]:
                node.input[i] = h.name
        else:
            init.CopyFrom(h)
