"""INT8 activation scales per tensor vs per block: accuracy at batch 32 and alone, and speed.

    python benchmarks/int8_granularity.py artifacts/smollm2-echo-prefix \\
        artifacts/smollm2-echo-prefix-int8-dynamic [--out runs/int8-granularity.json]

ONNX Runtime's dynamic INT8 (the ``int8-dynamic`` recipe: ``DynamicQuantizeLinear`` ->
``MatMulInteger``) quantizes each activation tensor with one scale, the max |x| of the whole
batch, so a text's embedding depends on the texts (and the padding) it is batched with.
``MatMulNBits`` with 8-bit weights and ``accuracy_level=4`` quantizes activations to int8 per
block of K in each row instead (ORT's blockwise kernels), so a text's embedding no longer depends
on its batch. This script:

1. embeds all STS-B test sentences with each INT8 artifact given at batch 32 and at batch 1
   (each text alone) and prints Spearman and cosine to the fp32 parent for both;
2. quantizes the fp32 parent with the ``int8-blockwise`` recipe (8-bit symmetric MatMulNBits,
   ``--block-size``, accuracy_level 4, every linear layer, no SmoothQuant; under ``--work``) and
   measures it the same way;
3. times all of them and the fp32 parent at batch 32 (round-robin, median of 3) and at batch 1
   (``compare_latency``: turns per block of 8 texts).

Prints the CPU (``cpu_id``). Results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from echoembed.runtime import Embedder
from echoembed.runtime.cpu import cpu_id
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import compare_latency, compare_throughput


def blockwise(parent: Path, work: Path, block_size: int) -> Path:
    """The ``int8-blockwise`` artifact of the fp32 artifact at ``parent`` (made once, reused)."""
    from echoembed.calibration import Int8BlockwiseConfig
    from echoembed.calibration.quantize import quantize_or_reuse

    out = work / f"{parent.name}-int8-blockwise-{block_size}"
    art, _ = quantize_or_reuse(parent, out, Int8BlockwiseConfig(block_size=block_size))
    return art.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parent", type=Path, help="the fp32 artifact")
    ap.add_argument("int8", type=Path, nargs="*", help="INT8 artifacts of it to compare")
    ap.add_argument("--sts", type=Path, default=Path("../shared/data/stsb/test.tsv"))
    ap.add_argument("--work", type=Path, default=Path("runs/int8-granularity"))
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--speed-texts", type=int, default=256)
    ap.add_argument("--latency-texts", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print("CPU:", cpu_id())
    data = read_sts(args.sts)
    sentences = data.unique_sentences()
    paths = {"fp32": args.parent}
    paths.update({p.name: p for p in args.int8})
    paths[f"int8 blockwise {args.block_size}"] = blockwise(args.parent, args.work, args.block_size)
    emb = {k: Embedder.load(p) for k, p in paths.items()}
    ref = emb["fp32"].encode(sentences, show_progress=False)
    index = {s: i for i, s in enumerate(sentences)}
    rows: dict[str, dict] = {}
    for name, e in emb.items():
        row = rows[name] = {"path": str(paths[name])}
        for bs in (32, 1) if name != "fp32" else (32,):
            x = e.encode(sentences, batch_size=bs, show_progress=False)
            cos = (x * ref).sum(axis=1)
            row[f"batch{bs}"] = {
                "spearman": sts_spearman(data, lambda s, x=x: x[[index[t] for t in s]]),
                "mean_cos": float(cos.mean()),
                "min_cos": float(cos.min()),
            }
            print(name, f"batch {bs}:", {k: round(v, 5) for k, v in row[f"batch{bs}"].items()})

    def batch32(embedder: Embedder):
        return lambda texts: embedder.encode(texts, batch_size=32, show_progress=False)

    runs = {k: batch32(e) for k, e in emb.items()}
    speed = compare_throughput(runs, sentences[: args.speed_texts])
    lat = compare_latency(runs, sentences[: args.latency_texts])
    for name in emb:
        tps = args.speed_texts / float(np.median(speed[name].seconds))
        rows[name].update(texts_per_s=tps, batch1_ms=lat[name].median_ms)
        print(f"{name}: {tps:.1f} texts/s at batch 32, batch-1 {lat[name].median_ms:.1f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_id(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
