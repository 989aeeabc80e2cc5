"""INT8 dynamic variants side by side on one CPU: which keeps its accuracy, at what speed.

    python benchmarks/int8_kernels.py artifacts/smollm2-echo [--pairs 500] [--out runs/int8.json]

Quantizes the fp32 artifact (into runs/int8-kernels/) with int8-dynamic in three weight forms:
int8 full range (u8 x s8 kernels; they saturate on x86-64 without VNNI), int8 7-bit
(``reduce_range``, exact everywhere) and uint8 with a zero point (u8 x u8 kernels, which widen
before multiplying). For each: mean/min cosine to the fp32 artifact and STS Spearman on the first
``--pairs`` STS-B **dev** pairs (test is kept for the bench), model size, and texts/s at batch 32,
timed interleaved round-robin in one process with the fp32 artifact. Prints the CPU and whether it
has VNNI: run it on each CPU kind the team uses and choose the default from the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from echoembed.calibration import CalibrationConfig, Int8DynamicConfig, QuantizeOptions
from echoembed.calibration.quantize import quantize_or_reuse
from echoembed.runtime import Embedder
from echoembed.runtime.cpu import cpu_flags, cpu_model, u8s8_saturates
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import compare_throughput

VARIANTS = {
    "int8 weights, 8-bit": Int8DynamicConfig(reduce_range=False),
    "int8 weights, 7-bit (reduce_range)": Int8DynamicConfig(reduce_range=True),
    "uint8 weights (u8 x u8)": Int8DynamicConfig(weights="uint8", reduce_range=False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path, help="the fp32 artifact")
    ap.add_argument("--sts", type=Path, default=Path("../shared/data/stsb/dev.tsv"))
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("runs/int8-kernels"))
    ap.add_argument("--speed-texts", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    flags = cpu_flags() or frozenset()
    print(
        f"CPU: {cpu_model()} ({platform.machine()}); VNNI: "
        f"{sorted(flags & {'avx512_vnni', 'avx_vnni', 'amx_int8'}) or 'none'}; "
        f"AVX2: {'avx2' in flags}; u8 x s8 saturates here: {u8s8_saturates()}"
    )
    data = read_sts(args.sts, limit=args.pairs)
    sentences = data.unique_sentences()
    options = QuantizeOptions(calibration=CalibrationConfig())
    paths = {"fp32": args.artifact}
    for name, config in VARIANTS.items():
        tag = f"{config.weights}-{'rr' if config.reduce_range else 'full'}"
        target = args.work / f"{args.artifact.name}-{tag}"
        art, _ = quantize_or_reuse(args.artifact, target, config, options, print)
        paths[name] = art.path
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
            )
        )
    base = next(r for r in rows if r["variant"] == "fp32")
    print(
        f"\n{len(data)} STS-B dev pairs ({len(sentences)} sentences); speed: "
        f"{args.speed_texts} texts, batch 32, {args.threads} threads, median of 3 interleaved"
    )
    print(
        "| variant | size MB | mean cos | min cos | STS Spearman | vs fp32 | texts/s "
        "| speed vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['mb']:.1f} | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | "
            f"{r['spearman']:.2f} | {r['spearman'] - base['spearman']:+.2f} | "
            f"{r['texts_per_s']:.1f} | {r['texts_per_s'] / base['texts_per_s']:.2f}x |"
        )
    if args.out is not None:
        report = dict(
            cpu=cpu_model(),
            machine=platform.machine(),
            flags_vnni=sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
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
