"""CPU pre-flight: would TensorRT's ONNX parser accept an artifact's graph, and if not, what to do.

No TensorRT needed: the graph is read with ``onnx`` and checked against the parser's documented
operator table (``echoembed.engines.ops``) and the Q/DQ rules of its importer
(``QuantDequantLinearHelper`` in onnx-tensorrt ``onnxOpImporters.cpp``, release/10.1-GA; the
TensorRT operator reference for IQuantizeLayer/IDequantizeLayer): scales build-time constant and
positive, zero points constant and all zero (never uint8), activations quantized per tensor,
per-channel weight scales on the output axis, INT4 only as block-quantized weights (opset 21
``block_size``, no zero point, even last dimension) feeding a MatMul/Gemm.
Every node's op (and domain) must be in the table, with a data type the table lists; the opset in
the documented range; graph inputs of a type TensorRT binds. Dynamic axes are reported (an engine
build needs an optimization profile for each); they are not a failure.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echoembed.engines import ops as table
from echoembed.errors import ArtifactError, UserError, require

MODEL_LEVEL = "(model)"
INT8_STATIC = "quantize with int8-static (int8 activations, zero point 0: the default)"
INT4_QDQ = "quantize with int4-qdq (signed INT4, DequantizeLinear block_size, no zero point)"
_OP_FIXES = {
    "DynamicQuantizeLinear": "int8-dynamic quantizes activations at run time for MatMulInteger, "
    "which TensorRT cannot import: quantize with int8-static (int8 activations) instead",
    "MatMulNBits": "int4-rtn/int4-hqq/int4-gptq/int8-blockwise write com.microsoft MatMulNBits "
    "(packed uint4/uint8 weights; no TensorRT type or importer): use int4-qdq or int8-static",
    "GatherBlockQuantized": "the 4-bit recipes' embedding table (com.microsoft "
    "GatherBlockQuantized) has no TensorRT importer: use int4-qdq (the table stays float)",
    "QLinearMatMul": "QOperator INT8 has no TensorRT importer: quantize with int8-static (Q/DQ)",
}
_FUSED = (
    "the fused export stage wrote ONNX Runtime's {op} (no TensorRT importer): re-export with "
    "--no-fuse for TensorRT (ExportConfig(fuse=False)), then quantize/build from that artifact"
)
for _op in ("GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding",
            "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
            "SkipLayerNormalization", "FusedMatMul"):  # fmt: skip
    _OP_FIXES[_op] = _FUSED.format(op=_op)
for _op in ("MatMulInteger", "MatMulIntegerToFloat"):  # int8-dynamic (per-token: both)
    _OP_FIXES[_op] = _OP_FIXES["DynamicQuantizeLinear"]
_OP_FIXES["QLinearConv"] = _OP_FIXES["ConvInteger"] = _OP_FIXES["QLinearMatMul"]
_RULE_FIXES = {
    "qdq-scale-constant": "TensorRT needs build-time constant scales: calibrate the ranges "
    "(int8-static writes them as initializers)",
    "qdq-scale-positive": "every scale must be > 0: re-quantize, and exclude (--exclude) a "
    "layer whose range is all zero",
    "qdq-activation-per-channel": "TensorRT quantizes activations per tensor only: " + INT8_STATIC,
    "qdq-weight-axis": "per-channel weight scales must run along the output channels (axis 1 "
    "of a MatMul's B): re-quantize with int8-static (or --per-tensor)",
    "qdq-weight-type": "uint8/uint4 weights have no TensorRT quantized type: use signed int8 "
    "(int8-static) or INT4 (int4-qdq)",
    "qdq-input": "TensorRT's Q/DQ importer needs the scale input: re-quantize",
    "int4-weight": "TensorRT imports INT4 only as constant weights: " + INT4_QDQ,
    "int4-block": "TensorRT imports INT4 only block-quantized (scale of the weight's rank, "
    "opset-21 block_size): " + INT4_QDQ,
    "int4-zero-point": "TensorRT's INT4 weight-only path is symmetric: drop the zero point; "
    + INT4_QDQ,
    "int4-odd-dim": "INT4 needs an even last dimension: exclude that layer (--exclude)",
    "int4-consumer": "TensorRT's INT4 weight-only path is DequantizeLinear -> MatMul/Gemm: "
    + INT4_QDQ,
}
_DATA_INPUT = {"Where": 1}  # which input's type the table's column describes (default 0)
_NO_TYPE_CHECK = {"QuantizeLinear", "DequantizeLinear", "Constant"}


@dataclass(frozen=True)
class PreflightConfig:
    """What to check: an artifact directory (or a bare ``.onnx`` file), for a TensorRT 10.x
    (None: the newest documented table)."""

    artifact: str | os.PathLike[str]
    trt_version: str | None = None


@dataclass(frozen=True)
class Problem:
    """One reason the parser would reject the graph: where, which rule, and what to do."""

    node: str
    op: str
    rule: str
    fix: str
    detail: str = ""


@dataclass(frozen=True)
class ProblemGroup:
    """Problems sharing (op, rule), for a readable report on a many-layer model."""

    op: str
    rule: str
    fix: str
    detail: str  # the first problem's
    count: int
    nodes: tuple[str, ...]  # the first few


@dataclass(frozen=True)
class DynamicInput:
    """A graph input with dynamic axes: an engine build needs an optimization profile for it."""

    name: str
    dtype: str
    axes: tuple[str, ...]


@dataclass(frozen=True)
class PreflightReport:
    """The verdict for one graph against one TensorRT version's documented parser."""

    source: str
    recipe: str | None
    trt_version: str  # as asked
    table_version: str  # the documented table it was checked against
    opset: int
    opset_range: tuple[int, int]
    nodes: int
    op_counts: dict[str, int]
    problems: tuple[Problem, ...]  # any one: the parser would reject the graph
    warnings: tuple[Problem, ...] = ()  # outside what is documented, not refused
    dynamic_inputs: tuple[DynamicInput, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def groups(self, max_nodes: int = 3) -> tuple[ProblemGroup, ...]:
        """One entry per (op, rule), in first-seen order, naming the first ``max_nodes`` nodes."""
        by_key: dict[tuple[str, str], list[Problem]] = {}
        for p in self.problems:
            by_key.setdefault((p.op, p.rule), []).append(p)
        return tuple(
            ProblemGroup(
                op, rule, ps[0].fix, ps[0].detail, len(ps), tuple(p.node for p in ps[:max_nodes])
            )
            for (op, rule), ps in by_key.items()
        )


def resolve_trt_version(version: str) -> tuple[str, str | None]:
    """(documented table to check against, a note when that is not ``version`` itself)."""
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.\d+)*", version.strip())
    if m is None or m.group(1) != "10":
        raise UserError(
            f"--trt-version {version!r}: only TensorRT 10.x parser tables are recorded "
            f"({', '.join(table.OPSET_RANGES)}); give e.g. 10.15"
        )
    minor = int(m.group(2) or 0)
    known = sorted((int(v.split(".")[1]), v) for v in table.OPSET_RANGES)
    chosen = [v for n, v in known if n <= minor][-1]
    if chosen == version.strip():
        return chosen, None
    newer = minor > known[-1][0]
    why = "the newest documented" if newer else "the newest documented one not newer"
    return chosen, f"TensorRT {version} checked against {chosen}'s table ({why})"


def preflight(config: PreflightConfig) -> PreflightReport:
    """Check an artifact's graph (or a ``.onnx`` file) against TensorRT's ONNX parser."""
    onnx = require("onnx", "export")
    path = Path(config.artifact)
    recipe = None
    if path.is_dir():
        from echoembed.artifact import read_manifest

        manifest = read_manifest(path)
        recipe = manifest.quantization.recipe if manifest.quantization else manifest.precision
        path = path / manifest.model_file
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file; pass an artifact directory or a .onnx")
    model = onnx.load(str(path), load_external_data=False)
    return check_model(
        model, config.trt_version, recipe=recipe, base_dir=path.parent, source=str(path)
    )


def check_model(
    model: Any,
    trt_version: str | None = None,
    recipe: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    source: str = "<model>",
) -> PreflightReport:
    """Check an ``onnx.ModelProto`` (external data is read from ``base_dir`` where needed)."""
    from onnx import TensorProto

    trt_version = trt_version or table.LATEST
    table_version, note = resolve_trt_version(trt_version)
    g = _Graph(model, base_dir, recipe)
    lo, hi = table.OPSET_RANGES[table_version]
    problems, warnings = _check_opset(g.opset, lo, hi, table_version)
    problems += _check_io(model)
    supported = table.supported_ops(table_version)
    for node in g.nodes:
        problems += _check_op(node, g, supported, table_version)
        if node.domain in table.DEFAULT_DOMAINS and node.op_type in (
            "QuantizeLinear",
            "DequantizeLinear",
        ):
            problems += _check_qdq(node, g)
    notes = [n for n in (note, g.type_note) if n]
    dynamic = _dynamic_inputs(model)
    if dynamic:
        notes.append(
            "dynamic axes: build the engine with an optimization profile (min/opt/max "
            "shapes) for " + ", ".join(f"{d.name}[{', '.join(d.axes)}]" for d in dynamic)
        )
    if any(v.type.tensor_type.elem_type == TensorProto.INT64 for v in model.graph.input):
        notes.append("int64 inputs: TensorRT >= 9.0 imports INT64 I/O natively (bind int64)")
    counts = Counter(_op_name(n) for n in g.nodes)
    return PreflightReport(
        source=source,
        recipe=recipe,
        trt_version=trt_version,
        table_version=table_version,
        opset=g.opset,
        opset_range=(lo, hi),
        nodes=len(g.nodes),
        op_counts=dict(counts),
        problems=tuple(problems),
        warnings=tuple(warnings),
        dynamic_inputs=dynamic,
        notes=tuple(notes),
    )


class _Graph:
    """What the checks look up: nodes (subgraphs included), constants, types, shapes, readers."""

    def __init__(self, model: Any, base_dir: str | os.PathLike[str] | None, recipe: str | None):
        from onnx import TensorProto

        self.model, self.recipe = model, recipe
        self.base_dir = None if base_dir is None else str(base_dir)
        self.opset = next(
            (int(i.version) for i in model.opset_import if i.domain in table.DEFAULT_DOMAINS), 0
        )
        self.nodes = list(_walk(model.graph))
        self.constants = {t.name: t for t in _initializers(model.graph)}
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in table.DEFAULT_DOMAINS:
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[n.output[0]] = value
        self.quantized = {n.output[0] for n in self.nodes if n.op_type == "QuantizeLinear"}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.types = {k: TensorProto.DataType.Name(t.data_type) for k, t in self.constants.items()}
        self.shapes = {k: tuple(t.dims) for k, t in self.constants.items()}
        self.type_note = self._infer_types()

    def _infer_types(self) -> str | None:
        from onnx import TensorProto, shape_inference

        try:
            inferred = shape_inference.infer_shapes(self.model)
        except Exception as e:  # noqa: BLE001 - onnx raises several types; types are a bonus
            return f"shape inference failed ({type(e).__name__}): op data types not checked"
        g = inferred.graph
        for v in (*g.input, *g.value_info, *g.output):
            tt = v.type.tensor_type
            if tt.elem_type and v.name not in self.types:
                self.types[v.name] = TensorProto.DataType.Name(tt.elem_type)
            if tt.HasField("shape") and v.name not in self.shapes:
                self.shapes[v.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
                )
        return None

    def value(self, name: str):
        """A constant's values as a numpy array, or None when computed at run time."""
        from onnx import numpy_helper

        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t, self.base_dir or "")


def _walk(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in (*([a.g] if a.HasField("g") else []), *a.graphs):
                yield from _walk(sub)


def _initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            for sub in (*([a.g] if a.HasField("g") else []), *a.graphs):
                yield from _initializers(sub)


def _op_name(node: Any) -> str:
    return node.op_type if node.domain in table.DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"


def _check_opset(opset: int, lo: int, hi: int, version: str) -> tuple[list, list]:
    """(problems, warnings): below the documented range fails; above it is a warning, since
    the parser itself refuses only opsets < 7 (ModelImporter.cpp) and imports ops by name."""
    if lo <= opset <= hi:
        return [], []
    detail = f"the graph imports ai.onnx opset {opset}; TensorRT {version} documents {lo}-{hi}"
    if opset < lo:
        fix = f"re-export with --opset {lo} or newer (the exporter's default is 18)"
        return [Problem(MODEL_LEVEL, "opset", "opset-range", fix, detail)], []
    top = table.OPSET_RANGES[table.LATEST]
    fix = (
        f"undocumented for {version}, not refused: TensorRT {table.LATEST} documents opsets "
        f"{top[0]}-{top[1]} (--trt-version {table.LATEST}); or re-export with --opset {hi} where "
        "no op needs a newer one (int4-qdq's block_size needs 21)"
    )
    return [], [Problem(MODEL_LEVEL, "opset", "opset-above-documented", fix, detail)]


def _check_io(model: Any) -> list[Problem]:
    from onnx import TensorProto

    out = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            onnx_type = TensorProto.DataType.Name(v.type.tensor_type.elem_type)
            if table.TRT_TYPES.get(onnx_type) not in table.IO_TYPES:
                out.append(
                    Problem(
                        v.name,
                        f"graph {kind}",
                        "io-type",
                        f"cast the {kind} to int64/int32/float32 in the graph (re-export)",
                        f"{kind} {v.name} is {onnx_type}; TensorRT binds "
                        + ", ".join(table.IO_TYPES),
                    )
                )
    return out


def _dynamic_inputs(model: Any) -> tuple[DynamicInput, ...]:
    from onnx import TensorProto

    out = []
    for v in model.graph.input:
        tt = v.type.tensor_type
        axes = tuple(
            d.dim_param or f"axis{i}"
            for i, d in enumerate(tt.shape.dim)
            if not d.HasField("dim_value")
        )
        if axes:
            dtype = table.TRT_TYPES.get(TensorProto.DataType.Name(tt.elem_type), "?")
            out.append(DynamicInput(v.name, dtype, axes))
    return tuple(out)


def _check_op(node: Any, g: _Graph, supported: dict, version: str) -> list[Problem]:
    """The op (and its domain) in the table, with a data type the table lists for it."""
    name, op = node.name or node.output[0], node.op_type
    if node.domain not in table.DEFAULT_DOMAINS:
        if (node.domain, op) in table.KNOWN_PLUGINS:
            return []
        fix = _OP_FIXES.get(op, f"re-export without {node.domain} ops (or write a TensorRT plugin)")
        detail = (
            f"{node.domain}:{op} has no TensorRT importer, and TensorRT ships no plugin "
            "of that name"
        )
        return [Problem(name, _op_name(node), "domain", fix, detail)]
    spec = supported.get(op)
    if spec is None:
        listed = "listed as unsupported" if op in table.UNSUPPORTED else "not in the table"
        fix = _OP_FIXES.get(op, f"re-export without {op}, or register a TensorRT plugin named {op}")
        detail = f"{op} is {listed} for TensorRT {version}'s ONNX parser"
        return [Problem(name, op, "unsupported-op", fix, detail)]
    if op in _NO_TYPE_CHECK or not node.input:
        return []
    idx = _DATA_INPUT.get(op, 0)
    onnx_type = g.types.get(node.input[idx]) if idx < len(node.input) else None
    if onnx_type is None:
        return []
    trt_type = "FP32" if onnx_type == "DOUBLE" else table.TRT_TYPES.get(onnx_type, onnx_type)
    if trt_type in spec.types:
        return []
    detail = f"{op} on {onnx_type}; TensorRT imports it for {', '.join(spec.types)}"
    fix = f"cast to a type {op} supports (re-export)"
    if g.recipe == "int8-dynamic":  # its per-token scales: uint8 zero points (Expand)
        fix = _OP_FIXES["DynamicQuantizeLinear"]
    return [Problem(name, op, "op-type", fix, detail)]


def _check_qdq(node: Any, g: _Graph) -> list[Problem]:
    """The importer's rules for a QuantizeLinear/DequantizeLinear node."""
    name, op = node.name or node.output[0], node.op_type
    problems: list[Problem] = []

    def flag(rule: str, detail: str, fix: str | None = None) -> None:
        problems.append(Problem(name, op, rule, fix or _RULE_FIXES[rule], detail))

    if len(node.input) < 2 or not node.input[1]:
        flag("qdq-input", "no scale input")
        return problems
    x, scale_name = node.input[0], node.input[1]
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    scale = g.value(scale_name)
    if scale is None:
        flag("qdq-scale-constant", f"scale {scale_name} is computed at run time")
    elif not (scale > 0).all():
        flag("qdq-scale-positive", f"scale {scale_name} has {int((scale <= 0).sum())} values <= 0")
    x_type = g.types.get(x)
    if op == "DequantizeLinear" and x_type == "INT4":
        return problems + _check_int4(node, g, scale, zp_name)
    if zp_name is not None:
        _check_zero_point(zp_name, g, flag)
    is_weight = x in g.constants
    if op == "QuantizeLinear" and not is_weight and scale is not None and scale.size > 1:
        flag("qdq-activation-per-channel", f"activation {x} has {scale.size} scales")
    if op == "DequantizeLinear" and x_type in ("UINT8", "UINT4"):
        if is_weight:
            flag("qdq-weight-type", f"weight {x} is {x_type}")
        elif x not in g.quantized:  # a QuantizeLinear's output is INT8 in TensorRT (or flagged)
            flag("qdq-uint8", f"input {x} is {x_type}", _zero_point_fix(g.recipe))
    if op == "DequantizeLinear" and is_weight and scale is not None and scale.ndim == 1:
        _check_weight_axis(node, g, scale, flag)
    return problems


def _zero_point_fix(recipe: str | None) -> str:
    if recipe == "int8-static":
        return "re-quantize with int8-static --activations int8 (zero point 0, the default)"
    return "TensorRT quantization is symmetric: " + INT8_STATIC


def _check_zero_point(zp_name: str, g: _Graph, flag) -> None:
    zp_type = g.types.get(zp_name)
    zp = g.value(zp_name)
    fix = _zero_point_fix(g.recipe)
    if zp_type == "UINT8":
        where = "" if zp is None else f" (values {sorted({int(v) for v in zp.ravel()[:64]})[:3]})"
        flag("qdq-uint8", f"zero point {zp_name} is uint8{where}; TensorRT has no uint8 Q/DQ", fix)
    elif zp is None:
        flag("qdq-zero-point", f"zero point {zp_name} is computed at run time", fix)
    elif zp.any():
        flag(
            "qdq-zero-point",
            f"asymmetric: zero point {zp_name} has {int((zp != 0).sum())} non-zero values",
            fix,
        )


def _check_weight_axis(node: Any, g: _Graph, scale, flag) -> None:
    """Per-channel weight scales: along the output channels of the MatMul/Gemm reading them."""
    shape = g.shapes.get(node.input[0], ())
    if scale.size <= 1 or not shape:
        return
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis + len(shape) if axis < 0 else axis
    for consumer, idx in g.consumers.get(node.output[0], []):
        want = None
        if consumer.op_type == "MatMul" and idx == 1 and len(shape) == 2:
            want = 1
        elif consumer.op_type == "Gemm" and idx == 1:
            trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
            want = 0 if trans_b else 1
        if want is not None and axis != want:
            flag(
                "qdq-weight-axis",
                f"{scale.size} scales on axis {axis} of weight "
                f"{node.input[0]} {list(shape)}; {consumer.op_type} needs axis {want}",
            )
            return


def _check_int4(node: Any, g: _Graph, scale, zp_name: str | None) -> list[Problem]:
    """INT4: a constant weight, block-quantized (opset 21 block_size), no zero point, -> MatMul."""
    name, op = node.name or node.output[0], node.op_type
    out = []

    def flag(rule: str, detail: str) -> None:
        out.append(Problem(name, op, rule, _RULE_FIXES[rule], detail))

    x = node.input[0]
    shape = g.shapes.get(x, ())
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if x not in g.constants:
        flag("int4-weight", f"INT4 input {x} is computed at run time")
    if g.opset < 21 or block <= 0 or scale is None or scale.ndim != len(shape):
        got = "no scale" if scale is None else f"scale of rank {scale.ndim}"
        flag(
            "int4-block",
            f"opset {g.opset}, block_size {block or 'unset'}, {got} for a "
            f"weight of rank {len(shape)}",
        )
    if zp_name is not None:
        flag("int4-zero-point", f"zero point {zp_name} given")
    if shape and shape[-1] is not None and shape[-1] % 2:
        flag("int4-odd-dim", f"weight {x} {list(shape)} has an odd last dimension")
    readers = g.consumers.get(node.output[0], [])
    bad = [c.op_type for c, i in readers if not (c.op_type in ("MatMul", "Gemm") and i == 1)]
    if bad or not readers:
        flag("int4-consumer", f"read by {', '.join(bad) or 'nothing'}, not as MatMul/Gemm B")
    return out


def format_report(report: PreflightReport, max_nodes: int = 3) -> str:
    """The report as `echoembed inspect --trt` prints it: one entry per (op, rule)."""
    r = report
    n = len(r.problems)
    verdict = "PASSES" if r.passed else f"REJECTED, {n} problem{'s' * (n != 1)}"
    lo, hi = r.opset_range
    asked = "" if r.trt_version == r.table_version else f" (asked: {r.trt_version})"
    lines = [
        f"tensorrt         TensorRT {r.table_version}{asked} ONNX parser pre-flight: {verdict} "
        f"({r.nodes} nodes, {len(r.op_counts)} op types, opset {r.opset} of {lo}-{hi})",
        f"trt table        onnx-tensorrt docs/operators.md for TensorRT {r.table_version}",
    ]
    for grp in r.groups(max_nodes):
        more = f" (+{grp.count - len(grp.nodes)} more)" if grp.count > len(grp.nodes) else ""
        lines.append(f"  x{grp.count} {grp.op} [{grp.rule}]: {', '.join(grp.nodes)}{more}")
        if grp.detail:
            lines.append(f"      {grp.detail}")
        lines.append(f"      fix: {grp.fix}")
    for w in r.warnings:
        lines.append(f"  warning {w.op} [{w.rule}]: {w.detail}")
        lines.append(f"      {w.fix}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
