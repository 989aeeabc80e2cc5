"""Quantized artifacts vs fp32 and PyTorch, side by side in one run (CPU).

    python benchmarks/bench_quantized.py --artifacts artifacts/smollm2-echo \
        artifacts/smollm2-int8-dynamic artifacts/smollm2-int4-hqq \
        [--sts ../shared/data/stsb/test.tsv] [--bnb int8 nf4] [--json out.json]

For each variant: model file size, mean/min cosine to the PyTorch fp32 reference over the STS
sentences, STS Spearman, and throughput at batch 32 (interleaved runs, median) relative to
PyTorch fp32. PyTorch bf16 (autocast on CPU) and the bitsandbytes 8-bit / nf4 variants of the
reference (what a user would otherwise pick) are in the same table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from echoembed.reference import ReferenceEmbedder
from echoembed.runtime import Embedder
from echoembed.validation import compare_throughput, read_sts, sts_spearman


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", nargs="+", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sts", default="../shared/data/stsb/test.tsv")
    ap.add_argument("--limit", type=int, default=None, help="STS pairs (default: all)")
    ap.add_argument("--speed-texts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bnb", nargs="*", default=[], help="bitsandbytes modes: int8 nf4")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()

    import torch

    data = read_sts(args.sts, limit=args.limit)
    sentences = data.unique_sentences()
    ref = ReferenceEmbedder.load(args.model)
    bs = args.batch_size

    def torch_bf16(texts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref.encode(texts, "echo", batch_size=bs)

    variants = {"pytorch-fp32": lambda t: ref.encode(t, "echo", batch_size=bs)}
    variants["pytorch-bf16"] = torch_bf16
    sizes = {"pytorch-fp32": None, "pytorch-bf16": None}
    if args.bnb:
        from echoembed.reference import BnbConfig, BnbEmbedder

    for mode in args.bnb:
        bnb = BnbEmbedder.from_reference(ref, BnbConfig(mode=mode))
        variants[f"pytorch-{bnb.name}"] = lambda t, bnb=bnb: bnb.encode(t, "echo", batch_size=bs)
        sizes[f"pytorch-{bnb.name}"] = None
    for path in args.artifacts:
        emb = Embedder.load(path)
        name = f"onnx-{emb.manifest.precision} ({Path(path).name})"
        variants[name] = lambda t, emb=emb: emb.encode(t, batch_size=bs)
        model = Path(path) / emb.manifest.model_file
        data_file = model.with_name(model.name + ".data")
        sizes[name] = model.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)

    want = variants["pytorch-fp32"](sentences)
    index = {s: i for i, s in enumerate(sentences)}
    rows = {}
    for name, fn in variants.items():
        got = want if name == "pytorch-fp32" else fn(sentences)
        cos = (got * want).sum(axis=1)
        rho = sts_spearman(data, lambda s, got=got: got[[index[x] for x in s]])
        rows[name] = (float(cos.mean()), float(cos.min()), rho)
        print(f"{name}: mean cos {cos.mean():.5f}, min {cos.min():.5f}, STS {rho:.2f}", flush=True)
    speed = compare_throughput(variants, sentences[: args.speed_texts], repeats=args.repeats)
    base = speed["pytorch-fp32"].texts_per_second
    fp32_size = next((v for k, v in sizes.items() if k.startswith("onnx-fp32")), None)
    print(f"\nSTS: {args.sts} ({len(data)} pairs); speed: {args.speed_texts} texts, batch {bs}")
    print(
        "| variant | file MB | size vs fp32 | mean cos | min cos | STS Spearman | texts/s "
        "| vs PyTorch fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for name, (mean, worst, rho) in rows.items():
        size = sizes[name]
        mb = f"{size / 1e6:.1f}" if size else "-"
        rel = f"{size / fp32_size:.2f}x" if size and fp32_size else "-"
        tps = speed[name].texts_per_second
        print(
            f"| {name} | {mb} | {rel} | {mean:.5f} | {worst:.5f} | {rho:.2f} | {tps:.1f} | "
            f"{tps / base:.2f}x |"
        )
        table.append(
            {"variant": name, "file_bytes": size, "mean_cosine": mean, "min_cosine": worst,
             "sts_spearman": rho, "texts_per_s": tps, "vs_pytorch_fp32": tps / base}
        )  # fmt: skip
    if args.json:
        import json

        meta = {"sts": args.sts, "pairs": len(data), "speed_texts": args.speed_texts, "batch": bs}
        Path(args.json).write_text(json.dumps({"run": meta, "rows": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
