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
    Int4WeightOnlyConfig,
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
    "int8-static": Int8StaticConfig(exclude=EXCLUDE),
    "int8-static-u8-w7": Int8StaticConfig(activations="uint8", reduce_range=True),
    "int4-rtn": Int4WeightOnlyConfig(
        algorithm="rtn", block_size=16, accuracy_level=0, quantize_embedding=False
    ),
    "int4-hqq": Int4WeightOnlyConfig(algorithm="hqq", exclude=EXCLUDE),
    "int4-hqq-level0": Int4WeightOnlyConfig(algorithm="hqq", accuracy_level=0),
    "int4-gptq": Int4WeightOnlyConfig(algorithm="gptq", accuracy_level=2, exclude=EXCLUDE),
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


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.recipe.startswith("int4")])
def test_matmulnbits_carry_the_settings(built, name):
    art, cfg, model = built(name)
    nodes = _ops(model, "MatMulNBits")
    assert len(nodes) == LINEAR - len(art.manifest.quantization.excluded)
    for node in nodes:
        a = _attrs(node)
        assert node.domain == MS and a["bits"] == 4 and a["block_size"] == cfg.block_size
        assert a.get("accuracy_level", 0) == cfg.accuracy_level, node.name
    inits = _inits(model)
    zeros = {inits[n.input[3]].dtype for n in nodes if len(n.input) > 3}
    if cfg.algorithm == "rtn":
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
    nodes = _ops(model, "MatMulInteger")
    assert len(nodes) == LINEAR - len(art.manifest.quantization.excluded)
    inits = _inits(model)
    top = 64 if cfg.reduce_range else 127  # ORT's reduce_range grid is -64..64
    for node in nodes:
        w = inits[node.input[1]]
        assert w.dtype == np.int8 and int(np.abs(w.astype(np.int16)).max()) == top, node.name
        scale = inits[node.input[1].removesuffix("_quantized") + "_scale"]
        assert scale.shape == ((w.shape[1],) if cfg.per_channel else ()), node.name


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


@pytest.mark.parametrize("name", CASES)
def test_prompt_plans_are_the_parents(built, tiny_artifact, name):
    art, _, _ = built(name)
    m = read_manifest(art.path)
    parent = tiny_artifact.manifest
    assert parent.prompt_plans and [p.template for p in parent.prompt_plans] == [
        t.name for t in parent.templates
    ]
    assert m.prompt_plans == parent.prompt_plans == art.manifest.prompt_plans
