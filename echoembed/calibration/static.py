"""INT8 static QDQ: activation ranges from calibration data, symmetric int8 Q/DQ pairs.

Ranges are measured on the real tokens of fixed-shape calibration batches (padding never counts),
with one of three calibrators:

- ``minmax``: the largest |x| seen;
- ``percentile``: the given percentile of |x| (from a 2,048-bin histogram);
- ``entropy``: the clipping threshold whose 128-level quantized distribution is closest (KL
  divergence) to the histogram of |x|, as in TensorRT's entropy calibrator.

Weights are symmetric int8 (zero point 0); activations are symmetric too, as int8 with zero
point 0 (the explicit-quantization form TensorRT consumes) or as uint8 with zero point 128 (the
same grid, which ONNX Runtime's CPU provider fuses into ``MatMulIntegerToFloat``). Ranges are
cached in a JSON file written atomically with the float graph's checksum, the template, the
calibration texts' sha256 and the calibrator settings: a cache whose fields differ is stale and
is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echoembed.artifact import atomic_write_json, sha256_file
from echoembed.calibration.graph import LinearNode, probe, rewrite_graph
from echoembed.errors import InputError, require

if TYPE_CHECKING:
    from onnx import NodeProto

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BINS = 2048
QUANT_LEVELS = 128  # symmetric int8: |q| in 0..127


@dataclass(frozen=True)
class CacheKey:
    """What a set of ranges depends on; any difference makes a cache stale."""

    model_sha256: str  # of the saved float graph (and its external data) the ranges came from
    template: str
    calibration_sha256: str
    method: str
    percentile: float


def files_sha256(model_path: Path) -> str:
    """sha256 over a saved graph and its external data file, if any (a ModelProto over 2 GiB
    cannot be serialized in memory, and hashing the file costs no second copy)."""
    parts = [model_path, model_path.with_name(model_path.name + ".data")]
    digests = [sha256_file(p) for p in parts if p.is_file()]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def read_cache(path: Path, key: CacheKey) -> dict[str, float] | None:
    """The cached ranges, or None (with a log line saying why) when absent or stale."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = data["key"]
        ranges = {str(k): float(v) for k, v in data["ranges"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("calibration cache %s is unreadable (%s); recomputing", path, e)
        return None
    if data.get("version") != CACHE_VERSION:
        log.warning("calibration cache %s has another version; recomputing", path)
        return None
    diff = [f for f, v in asdict(key).items() if stored.get(f) != v]
    if diff:
        log.warning("calibration cache %s is stale (%s differ); recomputing", path, ", ".join(diff))
        return None
    return ranges


def write_cache(path: Path, key: CacheKey, ranges: dict[str, float]) -> None:
    """Write the cache atomically (``echoembed.artifact.atomic_write_json``)."""
    payload = {"version": CACHE_VERSION, "key": asdict(key), "ranges": ranges}
    atomic_write_json(path, payload, indent=1)


def _entropy_threshold(hist: np.ndarray, width: float) -> float:
    """KL-optimal clipping threshold of a histogram of |x| (bins of ``width`` from 0)."""
    hist = hist.astype(np.float64)
    best, best_kl = len(hist), np.inf
    for i in range(QUANT_LEVELS, len(hist) + 1, 8):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        if ref.sum() == 0:
            continue
        # quantize the first i bins into QUANT_LEVELS levels, spread back over non-empty bins
        edges = np.linspace(0, i, QUANT_LEVELS + 1).astype(int)
        q = np.zeros(i)
        src = hist[:i]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            if b <= a:
                continue
            nonzero = src[a:b] > 0
            n = nonzero.sum()
            if n:
                q[a:b][nonzero] = src[a:b].sum() / n
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return (best + 0.5) * width


def collect_ranges(
    model,
    tensors: list[str],
    reader,
    method: str,
    percentile: float = 99.99,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, float]:
    """Symmetric clipping threshold (>= 0) of each tensor over the real calibration tokens."""
    if method not in ("minmax", "percentile", "entropy"):
        raise InputError(f"unknown calibration method {method!r}; use minmax, percentile, entropy")
    amax: dict[str, float] = {}
    for batch in probe(model, tensors, reader):
        for name, value in batch.items():
            amax[name] = max(amax.get(name, 0.0), float(np.abs(value).max(initial=0.0)))
    if method == "minmax":
        return amax
    progress(f"  {method}: histograms of {len(tensors)} tensors ...")
    hists = {n: np.zeros(BINS, dtype=np.int64) for n in tensors}
    for batch in probe(model, tensors, reader):
        for name, value in batch.items():
            top = max(amax[name], 1e-12)
            h, _ = np.histogram(np.abs(value), bins=BINS, range=(0.0, top))
            hists[name] += h
    out = {}
    for name, hist in hists.items():
        width = max(amax[name], 1e-12) / BINS
        if method == "percentile":
            cdf = np.cumsum(hist) / max(hist.sum(), 1)
            idx = int(np.searchsorted(cdf, percentile / 100.0))
            out[name] = min((idx + 1) * width, amax[name])
        else:
            out[name] = min(_entropy_threshold(hist, width), amax[name])
    return out


def insert_qdq(
    model,
    nodes: list[LinearNode],
    ranges: dict[str, float],
    per_channel: bool,
    activations: str = "int8",
    weight_max: int = 127,
) -> None:
    """Rewrite each linear MatMul to ``DQ(Q(x)) @ DQ(W_int8)`` in place.

    Activations are symmetric either way: int8 with zero point 0 (TensorRT), or uint8 with zero
    point 128 (the same grid, shifted), which ONNX Runtime's CPU provider fuses with the weight
    into ``MatMulIntegerToFloat``; with int8 activations it leaves the Q/DQ pairs unfused and runs
    at fp32 speed (measured on SmolLM2: 2.2x faster with uint8, same cosine). ``weight_max``
    63 gives 7-bit weights (``reduce_range``: no saturation in u8 x s8 kernels without VNNI)."""
    zero = np.array(128, dtype=np.uint8) if activations == "uint8" else np.array(0, dtype=np.int8)
    require("onnx", "export")
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_inits, qdq_of = [], {}
    before: dict[str, list] = {}  # node name -> nodes to insert before it
    for ln in nodes:
        x = ln.input
        if x not in qdq_of:
            tensors, pair = _activation_qdq(x, max(ranges[x], 1e-8), zero)
            new_inits += tensors
            before.setdefault(ln.name, []).extend(pair)
            qdq_of[x] = pair[-1].output[0]
        w = numpy_helper.to_array(inits[ln.weight]).astype(np.float32)  # [K, N]
        tensors, dq = _weight_dq(ln.module, w, per_channel, weight_max)
        new_inits += tensors
        before.setdefault(ln.name, []).append(dq)
    _splice(model, {ln.name: ln for ln in nodes}, before, qdq_of, new_inits)


def _activation_qdq(x: str, threshold: float, zero: np.ndarray) -> tuple[list, list[NodeProto]]:
    """(scale and zero point initializers, [QuantizeLinear, DequantizeLinear]) for tensor ``x``;
    the DequantizeLinear's output ``<x>/dq`` is what the linear node reads instead of ``x``."""
    from onnx import helper, numpy_helper

    s, z = f"{x}/act_scale", f"{x}/act_zero"
    tensors = [
        numpy_helper.from_array(np.array(threshold / 127.0, dtype=np.float32), s),
        numpy_helper.from_array(zero, z),
    ]
    pair = [
        helper.make_node("QuantizeLinear", [x, s, z], [f"{x}/q"], name=f"{x}/Q"),
        helper.make_node("DequantizeLinear", [f"{x}/q", s, z], [f"{x}/dq"], name=f"{x}/DQ"),
    ]
    return tensors, pair


def _weight_dq(
    base: str, w: np.ndarray, per_channel: bool, weight_max: int
) -> tuple[list, NodeProto]:
    """Symmetric int8 weight ``<base>.weight_int8`` (|q| <= ``weight_max``, zero point 0, a scale
    per output channel or one), and the DequantizeLinear giving ``<base>.weight_dq``."""
    from onnx import helper, numpy_helper

    wmax = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
    ws = (np.maximum(wmax, 1e-12) / weight_max).astype(np.float32)
    wq = np.clip(np.round(w / ws), -weight_max, weight_max).astype(np.int8)
    names = [f"{base}.weight_int8", f"{base}.weight_scale", f"{base}.weight_zero"]
    tensors = [
        numpy_helper.from_array(wq, names[0]),
        numpy_helper.from_array(ws, names[1]),
        numpy_helper.from_array(np.zeros(ws.shape, dtype=np.int8), names[2]),
    ]
    attrs = {"axis": 1} if per_channel else {}
    dq = helper.make_node(
        "DequantizeLinear", names, [f"{base}.weight_dq"], name=f"{base}/weight_DQ", **attrs
    )
    return tensors, dq


def _splice(model, by_name: dict[str, LinearNode], before, qdq_of, new_inits) -> None:
    """Insert the Q/DQ nodes before their linear nodes, point those at the dequantized tensors,
    and replace the float weights no node reads any more by the new initializers."""
    out_nodes = []
    for node in model.graph.node:
        out_nodes += before.get(node.name, [])
        if node.name in by_name:
            ln = by_name[node.name]
            node.input[0] = qdq_of[ln.input]
            node.input[1] = f"{ln.module}.weight_dq"
        out_nodes.append(node)
    rewrite_graph(model, out_nodes, new_inits)
