"""SmoothQuant for the MLP of Llama-family graphs (an exact rewrite before INT8).

The input of ``down_proj`` is ``act(gate(x)) * up(x)``. Its channels carry large outliers in
Llama-family models (measured on SmolLM2: max/median up to ~3000 in one layer), which ruins
per-tensor INT8 activations. With per-channel scales s: ``up`` output channel j is divided by
s_j and ``down`` input row j multiplied by s_j: the fp32 function is unchanged, but the
activation range shrinks. s_j = amax_j^alpha / wmax_j^(1 - alpha) (Xiao et al., 2023).
"""

from __future__ import annotations

import logging

import numpy as np

from echoembed.calibration.graph import LinearNode
from echoembed.errors import require

log = logging.getLogger(__name__)


def mlp_pairs(model, linear: dict[str, LinearNode]) -> list[tuple[LinearNode, LinearNode]]:
    """(up_proj, down_proj) pairs whose down input is Mul(..., up output)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    by_module = {ln.module: ln for ln in linear.values()}
    node_of = {n.name: n for n in model.graph.node}
    pairs = []
    for ln in linear.values():
        if ln.projection != "down_proj" or ln.op_type != "MatMul":
            continue
        up = by_module.get(ln.module[: -len("down_proj")] + "up_proj")
        mul = producers.get(ln.input)
        if up is None or mul is None or mul.op_type != "Mul":
            continue
        up_out = node_of[up.name].output[0]
        if up_out in mul.input:
            pairs.append((up, ln))
        else:
            log.info("not smoothing %s: its input is not up_proj * gate", ln.module)
    return pairs


def smooth_mlp(model, amax: dict[str, np.ndarray], alpha: float) -> list[str]:
    """Rewrite ``model`` in place; returns the smoothed down_proj modules."""
    require("onnx", "export")
    from onnx import numpy_helper

    from echoembed.calibration.graph import linear_nodes

    inits = {i.name: i for i in model.graph.initializer}
    done = []
    for up, down in mlp_pairs(model, linear_nodes(model)):
        if down.input not in amax:
            continue
        w_down = numpy_helper.to_array(inits[down.weight]).astype(np.float32)  # [inter, hidden]
        w_up = numpy_helper.to_array(inits[up.weight]).astype(np.float32)  # [hidden, inter]
        wmax = np.abs(w_down).max(axis=1)
        s = np.power(np.maximum(amax[down.input], 1e-8), alpha) / np.power(
            np.maximum(wmax, 1e-8), 1.0 - alpha
        )
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        inits[down.weight].CopyFrom(numpy_helper.from_array(w_down * s[:, None], down.weight))
        inits[up.weight].CopyFrom(numpy_helper.from_array(w_up / s[None, :], up.weight))
        done.append(down.module)
    return done


# fused RMSNorm (exporter.fusion) -> the input index of its scale (gamma); output 0 is normalized
_FUSED_NORM_SCALE = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def norm_groups(model, linear: dict[str, LinearNode]) -> list[tuple[str, list[LinearNode]]]:
    """(norm weight initializer, linear layers) where the layers' shared input is
    ``Mul(norm_weight, x)`` (RMSNorm/LayerNorm scale), or the output of a fused
    (Skip)SimplifiedLayerNormalization, and nothing else reads that input: q/k/v after
    input_layernorm, gate/up after post_attention_layernorm."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_input: dict[str, list[LinearNode]] = {}
    for ln in linear.values():
        if ln.op_type == "MatMul":
            by_input.setdefault(ln.input, []).append(ln)
    groups = []
    for x, lns in by_input.items():
        mul = producers.get(x)
        if mul is None:
            continue
        if mul.op_type == "Mul":
            scale = [i for i in mul.input if i in inits and len(inits[i].dims) == 1]
        elif mul.op_type in _FUSED_NORM_SCALE and list(mul.output).index(x) == 0:
            k = _FUSED_NORM_SCALE[mul.op_type]  # the fused graph's RMSNorm: its scale input
            scale = [mul.input[k]] if len(mul.input) > k and mul.input[k] in inits else []
        else:
            continue
        if len(scale) != 1:
            continue
        if {n.name for n in consumers.get(x, [])} != {ln.name for ln in lns}:
            continue
        name = scale[0]
        if len(consumers.get(name, [])) != 1:  # deduplicated by the exporter: give it a copy
            private = model.graph.initializer.add()
            private.CopyFrom(inits[name])
            private.name = f"{name}.{mul.name or x}"
            mul.input[list(mul.input).index(name)] = private.name
            inits[private.name] = private
            consumers[name].remove(mul)
            name = private.name
        groups.append((name, lns))
    return groups


def smooth_norm_inputs(
    model, linear: dict[str, LinearNode], amax: dict[str, np.ndarray], alpha: float
) -> list[str]:
    """Fold SmoothQuant scales into the norm weight feeding each group; returns group names."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = []
    for scale_name, lns in norm_groups(model, linear):
        x = lns[0].input
        if x not in amax:
            continue
        weights = [numpy_helper.to_array(inits[ln.weight]).astype(np.float32) for ln in lns]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # per input channel
        s = np.power(np.maximum(amax[x], 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        gamma = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        inits[scale_name].CopyFrom(numpy_helper.from_array(gamma / s, scale_name))
        for ln, w in zip(lns, weights, strict=True):
            inits[ln.weight].CopyFrom(numpy_helper.from_array(w * s[:, None], ln.weight))
        done.append("+".join(sorted(ln.module for ln in lns)))
    return done
