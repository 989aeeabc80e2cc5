"""The shared-prefix stage: the template's constant leading tokens computed once, at export time.

Every echo prompt starts with the same tokens (echo on SmolLM2: ``<|im_start|>Rewrite the
sentence:``, 7 ids, ~18% of an STS-B prompt). With ``ExportConfig(prefix_reuse=True)`` the graph
takes each prompt without them (``echo.strip_prefix``) and carries what the layers need of them
as constants. Two routes, both checked here against the same graph on whole prompts:

- **fused graphs** (GroupQueryAttention, ``exporter.fusion``): ONNX Runtime's CPU
  GroupQueryAttention refuses past keys/values for more than one new token at batch > 1, so the
  prefix is not fed as a cache. Instead each GroupQueryAttention node runs on
  ``[prefix; remainder]``: its own query/key/value inputs at the prefix positions (pre-rotary;
  the node applies rotary itself) are captured by running the full graph on the prefix once,
  and concatenated in front of the remainder's; ``seqlens_k`` and ``total_sequence_length`` grow
  by P, the cos/sin cache's position ``Range`` too, and the P prefix rows of the node's output are
  sliced off. Projections, MLPs and norms run on the remainder only. Method ``gqa-capture``.
- **unfused graphs** (any registered architecture): the PyTorch model's cache of the prefix is
  traced in as past keys/values (``exporter.head.PrefixEchoModel``). Method ``torch-cache``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from echoembed.artifact import OUTPUT_NAME, PrefixInfo
from echoembed.echo import EchoEncoder, l2_normalize, leading_fixed_ids
from echoembed.errors import ExportError, require
from echoembed.exporter.fusion import FusionSettings, _const, _rewrite_and_check, swap_in

log = logging.getLogger(__name__)

GQA = "GroupQueryAttention"
INT64_MAX = np.iinfo(np.int64).max


def prefix_ids_of(encoder: EchoEncoder) -> tuple[int, ...]:
    """The ids to bake: the template's leading fixed, uncapped, unpooled pieces."""
    plan = encoder.plan()
    ids = leading_fixed_ids(plan)
    if not ids:
        raise ExportError(
            f"template {plan.template!r} starts with the text or a variable, so it has no "
            "constant leading tokens to compute once; export without --prefix-reuse"
        )
    return ids


def prefix_text(encoder: EchoEncoder, ids: tuple[int, ...]) -> str:
    return encoder.tokenizer.decode(list(ids), skip_special_tokens=False)


def compare_prefix(
    full: Path,
    prefixed: Path,
    prefix_ids: tuple[int, ...],
    encoder: EchoEncoder,
    settings: FusionSettings,
) -> float:
    """Max abs diff of normalized embeddings: the prefix graph (remainders) vs the graph it came
    from (whole prompts), in ONNX Runtime on CPU, on the parity texts at several batch sizes.
    ``ExportError`` over the tolerance."""
    from echoembed.runtime.ort import OrtRunner

    cpu = ["CPUExecutionProvider"]
    a = OrtRunner(full, OUTPUT_NAME, providers=cpu, threads=settings.threads)
    b = OrtRunner(prefixed, OUTPUT_NAME, providers=cpu, threads=settings.threads,
                  prefix_ids=prefix_ids)  # fmt: skip
    texts, worst, failures = list(settings.texts), 0.0, []
    for bs in settings.batch_sizes:
        for start in range(0, len(texts), bs):
            batch = encoder.encode(texts[start : start + bs])
            want = l2_normalize(a.encode(batch))
            got = l2_normalize(b.encode(batch))
            diff = float(np.abs(want - got).max()) if np.isfinite(got).all() else float("inf")
            worst = max(worst, diff)
            if diff > settings.tolerance:
                failures.append(f"batch size {bs}, texts {start}..: max abs diff {diff:.2e}")
    if failures:
        raise ExportError(
            "the shared-prefix graph disagrees with the whole-prompt graph (tolerance "
            f"{settings.tolerance:.0e}); no artifact was written:\n  "
            + "\n  ".join(failures)
            + "\nexport without --prefix-reuse (or with --no-fuse for the traced route)"
        )
    return worst


def _capture(model_path: Path, prefix_ids: tuple[int, ...], work: Path, threads: int | None):
    """{(node index, input index): [1, P, width] float32}: every GroupQueryAttention node's
    query/key/value inputs when the full graph runs on the prefix alone."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    nodes = [n for n in model.graph.node if n.op_type == GQA]
    wanted = [(i, j, n.input[j]) for i, n in enumerate(nodes) for j in range(3)
              if j < len(n.input) and n.input[j]]  # fmt: skip
    del model.graph.output[:]
    for *_, name in wanted:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = work / "capture.onnx"
    external = model.ByteSize() > 2**31 - 1 - (1 << 26)
    onnx.save_model(model, str(probe), save_as_external_data=external,
                    location="capture.onnx.data")  # fmt: skip
    del model
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
    p = len(prefix_ids)
    feed = {
        "input_ids": np.array([prefix_ids], dtype=np.int64),
        "attention_mask": np.ones((1, p), dtype=np.int64),
        "pool_mask": np.zeros((1, p), dtype=np.int64),
    }
    names = {i.name for i in session.get_inputs()}
    outs = session.run([w[2] for w in wanted], {k: v for k, v in feed.items() if k in names})
    del session
    for f in work.glob("capture.onnx*"):
        f.unlink()
    return {(i, j): np.ascontiguousarray(o, dtype=np.float32)
            for (i, j, _), o in zip(wanted, outs, strict=True)}  # fmt: skip


def _position_range(value, depth: int = 0):
    """The ``Range`` node the cos/sin cache's positions come from (through casts/reshapes)."""
    node = value.producer()
    if node is None or depth > 6:
        return None
    if node.op_type == "Range":
        return node
    if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Transpose"):
        return _position_range(node.inputs[0], depth + 1)
    return None


def _cache_ranges(nodes) -> list:
    """The distinct position ``Range`` nodes feeding the GroupQueryAttention cos/sin caches."""
    found: dict[int, object] = {}
    for n in nodes:
        for j in (7, 8):
            cache = n.inputs[j] if len(n.inputs) > j else None
            if cache is None:
                continue
            trig = cache.producer()
            angles = trig.inputs[0].producer() if trig is not None and trig.inputs else None
            rng = None
            for x in angles.inputs if angles is not None else ():
                if x is not None and x.const_value is None:
                    rng = _position_range(x)
                    if rng is not None:
                        break
            if rng is None:
                raise ExportError(
                    f"cannot find the positions of {n.name}'s cos/sin cache; export with "
                    "--no-fuse to use the traced prefix route"
                )
            found[id(rng)] = rng
    return list(found.values())


def rewrite_gqa_prefix(model, captured: dict, p: int) -> int:
    """Rewrite a fused full graph (``onnx_ir`` model) in place into its shared-prefix form;
    returns the number of GroupQueryAttention nodes rewritten."""
    import onnx_ir as ir

    graph = model.graph
    nodes = [n for n in graph if n.op_type == GQA]
    if not nodes:
        raise ExportError("the fused graph has no GroupQueryAttention to feed the prefix to")
    seqlens, total = nodes[0].inputs[5], nodes[0].inputs[6]
    if any(n.inputs[5] is not seqlens or n.inputs[6] is not total for n in nodes):
        raise ExportError(
            "the GroupQueryAttention nodes do not share one seqlens_k/total_sequence_length; "
            "export with --no-fuse to use the traced prefix route"
        )
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    first = nodes[0]
    batch = ir.node("Shape", [ids], attributes={"start": 0, "end": 1}, name="prefix_batch")
    p32 = _const(graph, "prefix_length_i32", np.array(p, dtype=np.int32))
    seqlens_p = ir.node("Add", [seqlens, p32], name="prefix_seqlens_k")
    total_p = ir.node("Add", [total, p32], name="prefix_total_sequence_length")
    graph.insert_before(first, [batch, seqlens_p, total_p])
    for k, rng in enumerate(_cache_ranges(nodes)):
        limit = rng.inputs[1]
        extra = _const(graph, f"prefix_length_rope_{k}", np.array(p, dtype=limit.dtype.numpy()))
        add = ir.node("Add", [limit, extra], name=f"prefix_rope_limit_{k}")
        graph.insert_before(rng, [add])
        rng.replace_input_with(1, add.outputs[0])
    starts = _const(graph, "prefix_slice_start", np.array([p], dtype=np.int64))
    ends = _const(graph, "prefix_slice_end", np.array([INT64_MAX], dtype=np.int64))
    axes = _const(graph, "prefix_slice_axis", np.array([1], dtype=np.int64))
    shapes: dict[int, object] = {}
    for i, n in enumerate(nodes):
        new = []
        for j in range(3):
            x = n.inputs[j] if len(n.inputs) > j else None
            if x is None:
                continue
            arr = captured[(i, j)]
            width = int(arr.shape[-1])
            if arr.shape[:2] != (1, p):
                raise ExportError(f"captured {n.name} input {j} has shape {arr.shape}")
            if width not in shapes:
                tail = _const(graph, f"prefix_shape_{width}",
                              np.array([p, width], dtype=np.int64))  # fmt: skip
                cat = ir.node("Concat", [batch.outputs[0], tail], attributes={"axis": 0},
                              name=f"prefix_expand_shape_{width}")  # fmt: skip
                new.append(cat)
                shapes[width] = cat.outputs[0]
            c = _const(graph, f"prefix_{n.name}_input{j}".replace("/", "_"), arr)
            expand = ir.node("Expand", [c, shapes[width]], name=f"prefix_expand_{i}_{j}")
            joined = ir.node("Concat", [expand.outputs[0], x], attributes={"axis": 1},
                             name=f"prefix_concat_{i}_{j}")  # fmt: skip
            new += [expand, joined]
            n.replace_input_with(j, joined.outputs[0])
        graph.insert_before(n, new)
        n.replace_input_with(5, seqlens_p.outputs[0])
        n.replace_input_with(6, total_p.outputs[0])
        if any(o is not None and o.uses() for o in n.outputs[1:]):
            raise ExportError(f"{n.name}'s present keys/values are used; cannot bake a prefix")
        for o in n.outputs:  # their annotated shapes say `sequence`; they are now P + sequence
            if o is not None:
                o.shape = None
        out = n.outputs[0]
        cut = ir.node("Slice", [out, starts, ends, axes], name=f"prefix_slice_{i}")
        graph.insert_after(n, [cut])
        for user, idx in list(out.uses()):
            if user is not cut:
                user.replace_input_with(idx, cut.outputs[0])
    return len(nodes)


def _info(encoder: EchoEncoder, ids: tuple[int, ...], method: str, diff: float) -> PrefixInfo:
    return PrefixInfo(
        template=encoder.config.template.name,
        text=prefix_text(encoder, ids),
        ids=ids,
        method=method,
        max_abs_diff=diff,
    )


def gqa_prefix_stage(
    model_path: Path,
    encoder: EchoEncoder,
    prefix_ids: tuple[int, ...],
    settings: FusionSettings,
) -> PrefixInfo:
    """The ``gqa-capture`` route on the fused graph at ``model_path`` (rewritten in place once
    it checks out against the whole-prompt graph)."""
    require("onnxscript", "export")
    work = model_path.parent / ".prefix"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        captured = _capture(model_path, prefix_ids, work, settings.threads)
        n, diff = _rewrite_and_check(
            model_path, work, lambda m: rewrite_gqa_prefix(m, captured, len(prefix_ids)),
            lambda old, new: compare_prefix(old, new, prefix_ids, encoder, settings),
        )  # fmt: skip
        log.info("prefix baked into %d GroupQueryAttention nodes (max abs diff %.1e)", n, diff)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _info(encoder, prefix_ids, "gqa-capture", diff)


def traced_prefix_stage(
    model_path: Path,
    encoder: EchoEncoder,
    prefix_ids: tuple[int, ...],
    settings: FusionSettings,
    trace: Callable[[Path], None],
) -> PrefixInfo:
    """The ``torch-cache`` route: ``trace(path)`` writes the finished prefix graph (the
    exporter's own trace and finalize steps with ``PrefixEchoModel``); it replaces the graph at
    ``model_path`` once it checks out against it."""
    work = model_path.parent / ".prefix"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        out = work / model_path.name
        trace(out)
        diff = compare_prefix(model_path, out, prefix_ids, encoder, settings)
        swap_in(model_path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _info(encoder, prefix_ids, "torch-cache", diff)
