"""A quantized artifact's manifest describes its own saved graph, for every recipe.

One artifact per recipe (and per setting that changes the graph) is made once from the tiny
random Llama artifact; every graph-describing manifest field is then checked against the graph
itself: opsets, inputs and outputs, files and checksums, precision and recipe, the settings as
the nodes carry them (MatMulNBits bits / block_size / accuracy_level, INT8 weight range and
activation type), embedding quantization, and the layers kept in float.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from echoembed.artifact import (
    hash_files,
    read_manifest,
    recipe_from_settings,
    settings_of,
    verify_files,
)
from echoembed.calibration import (
    CalibrationConfig,
    Fp16Config,
    Int4QdqConfig,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
    quantize,
)
from echoembed.calibration.recipes import resolve_recipe

SMALL = QuantizeOptions(calibration=CalibrationConfig(samples=8, batch_size=4))
KEPT = "base.layers.1.mlp.down_proj/MatMul"
EXCLUDE = ("*.layers.1.mlp.down_proj/*",)
LINEAR = 14  # 2 layers x (q, k, v, o, gate, up, down)
MS = "com.microsoft"

CASES = {
    "int8-dynamic": Int8DynamicConfig(exclude=EXCLUDE),  # reduce_range decided by this CPU
    "int8-dynamic-w8": Int8DynamicConfig(reduce_range=False),
    "int8-dynamic-w7": Int8DynamicConfig(reduce_range=True, per_channel=False),
    "int8-dynamic-tensor": Int8DynamicConfig(activation_scale="tensor", exclude=EXCLUDE),
    "int8-dynamic-unfolded": Int8DynamicConfig(fold_row_scales=False),
    "int8-static": Int8StaticConfig(exclude=EXCLUDE),
    "int8-static-u8-w7": Int8StaticConfig(activations="uint8", reduce_range=True),
    "int8-static-per-tensor": Int8StaticConfig(per_channel=False, smooth_alpha=None),
    "int8-blockwise": Int8BlockwiseConfig(exclude=EXCLUDE),
    "int8-blockwise-b32-level0": Int8BlockwiseConfig(block_size=32, accuracy_level=0),
    "int4-rtn": Int4WeightOnlyConfig(
        algorithm="rtn", block_size=16, accuracy_level=0, quantize_embedding=False
    ),
    "int4-hqq": Int4WeightOnlyConfig(algorithm="hqq", exclude=EXCLUDE),
    "int4-hqq-level0": Int4WeightOnlyConfig(algorithm="hqq", accuracy_level=0),
    "int4-gptq": Int4WeightOnlyConfig(algorithm="gptq", accuracy_level=2, exclude=EXCLUDE),
    "int4-qdq": Int4QdqConfig(exclude=EXCLUDE),
    "int4-qdq-gptq-b16": Int4QdqConfig(algorithm="gptq", block_size=16),
    "fp16": Fp16Config(exclude=EXCLUDE),
}


@pytest.fixture(scope="module")
def built(tiny_artifact, tmp_path_factory):
    """name -> (artifact, resolved config, loaded graph); each made on first use."""
    root = tmp_path_factory.mktemp("per-recipe")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cfg = CASES[name]
            art = quantize(tiny_artifact.path, root / name, cfg, SMALL)
            cache[name] = (art, resolve_recipe(cfg), onnx.load(str(art.model_path)))
        return cache[name]

    return get


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _inits(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _ops(model, op_type: str) -> list:
    return [n for n in model.graph.node if n.op_type == op_type]


def _consumers(model) -> dict[str, list]:
    """tensor name -> [(node, input index)] of the nodes reading it."""
    out: dict[str, list] = {}
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            out.setdefault(name, []).append((n, k))
    return out


@pytest.mark.parametrize("name", CASES)
def test_opsets_are_the_graphs(built, tiny_artifact, name):
    art, cfg, model = built(name)
    imports = {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import}
    m = read_manifest(art.path)
    assert {(k or "ai.onnx"): v for k, v in m.opset_imports.items()} == imports
    assert m.opset == imports["ai.onnx"]
    parent = tiny_artifact.manifest
    if isinstance(cfg, Int4WeightOnlyConfig):  # MatMulNBits: the com.microsoft domain
        assert imports[MS] == 1 and MS not in parent.opset_imports
    if isinstance(cfg, Int4WeightOnlyConfig) and cfg.quantize_embedding:
        # ORT's Gather quantizer raises the default opset to 21 (int4 types); the parent said 18
        assert m.opset == 21 and parent.opset == 18
    if isinstance(cfg, Int4QdqConfig):  # blocked DequantizeLinear and INT4: opset 21, no MS
        assert imports == {"ai.onnx": 21} and m.opset_imports == {"": 21} and parent.opset == 18


@pytest.mark.parametrize("name", CASES)
def test_inputs_and_outputs_are_the_graphs(built, tiny_artifact, name):
    art, _, model = built(name)
    m = read_manifest(art.path)
    for specs, values in ((m.inputs, model.graph.input), (m.outputs, model.graph.output)):
        graph = [
            (
                v.name,
                helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
            )
            for v in values
        ]
        assert [(t.name, t.dtype, tuple(t.shape)) for t in specs] == graph
    assert m.inputs == tiny_artifact.manifest.inputs and m.outputs == tiny_artifact.manifest.outputs
    assert m.output_name == "embedding"


@pytest.mark.parametrize("name", CASES)
def test_files_and_checksums(built, name):
    art, _, _ = built(name)
    m = read_manifest(art.path)
    on_disk = sorted(p.name for p in art.path.iterdir() if p.name != "manifest.json")
    assert sorted(m.files) == on_disk == ["model.onnx", "tokenizer.json"]
    assert m.files == hash_files(art.path) and m.model_file == "model.onnx"
    verify_files(art.path, m)
    assert not [p for p in art.path.parent.iterdir() if p.name.startswith(".")], "no temp dirs"


@pytest.mark.parametrize("name", CASES)
def test_precision_recipe_and_settings_round_trip(built, tiny_artifact, name):
    art, cfg, _ = built(name)
    m = read_manifest(art.path)
    q = m.quantization
    assert m.precision == q.recipe == cfg.recipe and name.startswith(cfg.recipe)
    assert q.settings == cfg and type(q.settings) is type(CASES[name])
    assert recipe_from_settings(q.recipe, settings_of(cfg)) == cfg
    raw = json.loads((art.path / "manifest.json").read_text())["quantization"]["settings"]
    assert raw == settings_of(cfg)
    if hasattr(cfg, "reduce_range"):
        assert isinstance(q.settings.reduce_range, bool), "resolved, never None"
    assert q.parent_sha256 == tiny_artifact.manifest.files["model.onnx"]
    assert m.parity is None and m.source == tiny_artifact.manifest.source


@pytest.mark.parametrize("name", CASES)
def test_excluded_layers_stay_float(built, name):
    art, cfg, model = built(name)
    q = art.manifest.quantization
    inits = {i.name: i for i in model.graph.initializer}
    float_matmuls = {
        n.name
        for n in _ops(model, "MatMul")
        if len(n.input) > 1 and n.input[1] in inits
        and inits[n.input[1]].data_type == TensorProto.FLOAT
    }  # fmt: skip
    if cfg.exclude:
        assert q.excluded == (KEPT,)
    else:
        assert q.excluded == ()
    assert float_matmuls == set(q.excluded), "exactly the excluded layers keep a float weight"
    for node in model.graph.node:
        if node.name in q.excluded:  # INT8 static: not reading a dequantized activation either
            assert node.op_type == "MatMul" and not node.input[0].endswith("/dq")


@pytest.mark.parametrize(
    "name",
    [n for n, c in CASES.items() if isinstance(c, (Int4WeightOnlyConfig, Int8BlockwiseConfig))],
)
def test_matmulnbits_carry_the_settings(built, name):
    art, cfg, model = built(name)
    nodes = _ops(model, "MatMulNBits")
    assert len(nodes) == LINEAR - len(art.manifest.quantization.excluded)
    bits = 8 if isinstance(cfg, Int8BlockwiseConfig) else 4
    for node in nodes:
        a = _attrs(node)
        assert node.domain == MS and a["bits"] == bits and a["block_size"] == cfg.block_size
        assert a.get("accuracy_level", 0) == cfg.accuracy_level, node.name
    inits = _inits(model)
    zeros = {inits[n.input[3]].dtype for n in nodes if len(n.input) > 3 and n.input[3]}
    if bits == 8:  # symmetric: no zero points
        assert zeros == set()
    elif cfg.algorithm == "rtn":
        assert zeros == {np.dtype(np.uint8)}
    else:  # HQQ, and GPTQ with float_zero (the default): fractional zero points
        assert cfg.float_zero and zeros == {np.dtype(np.float32)}


@pytest.mark.parametrize("name", CASES)
def test_embedding_quantization_matches_settings(built, name):
    _, cfg, model = built(name)
    gbq = _ops(model, "GatherBlockQuantized")
    quantized = isinstance(cfg, Int4WeightOnlyConfig) and cfg.quantize_embedding
    assert len(gbq) == (1 if quantized else 0)
    assert len(_ops(model, "Gather")) >= (0 if quantized else 1)
    if quantized:
        a = _attrs(gbq[0])
        assert a["block_size"] == cfg.block_size and a.get("bits", 4) == 4
        assert gbq[0].input[1] == "input_ids"
    inits = {i.name: i for i in model.graph.initializer}
    table = inits.get("base.embed_tokens.weight")
    if quantized:
        assert table is None, "the float table is gone"
    else:
        want = TensorProto.FLOAT16 if isinstance(cfg, Fp16Config) else TensorProto.FLOAT
        assert table is not None and table.data_type == want


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.recipe == "int8-dynamic"])
def test_int8_dynamic_weights_match_reduce_range(built, name):
    art, cfg, model = built(name)
    nodes = _ops(model, "MatMulInteger") + _ops(model, "MatMulIntegerToFloat")
    assert len(nodes) == LINEAR - len(art.manifest.quantization.excluded)
    inits = _inits(model)
    top = 64 if cfg.reduce_range else 127  # ORT's reduce_range grid is -64..64
    for node in nodes:
        w = inits[node.input[1]]
        assert w.dtype == np.int8 and int(np.abs(w.astype(np.int16)).max()) == top, node.name
        scale = inits[node.input[1].removesuffix("_quantized") + "_scale"]
        assert scale.shape == ((w.shape[1],) if cfg.per_channel else ()), node.name


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.recipe == "int8-dynamic"])
def test_int8_dynamic_activation_scales_match_settings(built, tiny_artifact, name):
    """``tensor``: ORT's DynamicQuantizeLinear per shared input. ``token``: one blocked
    QuantizeLinear per shared input (a block per row: axis -1, block_size K), its scale computed
    from that row, every integer GEMM reading the one scalar zero point 128; opset 21. With
    ``fold_row_scales`` the up projections are MatMulIntegerToFloat with a_scale 1, and the down
    projections' scale products read their row scale times the up projection's."""
    art, cfg, model = built(name)
    inits = _inits(model)
    folded = _ops(model, "MatMulIntegerToFloat")
    assert bool(folded) is bool(cfg.fold_row_scales), [n.name for n in folded]
    mmi = _ops(model, "MatMulInteger") + folded
    shared = {n.input[0] for n in mmi}
    dql, ql = _ops(model, "DynamicQuantizeLinear"), _ops(model, "QuantizeLinear")
    if cfg.activation_scale == "tensor":
        assert len(dql) == len(shared) and not ql
        assert art.manifest.opset == tiny_artifact.manifest.opset
        return
    assert not dql and len(ql) == len(shared) and {q.output[0] for q in ql} == shared
    assert art.manifest.opset == max(21, tiny_artifact.manifest.opset)
    zps = {n.input[4 if n.op_type == "MatMulIntegerToFloat" else 2] for n in mmi}
    assert len(zps) == 1 and inits[zps.pop()].tolist() == 128
    ks = {n.input[0]: inits[n.input[1]].shape[0] for n in mmi}
    producer = {o: n for n in model.graph.node for o in n.output}
    for q in ql:
        assert _attrs(q) == {"axis": -1, "block_size": ks[q.output[0]]}, q.name
        assert producer[q.input[1]].op_type == "Mul", "the scale is computed from the row"
    readers = {name: [n for n, _ in uses] for name, uses in _consumers(model).items()}
    for up in folded:
        assert up.domain == MS and ".mlp.up_proj/" in up.name, up.name
        assert inits[up.input[2]].tolist() == 1.0, "no row scale: a_scale 1"
        (gate_mul,) = readers[up.output[0]]  # silu(gate) * up
        (down_q,) = [r for r in readers[gate_mul.output[0]] if r.op_type == "QuantizeLinear"]
        row = producer[up.input[0]].input[1]  # the up projection's input row scale
        fold = [r for r in readers[down_q.input[1]] if r.op_type == "Mul" and row in r.input]
        assert len(fold) == 1, "s_down x s_up, once"
        products = readers[fold[0].output[0]]
        assert products and all(any(i in inits for i in p.input) for p in products)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.recipe == "int8-static"])
def test_int8_static_nodes_match_settings(built, name):
    art, cfg, model = built(name)
    excluded = art.manifest.quantization.excluded
    inits = _inits(model)
    weights = {k: v for k, v in inits.items() if k.endswith(".weight_int8")}
    assert len(weights) == LINEAR - len(excluded)
    top = 63 if cfg.reduce_range else 127
    assert {int(np.abs(w.astype(np.int16)).max()) for w in weights.values()} == {top}
    zero = np.uint8 if cfg.activations == "uint8" else np.int8
    acts = [v for k, v in inits.items() if k.endswith("/act_zero")]
    assert acts and all(z.dtype == zero for z in acts)
    assert {int(z) for z in acts} == {128 if cfg.activations == "uint8" else 0}
    for node in _ops(model, "DequantizeLinear"):
        if node.name.endswith("/weight_DQ"):
            assert (_attrs(node).get("axis") == 1) is cfg.per_channel


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if isinstance(c, Int4QdqConfig)])
def test_int4_qdq_nodes_match_settings(built, name):
    art, cfg, model = built(name)
    assert not _ops(model, "MatMulNBits") and not _ops(model, "GatherBlockQuantized")
    inits = {i.name: i for i in model.graph.initializer}
    readers = {n.input[1]: n for n in _ops(model, "MatMul") if len(n.input) > 1}
    dqs = _ops(model, "DequantizeLinear")
    assert len(dqs) == LINEAR - len(art.manifest.quantization.excluded)
    for dq in dqs:
        assert _attrs(dq) == {"axis": 0, "block_size": cfg.block_size}, dq.name
        assert len(dq.input) == 2 and inits[dq.input[0]].data_type == TensorProto.INT4
        mm = readers[dq.output[0]]
        assert mm.name == dq.name.removesuffix("/weight_DQ") + "/MatMul", "layer names kept"


# --- TensorRT's explicit-quantization rules -------------------------------------------------


def _tensorrt_qdq_violations(model) -> list[str]:
    """Where the graph breaks what TensorRT's ONNX parser and Q/DQ layers accept.

    No ``com.microsoft`` (or other non-standard) ops; every QuantizeLinear/DequantizeLinear has
    constant, finite, strictly positive scales and a zero point that is absent or an all-zero
    int8/int4 constant (TensorRT has no uint8/uint4 Q/DQ); activations are quantized per tensor
    by a Q -> DQ pair with the same scale; a weight DQ feeds only MatMul's B and is INT8 per
    tensor or per output channel (axis 1, one scale per column), or INT4 blocked along K
    (axis 0, ``block_size`` dividing K, scales [K / block, N]).
    """
    inits = _inits(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    out = [
        f"{n.name}: domain {n.domain}" for n in model.graph.node if n.domain not in ("", "ai.onnx")
    ]
    out += [
        f"opset import {i.domain}" for i in model.opset_import if i.domain not in ("", "ai.onnx")
    ]
    consumers = _consumers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.input[1] not in inits:
            out.append(f"{n.name}: scale is not a constant")
            continue
        scale = inits[n.input[1]]
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            out.append(f"{n.name}: scales must be finite and > 0 (min {scale.min():g})")
        if len(n.input) > 2 and n.input[2]:
            zp = n.input[2]
            if zp not in inits or inits[zp].any():
                out.append(f"{n.name}: zero point is not a constant 0")
            if types.get(zp) not in (TensorProto.INT8, TensorProto.INT4):
                out.append(f"{n.name}: zero point type {types.get(zp)} (TensorRT: int8/int4)")
        weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        if weight:
            out += _weight_dq_violations(n, scale, model, consumers)
        elif scale.ndim != 0:
            out.append(f"{n.name}: activation scale is not per tensor {scale.shape}")
        elif n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is None or q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(n.input[1:]):
                out.append(f"{n.name}: activation DQ without its matching QuantizeLinear")
    return out


def _weight_dq_violations(dq, scale: np.ndarray, model, consumers) -> list[str]:
    """A weight DequantizeLinear's violations of TensorRT's INT8 / INT4 weight rules."""
    w = next(i for i in model.graph.initializer if i.name == dq.input[0])
    k, n = tuple(w.dims) if len(w.dims) == 2 else (0, 0)
    a = _attrs(dq)
    out = []
    uses = consumers.get(dq.output[0], [])
    if not uses or any(c.op_type != "MatMul" or i != 1 for c, i in uses):
        out.append(f"{dq.name}: a weight DQ must feed MatMul's B only")
    if w.data_type == TensorProto.INT8:
        per_channel = scale.shape == (n,) and a.get("axis") == 1 and "block_size" not in a
        if scale.ndim != 0 and not per_channel:
            out.append(f"{dq.name}: INT8 weight scales {scale.shape}, axis {a.get('axis')}")
    elif w.data_type == TensorProto.INT4:
        b = a.get("block_size", 0)
        if a.get("axis") != 0 or not b or k % b or scale.shape != (k // max(b, 1), n):
            out.append(f"{dq.name}: INT4 needs blocks along K: axis {a.get('axis')}, block {b}")
        if not any(i.domain in ("", "ai.onnx") and i.version >= 21 for i in model.opset_import):
            out.append(f"{dq.name}: blocked DequantizeLinear needs opset 21")
    else:
        out.append(f"{dq.name}: weight type {w.data_type} (TensorRT: INT8 or INT4)")
    return out


TENSORRT_READY = {
    n for n, c in CASES.items()
    if isinstance(c, Int4QdqConfig) or (isinstance(c, Int8StaticConfig) and c.activations == "int8")
}  # fmt: skip


@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if isinstance(c, (Int8StaticConfig, Int4QdqConfig,
                                                            Int4WeightOnlyConfig))]
)  # fmt: skip
def test_tensorrt_explicit_quantization_rules(built, name):
    """int8-static with int8 activations and int4-qdq meet every rule; uint8 activations (zero
    point 128) and MatMulNBits (com.microsoft) are caught, so the check itself can fail."""
    _, cfg, model = built(name)
    violations = _tensorrt_qdq_violations(model)
    if name in TENSORRT_READY:
        assert violations == []
        assert _ops(model, "QuantizeLinear") or isinstance(cfg, Int4QdqConfig)
    elif isinstance(cfg, Int8StaticConfig):  # uint8 activations
        assert violations and all("zero point" in v for v in violations), violations
    else:
        assert any("domain com.microsoft" in v for v in violations), violations


def test_tensorrt_rules_catch_onnxruntime_qdq_writer():
    """onnxruntime's own INT4 QDQ writer (``QuantFormat.QDQ``, symmetric) gives a block whose
    largest-magnitude value is positive a negative scale, which TensorRT rejects; that is why
    int4-qdq writes its own (positive) scales."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="m/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    algo = DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, quant_format=QuantFormat.QDQ
    )
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, algo_config=algo)
    q.process()
    violations = _tensorrt_qdq_violations(q.model.model)
    assert violations and all("scales must be finite and > 0" in v for v in violations)


@pytest.mark.parametrize("name", CASES)
def test_prompt_plans_are_the_parents(built, tiny_artifact, name):
    art, _, _ = built(name)
    m = read_manifest(art.path)
    parent = tiny_artifact.manifest
    assert parent.prompt_plans and [p.template for p in parent.prompt_plans] == [
        t.name for t in parent.templates
    ]
    assert m.prompt_plans == parent.prompt_plans == art.manifest.prompt_plans
