"""The TensorRT pre-flight (`echoembed inspect --trt`) on real artifacts and hand-made graphs.

Real: the tiny random Llama artifact, quantized with every recipe (as
tests/test_manifest_matches_graph.py does); the verdict per recipe is the documented one.
Hand-made: small Q/DQ and INT4 graphs built with onnx.helper, one rule broken at a time, each
next to a control graph that passes (so a failing variant fails for the rule it breaks).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from echoembed.calibration import CalibrationConfig, QuantizeOptions, quantize, recipe_from_name
from echoembed.cli.main import main
from echoembed.engines import PreflightConfig, check_model, format_report, preflight
from echoembed.engines.preflight import resolve_trt_version
from echoembed.errors import UserError
from tests.helpers import run_blocked

SMALL = QuantizeOptions(calibration=CalibrationConfig(samples=8, batch_size=4))
LINEAR = 14  # 2 layers x (q, k, v, o, gate, up, down)


def _registered(name: str) -> bool:
    try:
        recipe_from_name(name)
    except UserError:
        return False
    return True


INT4_QDQ = pytest.mark.skipif(
    not _registered("int4-qdq"), reason="the int4-qdq recipe is not registered yet"
)
RECIPES = {  # name -> (recipe, overrides)
    "fp16": ("fp16", {}),
    "int8-static": ("int8-static", {}),  # int8 activations, zero point 0: the default
    "int8-static-u8": ("int8-static", {"activations": "uint8"}),
    "int8-dynamic": ("int8-dynamic", {}),  # per-token activation scales: the default
    "int8-dynamic-tensor": ("int8-dynamic", {"activation_scale": "tensor"}),
    "int4-rtn": ("int4-rtn", {"block_size": 16}),
    "int4-hqq": ("int4-hqq", {}),
    "int4-qdq": ("int4-qdq", {}),
}


@pytest.fixture(scope="module")
def built(tiny_artifact, tmp_path_factory):
    """name -> quantized tiny artifact (made on first use); "fp32" is the parent itself."""
    root = tmp_path_factory.mktemp("preflight")
    cache = {"fp32": tiny_artifact}

    def get(name: str):
        if name not in cache:
            recipe, overrides = RECIPES[name]
            cache[name] = quantize(
                tiny_artifact.path, root / name, recipe_from_name(recipe, **overrides), SMALL
            )
        return cache[name]

    return get


def _rules(report) -> set[tuple[str, str]]:
    return {(p.op, p.rule) for p in report.problems}


@pytest.mark.parametrize(
    "name", ["fp32", "fp16", "int8-static", pytest.param("int4-qdq", marks=INT4_QDQ)]
)
def test_tensorrt_ready_recipes_pass(built, name):
    art = built(name)
    report = preflight(PreflightConfig(art.path))
    assert report.passed and not report.failed, format_report(report)
    assert report.table_version == "10.15" and report.opset_range == (9, 24)
    assert report.nodes == sum(report.op_counts.values()) > 100
    assert not [op for op in report.op_counts if ":" in op], "default domain only"
    assert [d.name for d in report.dynamic_inputs] == ["input_ids", "attention_mask", "pool_mask"]
    assert all(d.axes == ("batch", "sequence") for d in report.dynamic_inputs)
    if name == "int8-static":
        q, dq = report.op_counts["QuantizeLinear"], report.op_counts["DequantizeLinear"]
        assert 0 < q and dq == q + LINEAR  # one Q/DQ per shared activation, one DQ per weight
    if name == "int4-qdq":
        assert report.opset >= 21 and report.op_counts["DequantizeLinear"] >= LINEAR


@pytest.mark.parametrize("scale", ["token", "tensor"])
def test_int8_dynamic_fails_naming_its_ops(built, scale):
    """Per-token scales (the default) are run-time QuantizeLinear with uint8 zero points (an
    Expand of uint8), and the up projections (folded row scales) ORT's MatMulIntegerToFloat;
    per-tensor ones DynamicQuantizeLinear: both point to int8-static."""
    report = preflight(
        PreflightConfig(built("int8-dynamic" + ("" if scale == "token" else "-tensor")).path)
    )
    assert report.failed
    quantize = {("DynamicQuantizeLinear", "unsupported-op")}
    if scale == "token":
        quantize = {
            ("QuantizeLinear", "qdq-scale-constant"),
            ("QuantizeLinear", "qdq-uint8"),
            ("Expand", "op-type"),
            ("com.microsoft:MatMulIntegerToFloat", "domain"),
        }
    assert _rules(report) == quantize | {("MatMulInteger", "unsupported-op")}
    groups = {g.op: g for g in report.groups()}
    folded = 2 if scale == "token" else 0  # one up projection per layer
    if folded:
        assert groups["com.microsoft:MatMulIntegerToFloat"].count == folded
    gemms = groups["MatMulInteger"]
    assert gemms.count == LINEAR - folded and len(gemms.nodes) == 3
    assert all("int8-static" in g.fix for g in groups.values())
    text = format_report(report)
    assert "REJECTED" in text and f"(+{LINEAR - folded - 3} more)" in text
    entries = len(report.groups())
    assert entries == len(_rules(report)) and len(text.splitlines()) < 6 + 3 * entries, (
        "collapsed: one entry per (op, rule)"
    )


@pytest.mark.parametrize("name", ["int4-rtn", "int4-hqq"])
def test_int4_matmulnbits_recipes_fail(built, name):
    report = preflight(PreflightConfig(built(name).path))
    assert report.failed and report.recipe == name
    groups = {g.op: g for g in report.groups()}
    nbits = groups["com.microsoft:MatMulNBits"]
    assert nbits.rule == "domain" and nbits.count == LINEAR and "int4-qdq" in nbits.fix
    assert groups["com.microsoft:GatherBlockQuantized"].count == 1  # the embedding table
    assert set(groups) == {"com.microsoft:MatMulNBits", "com.microsoft:GatherBlockQuantized"}


def test_uint8_activations_fail_on_the_zero_point(built):
    report = preflight(PreflightConfig(built("int8-static-u8").path))
    assert _rules(report) == {("QuantizeLinear", "qdq-uint8"), ("DequantizeLinear", "qdq-uint8")}
    assert all("--activations int8" in p.fix for p in report.problems)


def test_trt_version_selects_the_documented_table(built):
    fp32 = preflight(PreflightConfig(built("fp32").path, "10.1"))
    assert fp32.passed and fp32.opset_range == (9, 20) and fp32.table_version == "10.1"
    assert resolve_trt_version("10.15") == ("10.15", None)
    assert resolve_trt_version("10.8")[0] == "10.1" and "10.8" in resolve_trt_version("10.8")[1]
    assert resolve_trt_version("10.16.1")[0] == "10.15"
    assert resolve_trt_version("10")[0] == "10.0"
    for bad in ("8.6", "11.0", "ten"):
        with pytest.raises(UserError, match="10.x"):
            resolve_trt_version(bad)


@INT4_QDQ
def test_int4_qdq_opset_21_is_undocumented_for_10_1_but_not_refused(built):
    report = preflight(PreflightConfig(built("int4-qdq").path, "10.1"))
    assert report.passed and [(w.op, w.rule) for w in report.warnings] == [
        ("opset", "opset-above-documented")
    ]
    assert "10.15" in report.warnings[0].fix and "warning opset" in format_report(report)
    assert not preflight(PreflightConfig(built("int4-qdq").path)).warnings


def test_cli_inspect_trt_exit_status(built, capsys):
    assert main(["inspect", "--trt", str(built("fp32").path)]) == 0
    out = capsys.readouterr().out
    assert "format version" in out and "checksums" in out and "PASSES" in out
    assert (
        main(["inspect", "--trt", "--trt-version", "10.15", str(built("int8-dynamic").path)]) == 1
    )
    out = capsys.readouterr().out
    assert "MatMulInteger [unsupported-op]" in out and "int8-static" in out
    assert main(["inspect", str(built("int8-dynamic").path)]) == 0, "no --trt: no verdict"
    assert "pre-flight" not in capsys.readouterr().out
    assert main(["inspect", "--trt", "--trt-version", "9.0", str(built("fp32").path)]) == 2


def test_preflight_runs_without_torch(built):
    r = run_blocked(
        f"""
        from echoembed.engines import PreflightConfig, preflight
        report = preflight(PreflightConfig({str(built("int8-dynamic").path)!r}))
        print(report.failed, len(report.problems))
        assert "torch" not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr
    here = preflight(PreflightConfig(built("int8-dynamic").path))
    assert r.stdout.split() == ["True", str(len(here.problems))]
    assert len(here.problems) > LINEAR  # every MatMulInteger and DynamicQuantizeLinear


def test_the_real_model_passes(smollm2_unfused_artifact):
    report = preflight(PreflightConfig(smollm2_unfused_artifact.path))
    assert report.passed, format_report(report)
    assert report.op_counts["MatMul"] >= 30 * 7 and report.op_counts["GatherND"] == 1


def test_the_fused_real_model_fails_naming_no_fuse(smollm2_artifact):
    """The default export is fused for ONNX Runtime; TensorRT has no importer for those ops."""
    report = preflight(PreflightConfig(smollm2_artifact.path))
    assert not report.passed
    ops = {p.op for p in report.problems}
    assert {
        "com.microsoft:RotaryEmbedding",
        "com.microsoft:SkipSimplifiedLayerNormalization",
    } <= ops
    assert all("--no-fuse" in p.fix for p in report.problems), format_report(report)


# hand-made graphs ---------------------------------------------------------------------------


def _model(nodes, inits, inputs=None, opset=18, domains=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        initializer=inits,
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _int8_graph(
    act_zero=0, act_scale=(0.1,), weight_axis=1, weight_scale=(0.5, 0.25, 0.125), scale_node=False
):
    """x [batch, 4] -> Q/DQ (activation) -> MatMul with an int8 [4, 3] weight -> DQ -> y."""
    w = numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "w")
    ws = numpy_helper.from_array(np.array(weight_scale, np.float32), "w_scale")
    inits = [w, ws, numpy_helper.from_array(np.array(np.int8(act_zero)), "a_zero")]
    nodes = []
    if scale_node:  # the scale computed from the activation at run time
        nodes.append(helper.make_node("ReduceMax", ["x"], ["a_scale"], keepdims=0, name="range"))
    else:
        shape = () if len(act_scale) == 1 else (len(act_scale),)
        inits.append(
            numpy_helper.from_array(np.array(act_scale, np.float32).reshape(shape), "a_scale")
        )
    axis = {} if len(act_scale) == 1 else {"axis": 1}
    zero = "a_zero" if len(act_scale) == 1 else ""
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "a_scale", zero], ["xq"], name="act/Q", **axis),
        helper.make_node(
            "DequantizeLinear", ["xq", "a_scale", zero], ["xd"], name="act/DQ", **axis
        ),
        helper.make_node(
            "DequantizeLinear", ["w", "w_scale"], ["wd"], name="w/DQ", axis=weight_axis
        ),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    return _model(nodes, inits)


def test_handmade_int8_control_passes_and_runs():
    model = _int8_graph()
    onnx.checker.check_model(model, full_check=True)
    report = check_model(model)
    assert report.passed, format_report(report)
    assert report.op_counts == {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1}


QD = ("QuantizeLinear", "DequantizeLinear")


@pytest.mark.parametrize(
    "kwargs, rule, ops",
    [
        ({"act_zero": 3}, "qdq-zero-point", QD),
        ({"scale_node": True}, "qdq-scale-constant", QD),
        ({"act_scale": (0.1, 0.2, 0.3, 0.4)}, "qdq-activation-per-channel", QD[:1]),
        ({"act_scale": (-0.1,)}, "qdq-scale-positive", QD),
        ({"weight_axis": 0, "weight_scale": (0.5, 0.25, 0.125, 0.1)}, "qdq-weight-axis", QD[1:]),
    ],
    ids=["asymmetric-zero-point", "scale-not-constant", "per-channel-activation",
         "negative-scale", "weight-scales-on-K"],
)  # fmt: skip
def test_handmade_int8_rules(kwargs, rule, ops):
    report = check_model(_int8_graph(**kwargs))
    assert _rules(report) == {(op, rule) for op in ops}, format_report(report)
    assert all(p.fix and p.detail for p in report.problems)


def test_handmade_uint8_weights_are_flagged():
    model = _int8_graph()
    w = numpy_helper.from_array(np.arange(12, dtype=np.uint8).reshape(4, 3), "w")
    model.graph.initializer[0].CopyFrom(w)
    assert _rules(check_model(model)) == {("DequantizeLinear", "qdq-weight-type")}


def _int4_graph(k=32, n=4, block=16, opset=21, zero=False, reader="MatMul", wtype=TensorProto.INT4):
    """x [batch, k] -> MatMul with an INT4 [k, n] weight, DequantizeLinear axis 0 + block_size."""
    rng = np.random.default_rng(0)
    q = (
        rng.integers(-8, 8, size=(k, n))
        if wtype == TensorProto.INT4
        else rng.integers(0, 16, (k, n))
    )
    w = helper.make_tensor("w", wtype, (k, n), q.ravel().tolist())
    blocks = k // (block or 16)
    s = numpy_helper.from_array(rng.uniform(0.01, 0.1, (blocks, n)).astype(np.float32), "s")
    inits, ins = [w, s], ["w", "s"]
    if zero:
        inits.append(helper.make_tensor("z", wtype, (blocks, n), [0] * (blocks * n)))
        ins.append("z")
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 0}
    nodes = [helper.make_node("DequantizeLinear", ins, ["wd"], name="w/DQ", **attrs)]
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])]
    if reader == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"))
    else:  # the dequantized weight used as an activation
        nodes.append(helper.make_node("Add", ["wd", "wd"], ["y"], name="add"))
    return _model(nodes, inits, inputs=x, opset=opset)


def test_handmade_int4_control_passes_and_runs():
    import onnxruntime as ort

    model = _int4_graph()
    onnx.checker.check_model(model, full_check=True)
    report = check_model(model)
    assert report.passed, format_report(report)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((2, 32), np.float32)})
    assert y.shape == (2, 4) and np.isfinite(y).all()


@pytest.mark.parametrize(
    "kwargs, rules",
    [
        ({"zero": True}, {"int4-zero-point"}),
        ({"block": 0}, {"int4-block"}),
        ({"opset": 20}, {"int4-block"}),
        ({"n": 3}, {"int4-odd-dim"}),
        ({"reader": "Add"}, {"int4-consumer"}),
    ],
    ids=["zero-point", "no-block-size", "opset-20", "odd-last-dim", "not-read-by-matmul"],
)
def test_handmade_int4_rules(kwargs, rules):
    report = check_model(_int4_graph(**kwargs))
    assert {p.rule for p in report.problems} == rules, format_report(report)
    assert all("int4-qdq" in p.fix or "--exclude" in p.fix for p in report.problems)


def test_handmade_uint4_weights_are_flagged():
    report = check_model(_int4_graph(wtype=TensorProto.UINT4))
    assert _rules(report) == {("DequantizeLinear", "qdq-weight-type")}


def test_handmade_ops_domains_types_and_inputs():
    x16 = helper.make_tensor_value_info("x", TensorProto.INT16, ["batch", 4])
    nodes = [
        helper.make_node("Cast", ["x"], ["xl"], to=TensorProto.INT64, name="cast"),
        helper.make_node("MatMul", ["xl", "xl"], ["m"], name="int_matmul"),  # MatMul on int64
        helper.make_node("Unique", ["m"], ["u"], name="unique"),
        helper.make_node("FusedMatMul", ["u", "u"], ["y"], name="fused", domain="com.microsoft"),
    ]
    report = check_model(_model(nodes, [], inputs=[x16], domains=("com.microsoft",)))
    assert _rules(report) == {
        ("graph input", "io-type"),
        ("Cast", "op-type"),  # TensorRT has no INT16 tensors at all
        ("MatMul", "op-type"),
        ("Unique", "unsupported-op"),
        ("com.microsoft:FusedMatMul", "domain"),
    }
    assert next(p for p in report.problems if p.rule == "io-type").node == "x"


def test_opset_outside_the_documented_range():
    report = check_model(_int8_graph(), "10.15")
    assert report.passed
    old = _int8_graph()
    old.opset_import[0].version = 8
    report = check_model(old)
    assert _rules(report) == {("opset", "opset-range")} and not report.warnings
