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
    from onnx import helper, numpy_helper

    names = {n.name for n in model.graph.node}
    missing = [k for k in keep_nodes if k not in names]
    if missing:
        raise UserError(f"keep_nodes not in the graph: {missing[:5]}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _hoist_float_constants(g, numpy_helper)
    rewrite = _Fp16Pass(g, _elem_types(out, onnx, helper), set(fp32_ops), set(keep_nodes))
    for node in g.node:
        rewrite.visit(node)
    rewrite.cast_outputs_back(g.output)
    # before the node list is replaced: extend() copies, later edits to the nodes would be lost
    _convert_constants(g, rewrite.consts, rewrite.const_use, rewrite.half_slots, numpy_helper)
    del g.node[:]
    g.node.extend(rewrite.nodes)
    _retype_value_info(g, rewrite.half)
    return out


class _Fp16Pass:
    """One walk over the nodes in graph order: decides each node's precision (the rule in the
    module docstring), inserts the Casts where precisions meet, and records which constants
    their consumers need in fp16."""

    def __init__(self, g, types: dict[str, int], blocked_ops: set[str], keep: set[str]):
        from onnx import TensorProto

        self.types, self.blocked_ops, self.keep = types, blocked_ops, keep
        self.FLOAT, self.HALF = TensorProto.FLOAT, TensorProto.FLOAT16
        graph_inputs = {i.name for i in g.input}
        self.consts = {
            i.name: i
            for i in g.initializer
            if i.data_type == self.FLOAT and i.name not in graph_inputs
        }
        self.half: set[str] = set()  # float activations stored as fp16
        self.const_use: dict[str, set[int]] = {}  # constant -> dtypes its consumers need
        self.half_slots: dict[str, list] = {}  # constant -> (node, input index), fp16 consumers
        self.casts: dict[tuple[str, int], str] = {}
        self.nodes: list = []  # the rewritten node list

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == self.FLOAT

    def _blocked(self, node) -> bool:
        return (
            node.op_type in self.blocked_ops
            or node.name in self.keep
            or node.domain not in ("", "ai.onnx")
            or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
        )

    def visit(self, node) -> None:
        """Append ``node`` (and any Casts its inputs need) to ``self.nodes``."""
        ins = [(i, n) for i, n in enumerate(node.input) if n and self.is_float(n)]
        if not ins and not any(o and self.is_float(o) for o in node.output):
            self.nodes.append(node)
            return
        for o in node.output:  # untyped outputs of float ops: assume they carry the float type
            if o and o not in self.types and ins and node.op_type not in _NON_FLOAT_OUTPUT_OPS:
                self.types[o] = self.FLOAT
        fixed = _FIXED_FLOAT_INPUTS.get(node.op_type, ())
        seed = any(n in self.consts and len(self.consts[n].dims) >= 2 for _, n in ins)
        fp16 = not self._blocked(node) and (seed or any(n in self.half for _, n in ins))
        for i, name in ins:
            want = self.HALF if fp16 and i not in fixed else self.FLOAT
            if name in self.consts:
                self.const_use.setdefault(name, set()).add(want)
                if want == self.HALF:
                    self.half_slots.setdefault(name, []).append((node, i))
            elif (want == self.HALF) != (name in self.half):
                node.input[i] = self._cast(name, want)
        if fp16:
            self.half.update(o for o in node.output if o and self.is_float(o))
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == self.FLOAT:
                        a.i = self.HALF
        self.nodes.append(node)

    def _cast(self, name: str, want: int) -> str:
        """The name of ``name`` cast to ``want`` (one Cast per tensor and dtype)."""
        from onnx import helper

        key = (name, want)
        if key not in self.casts:
            self.casts[key] = f"{name}_to_{'fp16' if want == self.HALF else 'fp32'}"
            self.nodes.append(
                helper.make_node("Cast", [name], [self.casts[key]], name=self.casts[key], to=want)
            )
            self.types[self.casts[key]] = self.FLOAT
            if want == self.HALF:
                self.half.add(self.casts[key])
        return self.casts[key]

    def cast_outputs_back(self, outputs) -> None:
        """fp16 graph outputs: rename the tensor inside, cast back to fp32 under its own name."""
        from onnx import helper

        for o in outputs:
            if o.name not in self.half:
                continue
            inner = f"{o.name}_fp16"
            for n in self.nodes:
                n.input[:] = [inner if x == o.name else x for x in n.input]
                n.output[:] = [inner if x == o.name else x for x in n.output]
            self.nodes.append(
                helper.make_node("Cast", [inner], [o.name], name=inner + "_cast", to=self.FLOAT)
            )
            self.half.discard(o.name)
            self.half.add(inner)


def _retype_value_info(g, half: set[str]) -> None:
    """value_info element types after the rewrite (the exporter writes them for initializers
    too, whose types come from the converted initializers)."""
    from onnx import TensorProto

    init_types = {i.name: i.data_type for i in g.initializer}
    for vi in g.value_info:
        tt = vi.type.tensor_type
        if vi.name in init_types:
            tt.elem_type = init_types[vi.name]
        elif vi.name in half and tt.elem_type == TensorProto.FLOAT:
            tt.elem_type = TensorProto.FLOAT16


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
