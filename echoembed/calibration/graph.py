"""Graph helpers: find the linear layers of an exported artifact and record their input ranges."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.errors import require

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


def probe(
    model, tensors: list[str], reader, desc: str = "calibrating"
) -> Iterator[dict[str, np.ndarray]]:
    """Run the graph over every calibration batch with intermediate ``tensors`` added as outputs;
    yields ``{name: values of the real tokens, [tokens, channels]}`` per batch (with a progress
    bar on a terminal)."""
    onnx = require("onnx", "export")
    import onnxruntime as ort
    from tqdm.auto import tqdm

    if not tensors:
        return
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    known = {o.name for o in probed.graph.output}
    for name in tensors:
        if name not in known:
            probed.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(
            probed, str(path), save_as_external_data=probed.ByteSize() > EXTERNAL_DATA_BYTES
        )
        del probed
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        reader.rewind()
        with tqdm(total=len(reader), desc=desc, unit="batch", disable=None, leave=False) as bar:
            while (feed := reader.get_next()) is not None:
                mask = feed["attention_mask"].astype(bool)
                values = session.run(tensors, feed)
                yield {name: v[mask] for name, v in zip(tensors, values, strict=True)}
                bar.update(1)
        reader.rewind()


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
