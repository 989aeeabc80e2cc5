"""GPTQ (Frantar et al., 2022) 4-bit weight-only quantization into ``MatMulNBits``, in numpy.

Every linear layer is quantized against the Hessian ``H = 2/n sum x x^T`` of its input over the
calibration tokens: rows of the ONNX weight ``W [K, N]`` (input channels) are quantized one at a
time and the rounding error is spread over the rows not yet quantized, weighted by the Cholesky
factor of ``H^-1`` (lazy batch updates per block, every step vectorized over the N outputs).
The Hessians come from one pass of the *float* graph (no sequential layer-by-layer updates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.calibration.graph import MS_DOMAIN, LinearNode, ensure_ms_opset, probe
from echoembed.errors import InternalError, UserError, require

BITS = 4
MAXQ = 15


def check_block_size(block_size: int) -> None:
    """MatMulNBits needs a power-of-two block of at least 16 rows."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"block_size must be a power of two >= 16, got {block_size!r}")


# --- Hessians -------------------------------------------------------------------------------


def collect_hessians(model, inputs: list[str], reader) -> dict[str, np.ndarray]:
    """H = (2/n) * sum over real tokens of x x^T (float64 [K, K]) for each input tensor name.

    Runs the graph once over the ``reader``'s texts with ``inputs`` added as outputs (the model
    is left as it was); padding tokens (``attention_mask`` 0) are left out.
    """
    names = list(dict.fromkeys(inputs))
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in probe(model, names, reader, desc="GPTQ Hessians"):
        count += len(batch[names[0]])
        for name, x in batch.items():
            xtx = x.T @ x  # float32 (BLAS syrk), summed in float64
            if name in sums:
                sums[name] += xtx
            else:
                sums[name] = xtx.astype(np.float64)
    if names and count == 0:
        raise UserError("the calibration batches hold no real tokens")
    for h in sums.values():
        h *= 2.0 / count
    return sums


# --- GPTQ on one weight ---------------------------------------------------------------------


@dataclass(frozen=True)
class FactoredHessian:
    """A layer input's Hessian made ready for GPTQ (dampened, factored), shared by every weight
    fed by that input."""

    u: np.ndarray  # float32 [K, K] upper Cholesky factor of H^-1 (H^-1 = U^T U), permuted
    dead: np.ndarray  # bool [K]: input channels that are always zero
    perm: np.ndarray | None  # act-order: row processing order, None for 0..K-1


def _tril_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (matrix products only, about
    4x faster than a general inverse; numpy has no triangular solver)."""
    n = len(m)
    if n <= 128:
        return np.tril(np.linalg.inv(m))
    h = n // 2
    a, d = _tril_inverse(m[:h, :h]), _tril_inverse(m[h:, h:])
    out = np.zeros_like(m)
    out[:h, :h], out[h:, h:] = a, d
    out[h:, :h] = -d @ (m[h:, :h] @ a)
    return out


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with H^-1 = U^T U (the paper's Cholesky form of the inverse Hessian).

    With J the row reversal and J H J = M M^T, H^-1 = (J M^-1 J)^T (J M^-1 J), J M^-1 J upper:
    one Cholesky and one triangular inverse, no explicit H^-1.
    """
    m = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(_tril_inverse(m)[::-1, ::-1])


def factor_hessian(h: np.ndarray, damp: float = 0.01, act_order: bool = False) -> FactoredHessian:
    """Dampen ``h`` (``damp`` x mean diagonal), drop dead channels, factor the inverse."""
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InternalError(f"Hessian must be square, got {h.shape}")
    if not damp > 0:
        raise UserError(f"damp must be > 0, got {damp}")
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diagonal(h), kind="stable") if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    mean_diag = float(np.mean(np.diagonal(h)))
    scale = damp
    for _ in range(6):  # grow the damping until H is numerically positive definite
        try:
            damped = h + np.eye(len(h)) * (scale * mean_diag)
            u = _inverse_cholesky(damped)
            break
        except np.linalg.LinAlgError:
            scale *= 10.0
    else:
        raise InternalError("Hessian is not positive definite even with 1e5x damping")
    return FactoredHessian(u.astype(np.float32), dead, perm)


def group_params(
    rows: np.ndarray, symmetric: bool, float_zero: bool = False, positive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of a block of rows [b, N] over 16 levels.

    Asymmetric: min/max, the range stretched to hold 0 so that the integer zero point is exact;
    with ``float_zero`` the plain min/max and a fractional zero point (llama.cpp's Q4_1 grid).
    Symmetric: zero point 8 and the largest-magnitude value mapped exactly to code 0
    (onnxruntime's MLAS convention; the scale may be negative); with ``positive`` the smallest
    positive scale whose grid -8..7 (codes 0..15) holds the block (TensorRT's INT4).
    """
    if symmetric and positive:
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        scale = np.maximum(np.maximum(hi, 0.0) / 7.0, np.maximum(-lo, 0.0) / 8.0)
        zero = np.full(rows.shape[1], 8.0, dtype=np.float32)
    elif symmetric:
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        peak = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = peak / -8.0
        zero = np.full(rows.shape[1], 8.0, dtype=np.float32)
    else:
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        if not float_zero:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / MAXQ
        zero = -lo / np.where(scale == 0, 1.0, scale)
        zero = zero if float_zero else np.clip(np.rint(zero), 0, MAXQ)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, zero.astype(np.float32)


def _gptq_rows(w: np.ndarray, u: np.ndarray, block_size: int, group_of, params) -> np.ndarray:
    """The GPTQ loop over the rows of ``w`` (updated in place); returns float codes [K, N].

    ``params(g, rows)`` gives (scale, zero) of group ``g`` the first time a row of it is reached
    (``rows``: the error-updated rows from there to the end of the block).
    """
    k, n = w.shape
    codes = np.empty((k, n), dtype=np.float32)
    err = np.empty((block_size, n), dtype=np.float32)
    tmp = np.empty(n, dtype=np.float32)
    seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1, e1 = w[i1:i2], u[i1:i2, i1:i2], err[: i2 - i1]
        for i in range(i2 - i1):
            g = group_of(i1 + i)
            if g not in seen:
                scale, zero = params(g, w1[i:])
                seen[g] = (scale, 1.0 / scale, zero)
            scale, inv, zero = seen[g]
            row, q = w1[i], codes[i1 + i]
            np.multiply(row, inv, out=q)
            q += zero
            np.rint(q, out=q)
            np.clip(q, 0, MAXQ, out=q)
            np.subtract(q, zero, out=tmp)
            tmp *= scale
            np.subtract(row, tmp, out=e1[i])
            e1[i] /= u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1 :] -= u1[i, i + 1 :, None] * e1[i]
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ e1
    return codes


def gptq_factored(
    w: np.ndarray,
    prep: FactoredHessian,
    block_size: int,
    symmetric: bool,
    float_zero: bool = False,
    positive: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gptq_weight` with the Hessian already factored by :func:`factor_hessian`
    (``positive``: symmetric with positive scales, see :func:`group_params`)."""
    check_block_size(block_size)
    if symmetric and float_zero:
        raise UserError("float_zero is for asymmetric quantization (symmetric has zero point 8)")
    if w.ndim != 2 or prep.u.shape != (w.shape[0], w.shape[0]):
        raise InternalError(f"weight {w.shape} does not match Hessian {prep.u.shape}")
    k, n = w.shape
    groups = -(-k // block_size)
    scales = np.empty((groups, n), dtype=np.float32)
    zeros = np.empty((groups, n), dtype=np.float32)
    w = np.array(w, dtype=np.float32)
    w[prep.dead] = 0.0
    if prep.perm is None:

        def params(g: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            scales[g], zeros[g] = group_params(rows[:block_size], symmetric, float_zero, positive)
            return scales[g], zeros[g]

        codes = _gptq_rows(w, prep.u, block_size, lambda r: r // block_size, params)
    else:  # act-order: groups stay contiguous in K, so their parameters are fixed up front
        for g in range(groups):
            rows = w[g * block_size : (g + 1) * block_size]
            scales[g], zeros[g] = group_params(rows, symmetric, float_zero, positive)
        group = prep.perm // block_size
        permuted = _gptq_rows(
            w[prep.perm],
            prep.u,
            block_size,
            lambda r: int(group[r]),
            lambda g, rows: (scales[g], zeros[g]),
        )
        codes = np.empty_like(permuted)
        codes[prep.perm] = permuted
    return codes.astype(np.uint8), scales, zeros if float_zero else zeros.astype(np.uint8)


def gptq_weight(
    w: np.ndarray,
    h: np.ndarray,
    block_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    float_zero: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of one weight ``w`` float32 [K, N] (ONNX MatMul layout) against Hessian ``h`` [K, K].

    Returns (codes uint8 [K, N] in 0..15, scales float32 [G, N], zero_points uint8 [G, N]) with
    G = ceil(K / block_size): one scale/zero per block of ``block_size`` rows and output column,
    computed when the block is reached from the error-updated weights (with ``act_order``, from
    the original weights). Dequantized: ``(codes - zero) * scale``. With ``float_zero`` the zero
    points are float32 (see :func:`group_params`).
    """
    prep = factor_hessian(h, damp, act_order)
    return gptq_factored(w, prep, block_size, symmetric, float_zero)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int):
    """float32 [K, N] weight from (codes, scales, zero_points) as MatMulNBits reads them."""
    k = codes.shape[0]
    s = np.repeat(scales, block_size, axis=0)[:k]
    z = np.repeat(zeros.astype(np.float32), block_size, axis=0)[:k]
    return (codes.astype(np.float32) - z) * s


# --- MatMulNBits ----------------------------------------------------------------------------


def pack_matmulnbits(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxruntime's layout: B uint8 [N, G, block_size/2] (two codes a byte along K, low nibble
    first, the last block padded with its zero point), scales [N, G], zero points uint8
    [N, ceil(G/2)] (two blocks a byte, low nibble first, an odd last one padded with 8), or
    float zero points (``zeros`` of a float dtype) as they are, flat [N * G]."""
    check_block_size(block_size)
    k, n = codes.shape
    groups = -(-k // block_size)
    if scales.shape != (groups, n) or zeros.shape != (groups, n):
        raise InternalError(f"scales {scales.shape} / zeros {zeros.shape}, want {(groups, n)}")
    float_zero = np.issubdtype(zeros.dtype, np.floating)
    if codes.dtype != np.uint8 or codes.max(initial=0) > MAXQ:
        raise InternalError("codes must be uint8 in 0..15")
    if not float_zero and (zeros.dtype != np.uint8 or zeros.max(initial=0) > MAXQ):
        raise InternalError("integer zero points must be uint8 in 0..15")
    pad = groups * block_size - k
    c = codes.T
    if pad:  # padding decodes to (about) 0
        fill = np.clip(np.rint(zeros[-1]), 0, MAXQ).astype(np.uint8)
        c = np.concatenate([c, np.repeat(fill[:, None], pad, axis=1)], axis=1)
    c = c.reshape(n, groups, block_size)
    b = np.ascontiguousarray(c[..., 0::2] | (c[..., 1::2] << 4), dtype=np.uint8)
    s = np.ascontiguousarray(scales.T)
    if float_zero:
        return b, s, np.ascontiguousarray(zeros.T, dtype=scales.dtype).reshape(-1)
    z = zeros.T
    if groups % 2:
        z = np.concatenate([z, np.full((n, 1), 8, dtype=np.uint8)], axis=1)  # as onnxruntime
    return b, s, np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4), dtype=np.uint8)


def set_accuracy_level(model, accuracy_level: int) -> int:
    """Give every MatMulNBits node of ``model`` the ``accuracy_level`` attribute (0, the op's
    default, is written as no attribute, as onnxruntime's quantizers do). Returns the count."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        keep = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(keep)
        if accuracy_level:
            node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
        count += 1
    return count


def _uses(graph, name: str) -> bool:
    return any(name in node.input for node in graph.node) or any(
        o.name == name for o in graph.output
    )


def to_matmulnbits(
    model,
    node: LinearNode,
    codes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    block_size: int,
    accuracy_level: int,
) -> None:
    """Replace the MatMul ``node`` in place by a ``com.microsoft`` MatMulNBits node (same name,
    input and output). New initializers are named ``<node>_Q4``/``_scales``/``_zero_points``
    (integer zero points left out when all are 8, the op's default; float ``zeros`` are stored
    as float); the float weight initializer is dropped when nothing else uses it."""
    require("onnx", "export")
    from onnx import helper, numpy_helper

    graph = model.graph
    index = next((i for i, n in enumerate(graph.node) if n.name == node.name), None)
    if index is None or graph.node[index].op_type != "MatMul":
        raise InternalError(f"no MatMul node named {node.name!r} in the graph")
    old = graph.node[index]
    weight = next((t for t in graph.initializer if t.name == node.weight), None)
    if weight is None or list(weight.dims) != list(codes.shape):
        raise InternalError(f"{node.name}: weight {node.weight} is not a {codes.shape} initializer")
    b, s, zp = pack_matmulnbits(codes, scales, zeros, block_size)
    if weight.data_type == 10:  # FLOAT16: scales (and float zero points) follow the activations
        s = s.astype(np.float16)
        zp = zp.astype(np.float16) if zp.dtype != np.uint8 else zp
    tensors = [numpy_helper.from_array(b, f"{node.name}_Q{BITS}")]
    tensors.append(numpy_helper.from_array(s, f"{node.name}_scales"))
    if zp.dtype != np.uint8 or np.any(zeros != 8):
        tensors.append(numpy_helper.from_array(zp, f"{node.name}_zero_points"))
    attrs = {"K": codes.shape[0], "N": codes.shape[1], "bits": BITS, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node(
        "MatMulNBits",
        [old.input[0]] + [t.name for t in tensors],
        list(old.output),
        name=old.name,
        domain=MS_DOMAIN,
        **attrs,
    )
    del graph.node[index]
    graph.node.insert(index, new)
    graph.initializer.extend(tensors)
    if not _uses(graph, node.weight):
        at = next(i for i, t in enumerate(graph.initializer) if t.name == node.weight)
        del graph.initializer[at]
        at = next((i for i, v in enumerate(graph.input) if v.name == node.weight), None)
        if at is not None:
            del graph.input[at]
    ensure_ms_opset(model)


# --- the whole graph ------------------------------------------------------------------------


def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS bundled with numpy's wheels, or None."""
    import ctypes

    root = Path(np.__file__).parent
    for path in sorted(
        [*root.parent.glob("numpy.libs/*openblas*"), *root.glob(".dylibs/*openbl*")]
    ):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for pattern in (
            "scipy_openblas_{}_num_threads64_",
            "scipy_openblas_{}_num_threads",
            "openblas_{}_num_threads64_",
            "openblas_{}_num_threads",
        ):
            get = getattr(lib, pattern.format("get"), None)
            put = getattr(lib, pattern.format("set"), None)
            if get is not None and put is not None:
                return get, put
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Best effort: numpy's BLAS on one thread. GPTQ makes thousands of small products; on
    shared cores a second BLAS thread that has to wait for a time slice makes them ~10x slower.
    Uses threadpoolctl when installed, else numpy's bundled OpenBLAS; else does nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(1, user_api="blas"):
            yield
        return
    blas = _openblas_threads()
    if blas is None:
        yield
        return
    get, put = blas
    before = int(get())
    put(1)
    try:
        yield
    finally:
        put(before)


def gptq_quantize(
    model,
    linear: dict[str, LinearNode],
    names: Sequence[str],
    reader,
    *,
    block_size: int = 32,
    symmetric: bool = False,
    accuracy_level: int = 4,
    damp: float = 0.01,
    act_order: bool = False,
    float_zero: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> None:
    """GPTQ the MatMul nodes ``names`` of ``model`` into MatMulNBits, in place.

    The Hessians of all their inputs are collected in one pass of the *float* graph over
    ``reader`` (inputs of the original graph, not of the already quantized layers before: GPTQ
    without the paper's sequential layer-by-layer updates), then each weight is quantized.
    Layers fed by the same tensor (q/k/v, gate/up) share one factored Hessian. ``float_zero``:
    fractional zero points (exact on weights that were Q4_1, e.g. from a GGUF file).
    """
    require("onnx", "export")

    check_block_size(block_size)
    if symmetric and float_zero:
        raise UserError("float_zero is for asymmetric quantization (symmetric has zero point 8)")
    missing = [n for n in names if n not in linear]
    if missing:
        raise InternalError(f"not linear nodes of the graph: {missing[:3]}")
    nodes = [linear[n] for n in dict.fromkeys(names)]
    if not nodes:
        return
    for ln, (codes, scales, zeros) in zip(
        nodes,
        gptq_solve(
            model, nodes, reader, block_size, symmetric, damp, act_order, float_zero, progress
        ).values(),
        strict=True,
    ):
        to_matmulnbits(model, ln, codes, scales, zeros, block_size, accuracy_level)


def gptq_solve(
    model,
    nodes: Sequence[LinearNode],
    reader,
    block_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    float_zero: bool = False,
    progress: Callable[[str], None] = lambda s: None,
    positive: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(codes, scales, zeros) of every node, by node name, from one Hessian pass (the graph is
    not modified); layers fed by the same tensor share one factored Hessian (``positive``: see
    :func:`group_params`)."""
    from onnx import numpy_helper

    inputs = list(dict.fromkeys(ln.input for ln in nodes))
    progress(f"GPTQ: Hessians of {len(inputs)} layer inputs over {len(reader)} batches ...")
    hessians = collect_hessians(model, inputs, reader)
    left = {name: sum(ln.input == name for ln in nodes) for name in inputs}
    inits = {t.name: t for t in model.graph.initializer}
    factored: dict[str, FactoredHessian] = {}
    every = max(1, len(nodes) // 10)
    out = {}
    with one_blas_thread():
        for done, ln in enumerate(nodes, start=1):
            if ln.input not in factored:
                factored[ln.input] = factor_hessian(hessians.pop(ln.input), damp, act_order)
            w = numpy_helper.to_array(inits[ln.weight]).astype(np.float32)
            out[ln.name] = gptq_factored(
                w, factored[ln.input], block_size, symmetric, float_zero, positive
            )
            left[ln.input] -= 1
            if not left[ln.input]:
                del factored[ln.input]
            if done % every == 0 or done == len(nodes):
                progress(f"  GPTQ {done}/{len(nodes)} layers")
    return out
