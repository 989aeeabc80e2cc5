"""Runtime (ONNX Runtime fp32) vs reference (PyTorch fp32) throughput, side by side in one run.

    python benchmarks/bench_runtime.py [--artifact artifacts/smollm2-echo] [--texts 256]

Uses STS-B test sentences, the echo template and mean pooling. Both backends run the same texts,
interleaved (A B B A ...), after a warm-up; the table prints median texts/s and the ratio.
Exports the artifact first if it is missing (as `make demo` does).
"""

from __future__ import annotations

import argparse
import os
import platform

from echoembed.exporter import ExportConfig, export_or_reuse
from echoembed.reference import ReferenceEmbedder
from echoembed.runtime import Embedder
from echoembed.validation import compare_throughput, read_sts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--artifact", default="artifacts/smollm2-echo")
    ap.add_argument("--sts", default="../shared/data/stsb/test.tsv")
    ap.add_argument("--texts", type=int, default=256, help="sentences for the batch-32 run")
    ap.add_argument("--texts-b1", type=int, default=48, help="sentences for the batch-1 run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    ref = ReferenceEmbedder.load(args.model, threads=args.threads)
    artifact, _ = export_or_reuse(ref.loaded, args.artifact, ExportConfig(), print)
    rt = Embedder.load(artifact.path, threads=args.threads)
    sentences = read_sts(args.sts).unique_sentences()
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch threads {torch.get_num_threads()}; ORT providers {rt.runner.providers}"
    )
    print("| batch | texts | PyTorch fp32 texts/s | ORT fp32 texts/s | ORT / PyTorch |")
    print("|---|---|---|---|---|")
    for bs, n in ((1, args.texts_b1), (32, args.texts)):
        texts = sentences[:n]
        res = compare_throughput(
            {
                "torch": lambda t, bs=bs: ref.encode(t, "echo", batch_size=bs),
                "ort": lambda t, bs=bs: rt.encode(t, batch_size=bs),
            },
            texts,
            repeats=args.repeats,
        )
        a, b = res["torch"].texts_per_second, res["ort"].texts_per_second
        print(f"| {bs} | {len(texts)} | {a:.1f} | {b:.1f} | {b / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
