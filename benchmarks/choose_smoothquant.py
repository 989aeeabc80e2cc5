"""Choose the SmoothQuant setting for INT8 on STS-B *dev* (never test).

    python benchmarks/choose_smoothquant.py --artifact artifacts/smollm2-echo

For each alpha (and MLP-only smoothing), quantizes the fp32 artifact with 64 calibration texts
from STS-B dev and reports mean/min cosine to the fp32 artifact over all dev sentences and the
dev Spearman, beside the fp32 artifact's own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

from echoembed.calibration import CalibrationConfig, Int8DynamicConfig, QuantizeOptions, quantize
from echoembed.runtime import Embedder
from echoembed.validation import read_sts, sts_spearman


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifact", default="artifacts/smollm2-echo")
    ap.add_argument("--sts", default="../shared/data/stsb/dev.tsv")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    args = ap.parse_args()
    data = read_sts(args.sts)
    sentences = data.unique_sentences()
    index = {s: i for i, s in enumerate(sentences)}
    fp32 = Embedder.load(args.artifact).encode(sentences)
    rho32 = sts_spearman(data, lambda s: fp32[[index[x] for x in s]])
    print(f"fp32 artifact: STS dev Spearman {rho32:.2f} ({len(data)} pairs)")
    print("| smoothing | alpha | mean cos | min cos | STS dev Spearman | vs fp32 |")
    print("|---|---|---|---|---|---|")
    options = QuantizeOptions(calibration=CalibrationConfig(path=args.sts, samples=64), force=True)
    runs = [("MLP only", a) for a in (0.7,)] + [("MLP + norm groups", a) for a in args.alphas]
    runs.append(("none", None))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, alpha in runs:
            out = Path(tmp) / "q"
            cfg = Int8DynamicConfig(smooth_alpha=alpha)
            if kind == "MLP only":
                module = sys.modules["echoembed.calibration.quantize"]
                with mock.patch.object(module, "smooth_norm_inputs", lambda *a: []):
                    quantize(args.artifact, out, cfg, options)
            else:
                quantize(args.artifact, out, cfg, options)
            got = Embedder.load(out).encode(sentences)
            cos = (got * fp32).sum(axis=1)
            rho = sts_spearman(data, lambda s, got=got: got[[index[x] for x in s]])
            print(
                f"| {kind} | {alpha} | {cos.mean():.5f} | {cos.min():.5f} | {rho:.2f} | "
                f"{rho - rho32:+.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
