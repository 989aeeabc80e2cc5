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

Row scales cost time: ONNX Runtime's ``MatMulIntegerToFloat`` applies a non-scalar ``a_scale`` in
a single-threaded pass over its output after the GEMM (its ``ScaleOutput``; a scalar one goes into
MLAS's output processor). ``fold_row_scales`` removes that pass where the math allows: a
projection whose output ``y = s * y'`` is read only by an elementwise ``Mul`` whose product is
read only by a per-token quantizer (a gated MLP's up projection: ``silu(gate) * up``, then the
down projection). A per-row quantizer does not see a per-row factor (``max|s*h|/127 = s *
max|h|/127``, the same integers), so the projection skips ``s`` (``MatMulIntegerToFloat`` written
directly, ``a_scale`` 1) and the next scale products take ``s`` instead. Exact but for float
rounding; the SmolLM2 prefix artifact, STS-B test: 58.57 (unfolded 58.61, fp32 58.43), +2-6%
throughput at batch 32 on the AMX Xeon (four side-by-side runs).
"""

from __future__ import annotations

import numpy as np

from echoembed.artifact import graph_opset_imports
from echoembed.calibration.graph import MS_DOMAIN, ensure_ms_opset, rewrite_graph
from echoembed.errors import InternalError, require

# ops whose meaning changed between ai.onnx opsets 18 and 21 (the rest only gained types)
_CHANGED_BY_OPSET_21 = frozenset({"GroupNormalization"})
PREFIX = "per_token/"
FOLD = PREFIX + "fold/"
_QUANTIZER_OPS = frozenset({"ReduceMax", "ReduceMin", "QuantizeLinear"})


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


def fold_row_scales(model) -> int:
    """Fold the row scale of every projection that only feeds a product quantized per token
    into the next scale products (module docstring); in place, after
    ``per_token_activations``. Returns how many projections now skip their row scale."""
    require("onnx", "export")
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(model)
    quantizers = [n for n in graph.node if n.name.endswith(PREFIX + "QuantizeLinear")]
    by_input = {n.input[0]: n for n in quantizers}
    one = FOLD + "one"
    removed: set[int] = set()
    instead: dict[int, object] = {}  # id(MatMulInteger) -> its MatMulIntegerToFloat
    after: dict[int, list] = {}  # id(node) -> nodes to place right after it
    current: dict[str, str] = {}  # a quantizer's scale -> what its scale products read now
    for quantizer in quantizers:
        for mmi, k in uses.get(quantizer.output[0], []):
            chain = _scaled_output(mmi, k, uses, producer, inits)
            if chain is None:
                continue
            cast, out, product, row, w_scale = chain
            nxt = _quantizer_of_product(out.output[0], uses, by_input, outputs)
            if nxt is None:
                continue
            s_next = nxt.input[1]
            products = [
                c for c, _ in uses.get(s_next, [])
                if c.op_type == "Mul" and any(i in inits for i in c.input if i != s_next)
            ]  # fmt: skip
            readers = [c for c, _ in uses.get(nxt.output[0], []) if c.op_type == "MatMulInteger"]
            if not products or len(products) != len(readers):
                continue
            # both factors of a product can be folded (a GLU without activation): chain them
            reads = current.get(s_next, s_next)
            folded = f"{FOLD}{s_next}/{len(instead)}"
            after.setdefault(id(producer[s_next]), []).append(
                helper.make_node("Mul", [reads, row], [folded], folded)
            )
            for c in products:
                c.input[list(c.input).index(reads)] = folded
            current[s_next] = folded
            inputs = [mmi.input[0], mmi.input[1], one, w_scale, *mmi.input[2:4]]
            while not inputs[-1]:
                inputs.pop()
            instead[id(mmi)] = helper.make_node(
                "MatMulIntegerToFloat",
                inputs,
                [out.output[0]],
                (mmi.name or out.output[0]) + "/" + FOLD + "MatMulIntegerToFloat",
                domain=MS_DOMAIN,
            )
            removed.update({id(cast), id(out), id(product)})
    if not instead:
        return 0
    nodes = []
    for n in graph.node:
        if id(n) in removed:
            continue
        nodes.append(instead.get(id(n), n))
        nodes += after.get(id(n), [])
    rewrite_graph(model, nodes, [numpy_helper.from_array(np.array(1.0, np.float32), one)])
    ensure_ms_opset(model)
    return len(instead)


def _scaled_output(mmi, k: int, uses, producer, inits):
    """(Cast, output Mul, scale product, row scale, weight scale) when ``mmi`` is the
    ``MatMulInteger -> Cast -> Mul(., Mul(row scale, weight scale))`` that ``quantize_dynamic``
    writes (the row scale being the activation's), else None."""
    if mmi.op_type != "MatMulInteger" or k != 0:
        return None
    after_mm = uses.get(mmi.output[0], [])
    if len(after_mm) != 1 or after_mm[0][0].op_type != "Cast":
        return None
    cast = after_mm[0][0]
    after_cast = uses.get(cast.output[0], [])
    if len(after_cast) != 1 or after_cast[0][0].op_type != "Mul":
        return None
    out, j = after_cast[0]
    product = producer.get(out.input[1 - j])
    if product is None or product.op_type != "Mul" or len(uses[product.output[0]]) != 1:
        return None
    weights = [i for i in product.input if i in inits]
    rows = [i for i in product.input if i not in inits]
    if len(weights) != 1 or len(rows) != 1:
        return None
    return cast, out, product, rows[0], weights[0]


def _quantizer_of_product(y: str, uses, by_input: dict, outputs: set[str]):
    """The per-token QuantizeLinear of ``Mul(y, z)`` when that product is all ``y`` feeds and
    only that quantizer reads the product (so ``z`` does not depend on ``y``), else None."""
    readers = uses.get(y, [])
    if y in outputs or len(readers) != 1 or readers[0][0].op_type != "Mul":
        return None
    mul = readers[0][0]
    product = mul.output[0]
    if list(mul.input).count(y) != 1 or product in outputs or product not in by_input:
        return None
    quantizer = by_input[product]
    prefix = quantizer.name.removesuffix("QuantizeLinear")
    for c, _ in uses.get(product, []):
        if c.op_type not in _QUANTIZER_OPS or not c.name.startswith(prefix):
            return None
    return quantizer
