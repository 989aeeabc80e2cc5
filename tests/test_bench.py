"""`echoembed bench` on the tiny model: rows, ratios, JSON, table and plot (no peer in CI)."""

from __future__ import annotations

import json

import pytest

from echoembed.errors import InputError
from echoembed.validation.bench import BenchConfig, run_bench
from tests.conftest import STSB_TEST


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
    )
    result = run_bench(config)
    rows = {r.variant: r for r in result.report.rows}
    assert list(rows) == ["pytorch fp32", "pytorch bf16", "echoembed fp32"]
    ref, onnx = rows["pytorch fp32"], rows["echoembed fp32"]
    assert ref.vs_reference == 1.0 and ref.mean_cosine == pytest.approx(1.0)
    assert onnx.min_cosine > 0.9999
    assert onnx.sts_spearman == pytest.approx(ref.sts_spearman, abs=0.5)
    assert onnx.file_bytes and onnx.size_vs_fp32 == 1.0 and ref.file_bytes is None
    assert rows["pytorch bf16"].min_cosine > 0.98
    run = result.run_dir
    assert run is not None and run.name.startswith("bench-")
    data = json.loads((run / "bench.json").read_text())
    assert data["schema"] == 1 and data["pairs"] == 12 and len(data["rows"]) == 3
    assert "| echoembed fp32 |" in (run / "bench.md").read_text()
    assert (run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp*"))


def test_bench_refuses_missing_artifacts_and_bad_peer(tmp_path):
    with pytest.raises(InputError, match="run `make demo`"):
        run_bench(BenchConfig(artifacts=(tmp_path / "nope",), runs_dir=tmp_path))
    with pytest.raises(InputError, match="peer must be"):
        run_bench(BenchConfig(peer="maybe", runs_dir=tmp_path))
