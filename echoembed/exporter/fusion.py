"""The fused export stage: ONNX Runtime's transformer kernels in the exported graph.

onnxscript's ``optimize_for_ort`` rewrites the decomposed graph the dynamo exporter writes into
ORT's contrib ops: ``GroupQueryAttention`` with built-in rotary embedding (one node per layer for
~25 nodes of attention, masking, repeat-kv and rotary), ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (RMSNorm with the residual add). Three rewrites of our own
make its rules match and keep the result exact for echo batches:

1. rotary frequencies: the dynamo exporter folds transformers' ``inv_freq @ positions`` into a
   broadcast ``Mul``; it is restored as the ``MatMul`` the cos/sin-cache rule expects.
2. sequence lengths: onnxscript derives GroupQueryAttention's ``seqlens_k`` from position ids,
   which in our graph are one ``Range`` for every row; we take them per row from
   ``attention_mask`` instead. With right padding (what every echoembed encoder writes) and a
   causal model this is exact at every real token; padding positions are never pooled.
3. rotary angles: the cos/sin cache's outer product ``positions @ inv_freq`` is written as a
   ``Mul``, so that the INT8 and 4-bit recipes do not quantize it as a linear layer.

The stage is checked on its own (the fused graph against the unfused one in ONNX Runtime, on the
parity texts at several batch sizes; ``onnx.checker`` cannot check it, since it does not know
ORT's default-domain ``SimplifiedLayerNormalization``) before the export's parity check against
the reference.
Where it does not apply (fp16 graphs, sliding-window attention, no attention fused, a head size
ORT's CPU kernel refuses, a parity failure) the unfused graph is kept, and the reason is logged
and recorded.

Last (after the shared-prefix stage, which works on GroupQueryAttention nodes), each
GroupQueryAttention node is rewritten as ``RotaryEmbedding`` on q and k (com.microsoft, the
node's own cos/sin caches, start position 0) and the standard ONNX ``Attention`` (opset 23,
``is_causal=1``, GQA heads, no mask): on a 2-core Ice Lake it ran one layer 1.17-1.55x faster
than ORT's CPU GroupQueryAttention (``benchmarks/attention_kernels.py``). Without a mask it is
exact only at real tokens of right-padded rows, as the fused graph already requires. It is
checked against the GroupQueryAttention graph on its own; where ORT or a parity check refuses
it, the GroupQueryAttention graph stays (logged). ``ExportConfig(onnx_attention=False)`` keeps
GroupQueryAttention.
"""

from __future__ import annotations

import collections
import importlib.metadata as md
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.artifact import OUTPUT_NAME, FusionInfo
from echoembed.echo import EchoEncoder, l2_normalize
from echoembed.errors import require

log = logging.getLogger(__name__)

# contrib ops the stage may produce (anything else in com.microsoft is a surprise: refused)
FUSED_OPS = (
    "GroupQueryAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "FusedMatMul",
    "FastGelu",
    "BiasGelu",
    "Gelu",
)
ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention")
# the standard ONNX attention op the last step writes (default domain, opset 23)
ONNX_ATTENTION_OPSET = 23
ONNX_ATTENTION_IR_VERSION = 11
# ORT's CPU GroupQueryAttention/MultiHeadAttention kernels need head sizes that are multiples of
# this (SmolLM2: 64; the tiny test models' 8 are refused at run time)
HEAD_SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class FusionSettings:
    """What the stage checks the fused graph with."""

    tolerance: float  # max abs diff of normalized embeddings, fused vs unfused
    batch_sizes: tuple[int, ...]
    texts: tuple[str, ...]
    threads: int | None = None


class FusionNotApplied(Exception):
    """The fused graph is not used (the reason is recorded in the manifest); not a user error."""


def _tool() -> str:
    try:
        return f"onnxscript {md.version('onnxscript')} optimize_for_ort"
    except md.PackageNotFoundError:
        return "onnxscript (not installed)"


def not_applied(reason: str, requested: bool = True) -> FusionInfo:
    return FusionInfo(requested=requested, applied=False, reason=reason, tool=_tool())


def _const(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _is_rope_freqs(node) -> tuple[object, np.ndarray] | None:
    """(positions [S], inv_freq [E]) when ``node`` is ``Mul(Cast(Unsqueeze(positions, [0, 2])),
    inv_freq)`` feeding ``Concat(freqs, freqs)``: the dynamo form of HF's rotary frequencies."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return None
    x, c = node.inputs
    if c is None or c.const_value is None or len(c.shape or ()) != 1:
        return None
    cast = x.producer() if x is not None else None
    if cast is None or cast.op_type != "Cast":
        return None
    unsq = cast.inputs[0].producer()
    if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.inputs) < 2:
        return None
    axes = unsq.inputs[1].const_value
    if axes is None or list(axes.numpy().reshape(-1)) != [0, 2]:
        return None
    positions = unsq.inputs[0]
    if positions.shape is None or len(positions.shape) != 1:
        return None
    users = [u for u, _ in node.outputs[0].uses()]
    if not users or not all(u.op_type == "Concat" for u in users):
        return None
    return positions, c.const_value.numpy().astype(np.float32)


def restore_rope_matmul(model) -> int:
    """Rewrite every dynamo-folded rotary frequency ``Mul`` as ``Transpose(MatMul(inv_freq[1,E,1],
    positions[1,1,S]))``, the form onnxscript's cos/sin-cache rule matches. Returns the count."""
    import onnx_ir as ir

    graph, done = model.graph, 0
    for node in list(graph):
        found = _is_rope_freqs(node)
        if found is None:
            continue
        positions, inv_freq = found
        k = done
        inv3 = _const(graph, f"echoembed_rope_inv_freq_{k}", inv_freq.reshape(1, -1, 1))
        axes = _const(graph, f"echoembed_rope_axes_{k}", np.array([0, 1], dtype=np.int64))
        unsq = ir.node("Unsqueeze", [positions, axes], name=f"echoembed_rope_unsqueeze_{k}")
        cast = ir.node(
            "Cast", [unsq.outputs[0]], attributes={"to": ir.DataType.FLOAT},
            name=f"echoembed_rope_cast_{k}",
        )  # fmt: skip
        mm = ir.node("MatMul", [inv3, cast.outputs[0]], name=f"echoembed_rope_matmul_{k}")
        tr = ir.node(
            "Transpose", [mm.outputs[0]], attributes={"perm": [0, 2, 1]},
            name=f"echoembed_rope_transpose_{k}",
        )  # fmt: skip
        graph.insert_before(node, [unsq, cast, mm, tr])
        node.outputs[0].replace_all_uses_with(tr.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    return done


def angles_as_mul(model) -> int:
    """Rewrite the cos/sin cache's ``MatMul(positions[T,1], inv_freq[1,E])`` (an outer product
    the cos/sin-cache rule writes) as the equal broadcast ``Mul``, so that no quantizer takes it
    for a linear layer (8-bit positions would shift every rotary angle). Returns the count."""
    import onnx_ir as ir

    graph, done = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x, w = node.inputs
        users = {u.op_type for u, _ in node.outputs[0].uses()}
        if (
            w is None
            or w.const_value is None
            or w.shape is None
            or len(w.shape) != 2
            or w.shape[0] != 1
            or x is None
            or x.shape is None
            or x.shape[-1] != 1
            or not users
            or not users <= {"Cos", "Sin"}
        ):
            continue
        mul = ir.node("Mul", [x, w], name=f"echoembed_rope_angles_{done}")
        graph.insert_before(node, [mul])
        node.outputs[0].replace_all_uses_with(mul.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    return done


def seqlens_from_attention_mask(model) -> int:
    """Feed every GroupQueryAttention ``seqlens_k = sum(attention_mask, 1) - 1`` and
    ``total_sequence_length = shape(input_ids)[1]`` (int32). Returns the nodes rewired."""
    import onnx_ir as ir

    graph = model.graph
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    if not gqa:
        return 0
    inputs = {v.name: v for v in graph.inputs}
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    axis = _const(graph, "echoembed_seqlen_axis", np.array([1], dtype=np.int64))
    one = _const(graph, "echoembed_seqlen_one", np.array(1, dtype=np.int32))
    total_sum = ir.node(
        "ReduceSum", [mask, axis], attributes={"keepdims": 0}, name="echoembed_seqlen_sum"
    )
    as_i32 = ir.node(
        "Cast", [total_sum.outputs[0]], attributes={"to": ir.DataType.INT32},
        name="echoembed_seqlen_cast",
    )  # fmt: skip
    seqlens = ir.node("Sub", [as_i32.outputs[0], one], name="echoembed_seqlens_k")
    shape = ir.node("Shape", [ids], attributes={"start": 1, "end": 2}, name="echoembed_total_shape")
    shape_i32 = ir.node(
        "Cast", [shape.outputs[0]], attributes={"to": ir.DataType.INT32},
        name="echoembed_total_cast",
    )  # fmt: skip
    total = ir.node("Squeeze", [shape_i32.outputs[0]], name="echoembed_total_length")
    graph.insert_before(gqa[0], [total_sum, as_i32, seqlens, shape, shape_i32, total])
    for node in gqa:
        node.replace_input_with(5, seqlens.outputs[0])
        node.replace_input_with(6, total.outputs[0])
    return len(gqa)


def _head_sizes(model) -> dict[str, int]:
    """Head size of every fused attention node (from its query width and num_heads)."""
    out = {}
    for node in model.graph:
        if node.op_type not in ATTENTION_OPS:
            continue
        heads = node.attributes.get_int("num_heads", 0)
        q = node.inputs[0]
        width = q.shape[-1] if q is not None and q.shape is not None else None
        if heads and isinstance(width, int):
            if node.op_type == "GroupQueryAttention" and node.inputs[1] is None:  # packed QKV
                heads += 2 * node.attributes.get_int("kv_num_heads", 0)
            out[node.name] = width // heads
    return out


def sliding_window_reason(config) -> str | None:
    """Why a model config's attention cannot be fused: a sliding window shorter than the context
    (GroupQueryAttention as fused attends to every earlier token; the parity texts are too short
    to show it), or None."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and window >= context:
        return None
    return (
        f"sliding-window attention (window {window}, context {context}) is not fused: the fused "
        "kernel would attend beyond the window on long inputs"
    )


def fused_op_counts(graph) -> dict[str, int]:
    """{op: count} of the fused ops in ``graph`` (an ``onnx_ir`` graph): the contrib ops this
    stage knows and ONNX ``Attention``, sorted by name."""
    ops = collections.Counter(
        n.op_type for n in graph
        if (n.domain == "com.microsoft" and n.op_type in FUSED_OPS)
        or (n.domain in ("", "ai.onnx") and n.op_type in FUSED_OPS + ("Attention",))
    )  # fmt: skip
    return dict(sorted(ops.items()))


def fuse_model(model, num_layers: int) -> tuple[dict[str, int], int, int]:
    """Apply the fusions to ``model`` (an ``onnx_ir`` model) in place; returns (fused op counts,
    nodes before, nodes after). Raises ``FusionNotApplied`` with the reason when the result is not
    one to use."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    before = sum(1 for _ in model.graph)
    restore_rope_matmul(model)
    model, _counts = optimize_for_ort(model)
    angles_as_mul(model)
    seqlens_from_attention_mask(model)
    contrib = collections.Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")
    unknown = sorted(set(contrib) - set(FUSED_OPS))
    if unknown:
        raise FusionNotApplied(f"the fusions produced ops this stage does not know: {unknown}")
    ops = fused_op_counts(model.graph)
    attention = sum(ops.get(o, 0) for o in ATTENTION_OPS)
    if attention != num_layers:
        raise FusionNotApplied(
            f"attention fused in {attention} of {num_layers} layers (onnxscript's rules do not "
            "match this architecture's attention)"
        )
    bad = {n: h for n, h in _head_sizes(model).items() if h % HEAD_SIZE_MULTIPLE}
    if bad:
        raise FusionNotApplied(
            f"head size {sorted(set(bad.values()))} is not a multiple of {HEAD_SIZE_MULTIPLE}, "
            "which ONNX Runtime's CPU attention kernels need"
        )
    after = sum(1 for _ in model.graph)
    return ops, before, after


def _compare(
    unfused: Path,
    fused: Path,
    encoder: EchoEncoder,
    settings: FusionSettings,
    prefix_ids: tuple[int, ...] = (),
) -> float:
    """Max abs diff of normalized embeddings, fused vs unfused graph, in ONNX Runtime on CPU."""
    from echoembed.runtime.ort import OrtRunner

    cpu = ["CPUExecutionProvider"]
    kw = {"providers": cpu, "threads": settings.threads, "prefix_ids": prefix_ids}
    a = OrtRunner(unfused, OUTPUT_NAME, **kw)
    try:
        b = OrtRunner(fused, OUTPUT_NAME, **kw)
    except Exception as e:  # a fused graph ORT will not load: keep the unfused one
        raise FusionNotApplied(f"ONNX Runtime does not load the fused graph: {e}") from e
    texts, worst = list(settings.texts), 0.0
    for bs in settings.batch_sizes:
        for start in range(0, len(texts), bs):
            batch = encoder.encode(texts[start : start + bs])
            want = l2_normalize(a.encode(batch))
            try:
                got = l2_normalize(b.encode(batch))
            except Exception as e:
                raise FusionNotApplied(f"ONNX Runtime fails on the fused graph: {e}") from e
            if not np.isfinite(got).all():
                raise FusionNotApplied("the fused graph gives non-finite embeddings")
            worst = max(worst, float(np.abs(want - got).max()))
    if worst > settings.tolerance:
        raise FusionNotApplied(
            f"the fused graph differs from the unfused one by {worst:.2e} (max abs diff of "
            f"normalized embeddings; tolerance {settings.tolerance:.0e})"
        )
    return worst


def _rewrite_and_check(model_path: Path, work: Path, rewrite, compare):
    """Load the graph at ``model_path``, apply ``rewrite(model)`` (its result is returned), save
    the result in ``work``, run ``compare(model_path, new_path)`` and, once both succeed, move the
    new graph (and its data file) over the old one. ``FusionNotApplied`` from either leaves the
    old graph in place."""
    import onnx_ir as ir

    model = ir.load(str(model_path))
    external = any(f.name.startswith(model_path.name + ".") for f in model_path.parent.iterdir())
    result = rewrite(model)
    out = work / model_path.name
    ir.save(model, str(out), external_data=(model_path.name + ".data") if external else None)
    del model
    checked = compare(model_path, out)
    swap_in(model_path, work)
    return result, checked


def swap_in(model_path: Path, work: Path) -> None:
    """Replace the graph at ``model_path`` (and its data file) by the one of the same name
    built in ``work``."""
    for f in list(model_path.parent.iterdir()):
        if f.is_file() and f.name.startswith(model_path.name):
            f.unlink()
    for f in work.iterdir():
        if f.name.startswith(model_path.name):
            f.rename(model_path.parent / f.name)


def fuse_stage(
    model_path: Path, encoder: EchoEncoder, num_layers: int, settings: FusionSettings
) -> FusionInfo:
    """Fuse the graph at ``model_path`` in place when the stage applies and checks out; the
    unfused graph stays otherwise. Returns what was done (or why not)."""
    require("onnxscript", "export")
    work = model_path.parent / ".fusion"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        try:
            (ops, before, after), diff = _rewrite_and_check(
                model_path, work, lambda m: fuse_model(m, num_layers),
                lambda old, new: _compare(old, new, encoder, settings),
            )  # fmt: skip
        except FusionNotApplied as e:
            log.warning("fusion not applied: %s", e)
            return not_applied(str(e))
        return FusionInfo(
            requested=True,
            applied=True,
            reason="",
            tool=_tool(),
            ops=ops,
            nodes_before=before,
            nodes_after=after,
            max_abs_diff=diff,
            requires_right_padding="GroupQueryAttention" in ops,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _attention_refusal(node) -> str | None:
    """Why ``node`` (GroupQueryAttention) has no exact ONNX Attention form here, or None."""
    a = node.attributes
    if a.get_float("softcap", 0.0) != 0.0 or a.get_int("smooth_softmax", 0) != 0:
        return f"{node.name} uses softcap or smooth softmax"
    if a.get_int("local_window_size", -1) != -1:
        return f"{node.name} has a local attention window"
    if any(node.inputs[j] is not None for j in (3, 4) if len(node.inputs) > j):
        return f"{node.name} takes past keys/values"
    if any(len(node.inputs) > j and node.inputs[j] is not None for j in range(9, len(node.inputs))):
        return f"{node.name} has inputs beyond the cos/sin caches"
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        return f"{node.name}'s present keys/values are used"
    if a.get_int("do_rotary", 0) and (node.inputs[7] is None or node.inputs[8] is None):
        return f"{node.name} has rotary without cos/sin caches"
    if node.inputs[1] is None:
        return f"{node.name} takes packed QKV"
    return None


def to_onnx_attention(model) -> int:
    """Rewrite every GroupQueryAttention node of ``model`` (``onnx_ir``) in place as
    ``RotaryEmbedding`` (q, k) + ONNX ``Attention`` (opset 23, causal, no mask) and raise the
    default opset to 23; returns the count. Raises ``FusionNotApplied`` (graph untouched) when a
    node has no exact such form."""
    import onnx_ir as ir

    graph = model.graph
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention"]
    refusals = [r for n in nodes if (r := _attention_refusal(n)) is not None]
    if refusals:
        raise FusionNotApplied(refusals[0])
    if not nodes:
        return 0
    start = _const(graph, "echoembed_rope_start", np.array([0], dtype=np.int64))
    for n in nodes:
        a = n.attributes
        heads, kv_heads = a.get_int("num_heads"), a.get_int("kv_num_heads")
        q, k, v = n.inputs[0], n.inputs[1], n.inputs[2]
        new = []
        if a.get_int("do_rotary", 0):
            rope = {"interleaved": a.get_int("rotary_interleaved", 0)}
            cos, sin = n.inputs[7], n.inputs[8]
            rq, rk = (
                ir.node("RotaryEmbedding", [x, start, cos, sin], domain="com.microsoft",
                        attributes={**rope, "num_heads": h}, name=f"{n.name}_rope_{tag}")
                for x, h, tag in ((q, heads, "q"), (k, kv_heads, "k"))
            )  # fmt: skip
            new += [rq, rk]
            q, k = rq.outputs[0], rk.outputs[0]
        attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads, "is_causal": 1}
        if a.get_float("scale", 0.0):
            attrs["scale"] = a.get_float("scale")
        att = ir.node("Attention", [q, k, v], attributes=attrs, version=ONNX_ATTENTION_OPSET,
                      name=f"{n.name}_attention")  # fmt: skip
        new.append(att)
        graph.insert_before(n, new)
        n.outputs[0].replace_all_uses_with(att.outputs[0], replace_graph_outputs=True)
        graph.remove(n, safe=True)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)  # seqlens_k / total_sequence_length: nothing reads them now
    model.opset_imports[""] = max(model.opset_imports.get("", 0), ONNX_ATTENTION_OPSET)
    model.ir_version = max(model.ir_version or 0, ONNX_ATTENTION_IR_VERSION)
    return len(nodes)


def onnx_attention_stage(
    model_path: Path,
    encoder: EchoEncoder,
    settings: FusionSettings,
    prefix_ids: tuple[int, ...] = (),
) -> tuple[tuple[int, dict[str, int], int], float] | str:
    """Rewrite the fused graph at ``model_path`` in place with ``to_onnx_attention`` once it
    checks out against the GroupQueryAttention graph; returns ((nodes rewritten, the final
    graph's fused op counts, its node count), max abs diff), or why the GroupQueryAttention graph
    stays."""
    require("onnxscript", "export")
    work = model_path.parent / ".attention"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    def rewrite(model) -> tuple[int, dict[str, int], int]:
        n = to_onnx_attention(model)
        if not n:
            raise FusionNotApplied("the graph has no GroupQueryAttention")
        return n, fused_op_counts(model.graph), sum(1 for _ in model.graph)

    try:
        return _rewrite_and_check(
            model_path, work, rewrite,
            lambda old, new: _compare(old, new, encoder, settings, prefix_ids),
        )  # fmt: skip
    except FusionNotApplied as e:
        log.warning("GroupQueryAttention kept: %s", e)
        return str(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
