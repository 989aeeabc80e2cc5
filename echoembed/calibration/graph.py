"""Graph helpers: find the linear layers of an exported artifact and record their input ranges."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.errors import InternalError, require

MS_DOMAIN = "com.microsoft"


def ensure_ms_opset(model) -> None:
    """Import the com.microsoft domain (version 1) into ``model`` when it does not yet."""
    onnx = require("onnx", "export")
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


# Above this a ModelProto is saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 2**31 - 2**27
_LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


@dataclass(frozen=True)
class LinearNode:
    """A MatMul/Gemm with a constant weight, named ``<module path>/<op>`` by the exporter."""

    name: str
    op_type: str
    module: str  # e.g. base.layers.3.mlp.down_proj
    weight: str  # initializer name
    input: str  # activation input

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.search(self.module + ".")
        return int(m.group(1)) if m else None

    @property
    def projection(self) -> str:
        """The projection type, e.g. ``down_proj`` or ``c_attn``."""
        return self.module.rsplit(".", 1)[-1]


def linear_nodes(model) -> dict[str, LinearNode]:
    """Every linear layer of the graph by node name, in graph order."""
    weights = {i.name for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in weights:
            module = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
            out[node.name] = LinearNode(
                node.name, node.op_type, module, node.input[1], node.input[0]
            )
    return out


def _real_tokens(value: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``value`` ([B, T, K] or [B*T, K]) at real tokens, as float32 [n, K]."""
    if value.ndim == 3 and value.shape[:2] == mask.shape:
        x = value[mask]
    elif value.ndim == 2 and value.shape[0] == mask.size:
        x = value[mask.reshape(-1)]
    else:
        raise InternalError(
            f"tensor {name} has shape {value.shape}, not [batch, tokens, K] for a batch of "
            f"{mask.shape}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _by_length(reader) -> list[dict[str, np.ndarray]]:
    """The reader's batches regrouped by real length and cut to their longest row.

    A fixed-shape reader pads every batch to the longest text of all; with right padding and a
    causal model the trailing padding changes nothing at the real tokens, so the rows are sorted
    by length into batches of the same size and the all-padding columns dropped (about half the
    forward pass on short texts). Batches that are not all [B, T] with one T are kept as is.
    """
    feeds = []
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    reader.rewind()
    if not feeds:
        return []
    shape = feeds[0]["attention_mask"].shape
    if any(v.shape != shape for f in feeds for v in f.values()) or any(
        f.keys() != feeds[0].keys() for f in feeds
    ):
        return feeds
    rows = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    mask = rows["attention_mask"].astype(bool)
    if (mask[:, 1:] & ~mask[:, :-1]).any():  # a real token after padding: not right-padded
        return feeds
    order = np.argsort(-mask.sum(axis=1), kind="stable")
    out = []
    for start in range(0, len(order), shape[0]):
        pick = order[start : start + shape[0]]
        width = max(int(mask[pick].sum(axis=1).max()), 1)
        out.append({k: np.ascontiguousarray(v[pick, :width]) for k, v in rows.items()})
    return out


def probe(
    model, tensors: list[str], reader, desc: str = "calibrating"
) -> Iterator[dict[str, np.ndarray]]:
    """Run the graph over the calibration batches with intermediate ``tensors`` added as outputs;
    yields ``{name: values at the real tokens, float32 [tokens, channels]}`` per batch (with a
    progress bar on a terminal). The outputs are added to ``model`` only while the session is
    built (no copy of the weights), and batches are regrouped by length (``_by_length``)."""
    onnx = require("onnx", "export")
    import onnxruntime as ort
    from tqdm.auto import tqdm

    if not tensors:
        return
    extra = len(model.graph.output)
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in known:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(
                model, str(path), save_as_external_data=model.ByteSize() > EXTERNAL_DATA_BYTES
            )
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[extra:]
    wanted = {i.name for i in session.get_inputs()}
    feeds = _by_length(reader)
    for feed in tqdm(feeds, desc=desc, unit="batch", disable=None, leave=False):
        mask = feed["attention_mask"].astype(bool)
        values = session.run(tensors, {k: v for k, v in feed.items() if k in wanted})
        yield {name: _real_tokens(v, mask, name) for name, v in zip(tensors, values, strict=True)}


def input_abs_max(model, tensors: list[str], reader) -> dict[str, np.ndarray]:
    """Per-channel max |x| of intermediate ``tensors`` over the calibration batches (real tokens
    only)."""
    result: dict[str, np.ndarray] = {}
    for batch in probe(model, tensors, reader):
        for name, value in batch.items():
            amax = np.abs(value).max(axis=0)
            result[name] = amax if name not in result else np.maximum(result[name], amax)
    return result


def embedding_gathers(model) -> list[str]:
    """Gather nodes that look up a 2-D float initializer (the token embedding table)."""
    onnx = require("onnx", "export")
    tables = {
        i.name
        for i in model.graph.initializer
        if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT
    }
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]


def gemm_to_matmul(model) -> int:
    """Rewrite weight Gemms (GPT-2's Conv1D) as MatMul + Add, keeping the ``<module>/`` name, so
    every quantizer sees MatMuls. Returns the number rewritten."""
    require("onnx", "export")
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = (
            node.op_type == "Gemm"
            and len(node.input) >= 2
            and node.input[1] in inits
            and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if not simple:
            new_nodes.append(node)
            continue
        module = node.name.rsplit("/", 1)[0]
        weight = inits[node.input[1]]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(weight).T.copy()
            weight.CopyFrom(numpy_helper.from_array(w, weight.name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        new_nodes.append(
            helper.make_node("MatMul", node.input[:2], [mm_out], name=f"{module}/MatMul")
        )
        if has_bias:
            new_nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], node.output, name=f"{module}/Add")
            )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def rewrite_graph(model, nodes: list, new_initializers: list) -> None:
    """Replace ``model``'s nodes with ``nodes`` (in order), drop the initializers no node reads
    any more, and add ``new_initializers`` (what a Q/DQ rewrite of the weights needs)."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(new_initializers))
