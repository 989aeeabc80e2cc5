"""INT8 activation scales per tensor, per token and per block: accuracy at batch 32 and alone.

    python benchmarks/int8_granularity.py artifacts/smollm2-echo-prefix [--reduce-range] \\
        [--out runs/int8-granularity.json]

ONNX Runtime's dynamic INT8 (``DynamicQuantizeLinear`` -> ``MatMulInteger``) quantizes each
activation tensor with one scale, the max |x| of the whole batch, so a text's embedding depends
on the texts (and the padding) it is batched with. This script quantizes the fp32 artifact with
(under ``--work``, made once and reused):

- ``int8-dynamic`` with ``activation_scale="tensor"`` (that one scale per tensor);
- ``int8-dynamic`` with ``activation_scale="token"`` (the default: a symmetric scale per token,
  ``echoembed.calibration.per_token``; the same u8 x s8 kernels), with its default
  ``fold_row_scales`` and, 8-bit, without (``unfolded``);
- ``int8-blockwise`` (8-bit MatMulNBits, ``accuracy_level=4``: int8 activations per block of K
  in each row; ``--block-size``);

both dynamic ones with 7-bit weights too with ``--reduce-range`` (what a CPU without VNNI gets:
those integer GEMMs are exact there, so their accuracy here is theirs there). Then it

1. embeds all STS-B test sentences with each INT8 artifact at batch 32 and at batch 1 (each text
   alone) and prints Spearman and cosine to the fp32 parent for both;
2. times all of them and the fp32 parent at batch 32 (round-robin, median of 3) and at batch 1
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


def variants(parent: Path, work: Path, block_size: int, reduce_range: bool) -> dict[str, Path]:
    """name -> INT8 artifact of the fp32 artifact at ``parent`` (each made once, then reused)."""
    from echoembed.calibration import Int8BlockwiseConfig, Int8DynamicConfig
    from echoembed.calibration.quantize import quantize_or_reuse

    configs = {
        f"int8 blockwise {block_size}": Int8BlockwiseConfig(block_size=block_size),
    }
    for bits in (8, 7) if reduce_range else (8,):
        for scale in ("tensor", "token"):
            configs[f"int8 dynamic per {scale}, {bits}-bit"] = Int8DynamicConfig(
                activation_scale=scale, reduce_range=bits == 7
            )
    configs["int8 dynamic per token, 8-bit, unfolded"] = Int8DynamicConfig(
        reduce_range=False, fold_row_scales=False
    )
    out = {}
    for name, cfg in configs.items():
        slug = name.replace("int8 ", "").replace(", ", "-").replace(" ", "-")
        art, _ = quantize_or_reuse(parent, work / f"{parent.name}-{slug}", cfg, progress=print)
        out[name] = art.path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parent", type=Path, help="the fp32 artifact")
    ap.add_argument("--reduce-range", action="store_true", help="7-bit dynamic variants too")
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
    paths.update(variants(args.parent, args.work, args.block_size, args.reduce_range))
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
