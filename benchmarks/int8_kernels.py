"""INT8 dynamic variants side by side on one CPU: which keeps its accuracy, at what speed.

    python benchmarks/int8_kernels.py artifacts/smollm2-echo [--pairs 500] [--out runs/int8.json]

Quantizes the fp32 artifact (into runs/int8-kernels/) in the INT8 forms a CPU without VNNI can
choose from (issue 14, item 4): int8-dynamic with int8 weights at full range (u8 x s8 kernels;
they saturate on x86-64 without VNNI) and 7-bit (``reduce_range``, exact everywhere), with uint8
weights and a zero point (u8 x u8 kernels, which widen before multiplying), int8-static with uint8
activations (8- and 7-bit weights), and per-layer exclusion (7-bit, the most sensitive layers kept
in float by the quantizer's search until mean cosine on its held-out calibration texts is within
``--exclusion-drop`` of the parent). For each: mean/min cosine to the fp32 artifact and STS
Spearman on the first ``--pairs`` STS-B **dev** pairs (test is kept for the bench), model size,
texts/s at batch 32 (interleaved round-robin in one process with the fp32 artifact) and batch-1
latency (each text alone, the variants taking turns per block of 8 texts). Prints the CPU and
whether it has VNNI: run it on each CPU kind the team uses and choose the default from the
numbers. ``--only`` picks variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from echoembed.calibration import (
    CalibrationConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
)
from echoembed.calibration.quantize import quantize_or_reuse
from echoembed.runtime import Embedder
from echoembed.runtime.cpu import VNNI_FLAGS, cpu_flags, cpu_id, cpu_model, u8s8_saturates
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import compare_latency, compare_throughput

# name -> (tag of its directory, recipe, whether the quantizer's exclusion search runs)
VARIANTS = {
    "dynamic, int8 weights 8-bit": ("dyn-int8-full", Int8DynamicConfig(reduce_range=False), False),
    "dynamic, int8 weights 7-bit": ("dyn-int8-rr", Int8DynamicConfig(reduce_range=True), False),
    "dynamic, uint8 weights (u8 x u8)": (
        "dyn-uint8",
        Int8DynamicConfig(weights="uint8", reduce_range=False),
        False,
    ),
    "static uint8 act., 8-bit weights": (
        "static-u8-full",
        Int8StaticConfig(activations="uint8", reduce_range=False),
        False,
    ),
    "static uint8 act., 7-bit weights": (
        "static-u8-rr",
        Int8StaticConfig(activations="uint8", reduce_range=True),
        False,
    ),
    "dynamic 7-bit + per-layer exclusion": (
        "dyn-int8-rr-excl",
        Int8DynamicConfig(reduce_range=True),
        True,
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path, help="the fp32 artifact")
    ap.add_argument("--sts", type=Path, default=Path("../shared/data/stsb/dev.tsv"))
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("runs/int8-kernels"))
    ap.add_argument("--speed-texts", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-texts", type=int, default=48)
    ap.add_argument(
        "--exclusion-drop",
        type=float,
        default=0.004,
        help="the exclusion variant's budget: mean cosine drop vs fp32 on held-out texts",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated directory tags of the variants to run (default: all): "
        + ", ".join(t for t, _, _ in VARIANTS.values()),
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    chosen = VARIANTS
    if args.only:
        tags = set(args.only.split(","))
        unknown = tags - {t for t, _, _ in VARIANTS.values()}
        if unknown:
            ap.error(f"unknown --only tags {sorted(unknown)}")
        chosen = {n: v for n, v in VARIANTS.items() if v[0] in tags}

    flags = cpu_flags() or frozenset()
    print(
        f"CPU: {cpu_model()} ({platform.machine()}; {cpu_id()}); VNNI: "
        f"{sorted(flags & VNNI_FLAGS) or 'none'}; "
        f"AVX2: {'avx2' in flags}; u8 x s8 saturates here: {u8s8_saturates()}"
    )
    data = read_sts(args.sts, limit=args.pairs)
    sentences = data.unique_sentences()
    plain = QuantizeOptions(calibration=CalibrationConfig())
    search = QuantizeOptions(
        calibration=CalibrationConfig(), max_drop=args.exclusion_drop, allow_over_budget=True
    )
    paths = {"fp32": args.artifact}
    excluded: dict[str, int] = {}
    for name, (tag, config, searches) in chosen.items():
        target = args.work / f"{args.artifact.name}-{tag}"
        art, _ = quantize_or_reuse(
            args.artifact, target, config, search if searches else plain, print
        )
        paths[name] = art.path
        excluded[name] = len(art.manifest.quantization.excluded)
    runners = {n: Embedder.load(p, threads=args.threads) for n, p in paths.items()}
    embedded = {
        n: r.encode(sentences, batch_size=32, show_progress=False) for n, r in runners.items()
    }
    index = {s: i for i, s in enumerate(sentences)}
    runs = {
        n: (lambda t, r=r: r.encode(t, batch_size=32, show_progress=False))
        for n, r in runners.items()
    }
    speed = compare_throughput(runs, sentences[: args.speed_texts], repeats=3)
    lat = compare_latency(runs, sentences[: args.latency_texts])
    want = embedded["fp32"]
    rows = []
    for n, p in paths.items():
        got = embedded[n]
        cos = (got * want).sum(axis=1)
        rho = sts_spearman(data, lambda s, got=got: got[[index[x] for x in s]])
        size = sum(f.stat().st_size for f in Path(p).glob("model.onnx*"))
        rows.append(
            dict(
                variant=n,
                mean_cos=float(cos.mean()),
                min_cos=float(cos.min()),
                spearman=rho,
                mb=size / 1e6,
                texts_per_s=speed[n].texts_per_second,
                batch1_ms=lat[n].median_ms,
                excluded_layers=excluded.get(n, 0),
            )
        )
    base = next(r for r in rows if r["variant"] == "fp32")
    print(
        f"\n{len(data)} STS-B dev pairs ({len(sentences)} sentences); speed: "
        f"{args.speed_texts} texts, batch 32, {args.threads} threads, median of 3 interleaved; "
        f"batch-1 latency: median over {args.latency_texts} texts, each alone, variants in turn"
    )
    print(
        "| variant | float layers | size MB | mean cos | min cos | STS Spearman | vs fp32 "
        "| texts/s | speed vs fp32 | batch-1 ms | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['excluded_layers']} | {r['mb']:.1f} | {r['mean_cos']:.5f} | "
            f"{r['min_cos']:.5f} | {r['spearman']:.2f} | {r['spearman'] - base['spearman']:+.2f} | "
            f"{r['texts_per_s']:.1f} | {r['texts_per_s'] / base['texts_per_s']:.2f}x | "
            f"{r['batch1_ms']:.1f} | {r['batch1_ms'] / base['batch1_ms']:.2f}x |"
        )
    if args.out is not None:
        report = dict(
            cpu=cpu_model(),
            cpu_id=cpu_id(),
            machine=platform.machine(),
            flags_vnni=sorted(flags & VNNI_FLAGS),
            avx2="avx2" in flags,
            pairs=len(data),
            rows=rows,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".int8-")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
