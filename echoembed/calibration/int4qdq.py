"""4-bit weights as standard ONNX Q/DQ (``int4-qdq``): the form TensorRT imports.

Each linear ``MatMul(x, W)`` becomes ``MatMul(x, DequantizeLinear(W_int4, scale))`` with
``W_int4`` a signed ``TensorProto.INT4`` initializer [K, N], ``scale`` float32 [K / block, N]
(strictly positive), ``axis=0`` and ``block_size`` (opset 21 blocked quantization) and no zero
point: symmetric, as TensorRT's ``IDequantizeLayer`` requires (it has no uint4 type, no float
zero points and no importer for ``com.microsoft`` MatMulNBits / GatherBlockQuantized).

onnxruntime's own QDQ writer (``MatMulNBitsQuantizer`` with ``QuantFormat.QDQ``) maps each
block's largest-magnitude value to -8 with a *negative* scale where that value is positive,
which TensorRT rejects ("all scale coefficients must have strictly positive values"); here the
scale is the smallest positive one whose grid -8..7 holds the block. onnxruntime's CPU provider
fuses DequantizeLinear (int4, axis 0, blocked) + MatMul into MatMulNBits when it loads the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from echoembed.calibration.gptq import group_params
from echoembed.calibration.graph import LinearNode, rewrite_graph
from echoembed.errors import InternalError, UserError, require

QDQ_OPSET = 21  # DequantizeLinear with block_size, and the INT4 type
INT4_IR_VERSION = 10


def rtn_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest signed 4-bit of ``w`` float32 [K, N] in blocks of ``block_size`` rows:
    (q int8 [K, N] in -8..7, scales float32 [K / block_size, N] > 0); ``w ~ q * scale``."""
    k, n = w.shape
    if k % block_size:
        raise InternalError(f"K {k} is not a multiple of the block size {block_size}")
    blocks = w.reshape(k // block_size, block_size, n)
    scales = np.stack([group_params(b, True, positive=True)[0] for b in blocks])
    q = np.rint(blocks / scales[:, None, :])
    return np.clip(q, -8, 7).astype(np.int8).reshape(k, n), scales.astype(np.float32)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX's INT4 raw data: row-major values, two a byte, the first in the low nibble."""
    flat = q.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int8)])
    nib = flat.view(np.uint8) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def check_block_size(model, nodes: Sequence[LinearNode], block_size: int) -> None:
    """Every weight to quantize is 2-D with K a multiple of ``block_size`` (TensorRT's blocked
    DequantizeLinear needs whole blocks), else a ``UserError`` naming the layers."""
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    bad = [
        f"{ln.name} (K={dims[ln.weight][0]})"
        for ln in nodes
        if len(dims[ln.weight]) != 2 or dims[ln.weight][0] % block_size
    ]
    if bad:
        raise UserError(
            f"int4-qdq: block_size {block_size} does not divide the input size of "
            f"{len(bad)} layers ({', '.join(bad[:3])}); choose a block size that does or "
            "--exclude them"
        )


def _dq(ln: LinearNode, q: np.ndarray, scales: np.ndarray, block_size: int):
    """(INT4 weight and scale initializers, the DequantizeLinear node) for one linear layer."""
    from onnx import TensorProto, helper, numpy_helper

    base = ln.module
    weight = helper.make_tensor(
        f"{base}.weight_int4", TensorProto.INT4, list(q.shape), pack_int4(q), raw=True
    )
    scale = numpy_helper.from_array(scales.astype(np.float32), f"{base}.weight_scale")
    node = helper.make_node(
        "DequantizeLinear", [weight.name, scale.name], [f"{base}.weight_dq"],
        name=f"{base}/weight_DQ", axis=0, block_size=block_size,
    )  # fmt: skip
    return [weight, scale], node


def to_int4_qdq(
    model,
    nodes: Sequence[LinearNode],
    block_size: int,
    codes: dict[str, tuple] | None = None,
) -> None:
    """Rewrite ``nodes`` of ``model`` in place to INT4 -> DequantizeLinear -> MatMul.

    ``codes``: GPTQ's (codes uint8 0..15, scales, zeros == 8) by node name, computed with
    positive symmetric scales; None: round to nearest here. Raises the default opset to 21
    and the IR version to 10 (INT4) when they are lower.
    """
    require("onnx", "export")
    from onnx import numpy_helper

    check_block_size(model, nodes, block_size)
    inits = {i.name: i for i in model.graph.initializer}
    before, new_inits = {}, []
    for ln in nodes:
        if codes is not None:
            c, scales, zeros = codes[ln.name]
            if np.any(zeros != 8) or np.any(scales <= 0):
                raise InternalError(f"{ln.name}: GPTQ codes are not on the positive INT4 grid")
            q = (c.astype(np.int16) - 8).astype(np.int8)
        else:
            w = numpy_helper.to_array(inits[ln.weight]).astype(np.float32)
            q, scales = rtn_int4(w, block_size)
        tensors, before[ln.name] = _dq(ln, q, scales, block_size)
        new_inits += tensors
    out = []
    for node in model.graph.node:
        if node.name in before:
            out.append(before[node.name])
            node.input[1] = before[node.name].output[0]
        out.append(node)
    rewrite_graph(model, out, new_inits)
    _require_opset(model)


def _require_opset(model) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < QDQ_OPSET:
            imp.version = QDQ_OPSET
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
