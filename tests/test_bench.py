"""`echoembed bench` on the tiny model: rows, ratios, JSON, table and plot (no peer in CI)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from echoembed.errors import InputError
from echoembed.validation.bench import BenchConfig, run_bench
from tests.helpers import STSB_TEST


def test_bench_tiny_model_side_by_side(tiny_llama_dir, tiny_artifact, tmp_path):
    config = BenchConfig(
        artifacts=(tiny_artifact.path,),
        model=str(tiny_llama_dir),
        sts=STSB_TEST,
        limit=12,
        bnb=(),
        peer="off",
        speed_texts=8,
        repeats=1,
        runs_dir=tmp_path,
        max_batch_tokens=256,
        latency_texts=3,
    )
    result = run_bench(config)
    rows = {r.variant: r for r in result.report.rows}
    assert list(rows) == ["pytorch fp32", "pytorch bf16", "echoembed fp32 unfused"]  # head size 8
    ref, onnx = rows["pytorch fp32"], rows["echoembed fp32 unfused"]
    assert ref.vs_reference == 1.0 and ref.mean_cosine == pytest.approx(1.0)
    assert onnx.min_cosine > 0.9999
    assert onnx.sts_spearman == pytest.approx(ref.sts_spearman, abs=0.5)
    assert onnx.file_bytes and onnx.size_vs_fp32 == 1.0 and ref.file_bytes is None
    assert rows["pytorch bf16"].min_cosine > 0.98
    run = result.run_dir
    assert run is not None and run.name.startswith("bench-")
    data = json.loads((run / "bench.json").read_text())
    assert data["schema"] == 1 and data["pairs"] == 12 and len(data["rows"]) == 3
    # the machine block keeps its keys (no providers: bench names no single session)
    assert set(data["machine"]) == {
        "platform", "processor", "cpu_model", "int8_u8s8_saturates", "cpu_count", "python",
        "onnxruntime", "cpu_id",
    }  # fmt: skip
    assert data["machine"]["cpu_count"] == result.report.machine.cpu_count
    assert "| echoembed fp32 unfused |" in (run / "bench.md").read_text()
    assert (run / "bench.md").read_text().startswith("CPU: ")  # every figure names its CPU
    assert data["max_batch_tokens"] == 256 and 0.0 <= data["padding_fraction"] < 1.0
    assert "at most 256 padded tokens each" in (run / "bench.md").read_text()
    assert (run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp*"))
    # roofline: the tiny Llama's weight GEMMs (validation.roofline) at the measured rate
    peaks = data["peaks"]
    assert peaks["fp32"] > 0 and peaks["u8s8"] > 0 and peaks["u8u8"] > 0
    assert onnx.gflop_per_text > 0 and ref.gflop_per_text is None
    assert onnx.achieved_gops == pytest.approx(onnx.gflop_per_text * onnx.texts_per_s)
    assert onnx.peak_fraction == pytest.approx(onnx.achieved_gops / peaks["fp32"])
    assert "| echoembed fp32 unfused | " in (run / "bench.md").read_text().split("roofline")[1]
    # batch-1 latency and the targets (no INT8 row and no peer here: "no row")
    assert ref.latency_ms > 0 and ref.latency_vs_reference == 1.0
    assert onnx.latency_vs_reference == pytest.approx(onnx.latency_ms / ref.latency_ms)
    targets = {t.name: t for t in result.report.targets}
    assert targets["fp32 artifact vs PyTorch fp32"].measured == pytest.approx(onnx.vs_reference)
    assert targets["fp32 artifact vs optimum-onnx"].measured is None
    assert not targets["INT8 size vs fp32"].met
    assert data["latency_texts"] == 3 and len(data["targets"]) == len(targets) == 8
    md = (run / "bench.md").read_text()
    assert "batch-1 latency: median over 3 texts" in md
    assert "| fp32 artifact vs optimum-onnx |" in md


def test_targets_pass_and_fail_on_their_goals():
    """check_targets picks the fastest fp32 and INT8 rows; the INT8 speed goal follows VNNI."""
    from echoembed.validation.bench import BenchReport, BenchRow, check_targets
    from echoembed.validation.report import MachineInfo

    def row(name, kind, prec, rho, tps, size=None, ms=None, cos=1.0):
        rel = None if ms is None else ms / 100.0
        return BenchRow(name, kind, prec, None, 1.0, cos, rho, tps, tps / 20.0, size,
                        latency_ms=ms, latency_vs_reference=rel)  # fmt: skip

    rows = (
        row("pytorch fp32", "pytorch", "fp32", 58.0, 20.0, ms=100.0),
        row("echoembed fp32 fused", "onnx", "fp32", 58.0, 40.0, 1.0, cos=0.999995),
        row("echoembed fp32 fused prefix", "onnx", "fp32", 58.0, 45.0, 1.0, cos=0.99999),
        row("echoembed int8-dynamic", "onnx", "int8-dynamic", 57.2, 60.0, 0.30, ms=20.0),
        row("optimum-onnx fp32", "peer", "fp32", 58.0, 30.0),
    )
    vnni = MachineInfo("Linux", "x86_64", "AMD EPYC", False, 2, "3.11", "1.32.0")
    avx2 = MachineInfo("Linux", "x86_64", "AMD EPYC", True, 2, "3.11", "1.32.0")
    for machine, int8_met in ((vnni, False), (avx2, True)):  # 3.00x: under 3.5, over 2.5
        report = BenchReport("2026-01-01", machine, "sts.tsv", 4, 8, 8, 32, 1, rows,
                             padding_fraction=0.074)  # fmt: skip
        t = {x.name.split(" (")[0]: x for x in check_targets(report)}
        assert t["fp32 artifact vs optimum-onnx"].measured == pytest.approx(1.5)
        assert t["fp32 artifact vs optimum-onnx"].row.startswith("echoembed fp32 fused prefix")
        assert t["fp32 artifact vs PyTorch fp32"].met  # 2.25x
        assert t["INT8 artifact vs PyTorch fp32"].met is int8_met
        assert t["INT8 STS Spearman vs fp32"].measured == pytest.approx(-0.8)
        assert t["INT8 STS Spearman vs fp32"].met and t["INT8 size vs fp32"].met
        assert t["INT8 batch-1 latency vs PyTorch fp32"].measured == pytest.approx(0.2)
        assert t["padding of the artifacts' batches"].met
        assert t["fp32 artifacts' min cosine vs PyTorch fp32"].met
    worse = tuple(
        dataclasses.replace(r, sts_spearman=56.5, latency_vs_reference=0.3, size_vs_fp32=0.5)
        if r.precision == "int8-dynamic" else dataclasses.replace(r, min_cosine=0.9998)
        if r.kind == "onnx" else r
        for r in rows
    )  # fmt: skip
    report = BenchReport("x", vnni, "sts.tsv", 4, 8, 8, 32, 1, worse, padding_fraction=0.104)
    failed = {x.name.split(" (")[0] for x in check_targets(report) if not x.met}
    assert failed == {
        "INT8 artifact vs PyTorch fp32", "INT8 STS Spearman vs fp32", "INT8 size vs fp32",
        "INT8 batch-1 latency vs PyTorch fp32", "padding of the artifacts' batches",
        "fp32 artifacts' min cosine vs PyTorch fp32",
    }  # fmt: skip


def test_bench_text_names_the_cpu_and_flags_a_disturbed_probe():
    """bench.md starts with the CPU; a row above the probe's peak (the probe ran under load) is
    called out instead of printed as a plausible fraction."""
    from echoembed.validation.bench import BenchReport, BenchRow, format_bench
    from echoembed.validation.report import MachineInfo

    machine = MachineInfo("Linux", "x86_64", "AMD EPYC", True, 2, "3.11", "1.32.0",
                          cpu_id="AuthenticAMD family 25 model 1; has avx2")  # fmt: skip
    rows = (
        BenchRow("pytorch fp32", "pytorch", "fp32", None, 1.0, 1.0, 58.0, 10.0, 1.0),
        BenchRow("echoembed int8-dynamic", "onnx", "int8-dynamic", 1, 0.99, 0.98, 57.0, 30.0,
                 3.0, 0.41, gflop_per_text=5.5, achieved_gops=165.0, peak_fraction=1.34),
        BenchRow("echoembed fp32", "onnx", "fp32", 1, 1.0, 1.0, 58.0, 20.0, 2.0, 1.0,
                 gflop_per_text=5.5, achieved_gops=110.0, peak_fraction=0.8),
    )  # fmt: skip
    peaks = {"fp32": 137.5, "u8s8": 123.0, "u8u8": 100.0}
    text = format_bench(BenchReport("x", machine, "sts.tsv", 4, 8, 8, 32, 1, rows, peaks=peaks))
    assert text.startswith("CPU: AMD EPYC (AuthenticAMD family 25 model 1; has avx2), 2 cores")
    assert "u8 x s8 123 GOP/s, u8 x u8 100 GOP/s" in text
    assert "| echoembed int8-dynamic | 5.50 | 165 | 134% |" in text
    warning = next(line for line in text.splitlines() if line.startswith("warning:"))
    assert "echoembed int8-dynamic ran above" in warning and "echoembed fp32" not in warning
    quiet = format_bench(BenchReport("x", machine, "sts.tsv", 4, 8, 8, 32, 1, rows[::2],
                                     peaks={"fp32": 137.5, "u8s8": 300.0}))  # fmt: skip
    assert "warning:" not in quiet and "u8 x u8" not in quiet  # older reports: no u8u8 peak


def test_graph_flops_counts_every_weight_gemm(tiny_artifact, tmp_path):
    """Tiny Llama (hidden 32, 4 heads of 8, 2 kv heads, MLP 64, 2 layers): 2*K*N per token over
    q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64, down 64x32; the same after INT8."""
    from echoembed.calibration import (
        CalibrationConfig,
        Int8DynamicConfig,
        QuantizeOptions,
        quantize,
    )
    from echoembed.validation.roofline import graph_flops

    want = 2 * 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 2 * 32 * 64 + 64 * 32)
    f = graph_flops(tiny_artifact.model_path)
    assert f.per_token == want and not f.integer and f.kernel == "fp32"
    opts = QuantizeOptions(calibration=CalibrationConfig(samples=8, batch_size=4))
    q = quantize(tiny_artifact.path, tmp_path / "q", Int8DynamicConfig(weights="int8"), opts)
    f8 = graph_flops(q.model_path)
    assert f8.per_token == want and f8.integer and f8.kernel == "u8s8"
    u = quantize(tiny_artifact.path, tmp_path / "u", Int8DynamicConfig(weights="uint8"), opts)
    fu = graph_flops(u.model_path)  # u8 x u8 kernels: their own (lower) peak applies
    assert fu.per_token == want and fu.kernel == "u8u8"


def test_bench_refuses_missing_artifacts_and_bad_peer(tmp_path):
    with pytest.raises(InputError, match="run `make demo`"):
        run_bench(BenchConfig(artifacts=(tmp_path / "nope",), runs_dir=tmp_path))
    with pytest.raises(InputError, match="peer must be"):
        run_bench(BenchConfig(peer="maybe", runs_dir=tmp_path))


def test_plot_bench_writes_a_png_atomically(tmp_path):
    """plot_bench renders into memory and writes once: a PNG, no temporary file left."""
    from echoembed.validation.bench import BenchReport, BenchRow, plot_bench
    from echoembed.validation.report import MachineInfo

    machine = MachineInfo("Linux", "x86_64", None, None, 2, "3.11", "1.32.0")
    rows = tuple(
        BenchRow(name, kind, "fp32", None, 1.0, 1.0, rho, tps, tps / 10.0)
        for name, kind, rho, tps in (("a", "pytorch", 58.0, 10.0), ("b", "onnx", 57.0, 25.0))
    )
    report = BenchReport("2026-01-01", machine, "sts.tsv", 4, 8, 8, 32, 1, rows)
    out = tmp_path / "bench.png"
    out.write_bytes(b"old")
    assert plot_bench(report, out) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    assert json.loads(report.to_json())["machine"]["cpu_count"] == 2


def test_batch1_latency_takes_turns_in_blocks_after_an_untimed_call():
    """Each candidate embeds every text alone, in blocks (order alternating per block), each
    block opened by an untimed call, so one runtime's spinning threads never meet the next
    one's timed call."""
    from echoembed.validation.timing import compare_latency

    calls: list[tuple[str, str]] = []

    def candidate(name):
        def run(texts):
            assert len(texts) == 1
            calls.append((name, texts[0]))

        return run

    texts = [f"t{i}" for i in range(10)]
    lat = compare_latency({"a": candidate("a"), "b": candidate("b")}, texts, warmup=1, block=4)
    assert {n: len(v.seconds) for n, v in lat.items()} == {"a": 10, "b": 10}
    assert all(s >= 0 for v in lat.values() for s in v.seconds)
    timed = calls[2:]  # after the warm-up (one text each)
    # blocks of 4, 4, 2 texts: a then b, b then a, a then b; each block starts untimed
    expect = []
    blocks = ((("a", "b"), texts[0:4]), (("b", "a"), texts[4:8]), (("a", "b"), texts[8:]))
    for names, chunk in blocks:
        for n in names:
            expect += [(n, chunk[0])] + [(n, t) for t in chunk]
    assert timed == expect
    with pytest.raises(ValueError, match="block"):
        compare_latency({"a": candidate("a")}, texts, block=0)
