"""Roofline figures for ``echoembed bench``: this CPU's matmul peaks, measured with ONNX Runtime
itself (one-node fp32 ``MatMul`` and u8 x s8 ``MatMulInteger`` graphs at SmolLM2's GEMM shapes, the
session settings the runtime uses), and an artifact's FLOPs per token read from its graph (2*K*N
for every matmul with a constant weight; attention and elementwise work are not counted: 1.1%
and less on SmolLM2 echo prompts, ``benchmarks/README.md``). ``benchmarks/profile_runtime.py``
is the longer version with ORT's profiler (it uses these probe graphs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# [M, K, N]: 32 prompts x 88 tokens through SmolLM2's q/o (576x576) and MLP (576x1536, 1536x576)
PROBE_SHAPES = ((2816, 576, 576), (2816, 576, 1536), (2816, 1536, 576))
INTEGER_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"}
)
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul"}) | INTEGER_OPS
_PASS_THROUGH = frozenset({"DequantizeLinear", "Cast", "Transpose", "Identity"})


@dataclass(frozen=True)
class Peaks:
    """Best measured rate of each kernel kind, G(FL)OP/s, at ``threads`` intra-op threads."""

    fp32_gflops: float
    u8s8_gops: float
    threads: int | None
    shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES
    u8u8_gops: float | None = None  # uint8 weights (``--weights uint8``); None: not measured

    def for_kernel(self, kernel: str) -> float | None:
        """The peak a graph's weight GEMMs compare with: ``fp32``, ``u8s8`` or ``u8u8``."""
        return {"fp32": self.fp32_gflops, "u8s8": self.u8s8_gops, "u8u8": self.u8u8_gops}[kernel]


def probe_model(m: int, k: int, n: int, kind: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """A one-node graph [m, k] x [k, n] with a constant weight, and a feed for it.

    ``fp32``: MatMul. ``u8s8`` / ``u8u8``: MatMulInteger with uint8 activations (and a scalar
    zero point fed at run time, as DynamicQuantizeLinear produces it) and int8 / uint8 weights
    with a per-column zero point, as ``quantize_dynamic(per_channel=True)`` writes them.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        w = rng.standard_normal((k, n), dtype=np.float32)
        inits = [numpy_helper.from_array(w, "W")]
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])]
        out_type = TensorProto.FLOAT
        feed = {"A": rng.standard_normal((m, k), dtype=np.float32)}
    elif kind in ("u8s8", "u8u8"):
        if kind == "u8s8":
            w = rng.integers(-127, 128, (k, n), dtype=np.int8)
            wzp = np.zeros(n, dtype=np.int8)
        else:
            w = rng.integers(0, 256, (k, n), dtype=np.uint8)
            wzp = np.full(n, 128, dtype=np.uint8)
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(wzp, "W_zp")]
        node = helper.make_node("MatMulInteger", ["A", "W", "A_zp", "W_zp"], ["Y"])
        inputs = [
            helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k]),
            helper.make_tensor_value_info("A_zp", TensorProto.UINT8, []),
        ]
        out_type = TensorProto.INT32
        feed = {
            "A": rng.integers(0, 256, (m, k), dtype=np.uint8),
            "A_zp": np.array(rng.integers(0, 256), dtype=np.uint8),
        }
    else:
        raise ValueError(f"unknown probe kind {kind!r}; known: fp32, u8s8, u8u8")
    graph = helper.make_graph(
        [node],
        f"probe_{kind}",
        inputs,
        [helper.make_tensor_value_info("Y", out_type, [m, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString(), feed


def measure_peaks(threads: int | None = None, runs: int = 8, rounds: int = 3) -> Peaks:
    """The best run of the best shape for fp32, u8 x s8 and u8 x u8 (3 warm-up runs each), over
    ``rounds`` rounds that visit every kind and shape in turn: on a shared machine one burst of
    load during a single pass once put the u8 x s8 peak below the model's own INT8 GEMMs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    best = {"fp32": 0.0, "u8s8": 0.0, "u8u8": 0.0}
    sessions = []
    for kind in best:
        for m, k, n in PROBE_SHAPES:
            blob, feed = probe_model(m, k, n, kind)
            sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            for _ in range(3):
                sess.run(None, feed)
            sessions.append((kind, 2.0 * m * k * n, sess, feed))
    for _ in range(max(1, rounds)):
        for kind, flops, sess, feed in sessions:
            fastest = float("inf")
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feed)
                fastest = min(fastest, time.perf_counter() - t0)
            best[kind] = max(best[kind], flops / fastest / 1e9)
    return Peaks(best["fp32"], best["u8s8"], threads, u8u8_gops=best["u8u8"])


@dataclass(frozen=True)
class GraphFlops:
    per_token: float  # FLOPs of the constant-weight matmuls per token
    integer: bool  # whether those matmuls run integer kernels
    uint8_weights: bool = False  # every integer one has uint8 weights (the u8 x u8 peak applies)

    @property
    def kernel(self) -> str:
        """The probe kind whose peak applies: ``fp32``, ``u8s8`` or ``u8u8``."""
        return ("u8u8" if self.uint8_weights else "u8s8") if self.integer else "fp32"


def graph_flops(model_path: str | Path) -> GraphFlops:
    """2*K*N per token summed over the graph's matmuls with a constant weight (followed back
    through DequantizeLinear / Cast / Transpose to an initializer); MatMulNBits from its K, N."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    dims: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    total, integer = 0.0, False
    weight_types: set[int] = set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            dims[node.output[0]] = list(attrs["value"].dims)
        elif node.op_type in _PASS_THROUGH and node.input and node.input[0] in dims:
            d = dims[node.input[0]]
            if node.op_type == "Transpose":
                d = [d[p] for p in attrs.get("perm", list(range(len(d)))[::-1])]
            dims[node.output[0]] = d
        elif node.op_type == "MatMulNBits":
            total += 2.0 * int(attrs["K"]) * int(attrs["N"])
        elif node.op_type in _WEIGHT_OPS and len(node.input) > 1 and node.input[1] in dims:
            d = dims[node.input[1]]
            if len(d) == 2:
                total += 2.0 * d[0] * d[1]
                if node.op_type in INTEGER_OPS:
                    integer = True
                    weight_types.add(dtypes.get(node.input[1], -1))
    return GraphFlops(total, integer, weight_types == {onnx.TensorProto.UINT8})
