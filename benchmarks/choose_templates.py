"""Measure candidate echo/classical wordings on STS-B *dev* (never test) with the reference.

    python benchmarks/choose_templates.py --sts ../shared/data/stsb/dev.tsv [--limit N]

Prints a markdown table (Spearman x100, mean pooling); the README records it and
echoembed/echo/presets.py names the winners.
"""

from __future__ import annotations

import argparse
import time

from echoembed.echo import Template
from echoembed.echo.presets import CLASSICAL_CANDIDATES, ECHO_CANDIDATES
from echoembed.reference import ReferenceEmbedder
from echoembed.validation import read_sts, sts_spearman


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sts", default="../shared/data/stsb/dev.tsv")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    data = read_sts(args.sts, limit=args.limit)
    ref = ReferenceEmbedder.load(args.model)
    print(
        f"STS file {args.sts}: {len(data)} pairs, {len(data.unique_sentences())} unique sentences"
    )
    print("| kind | candidate | template | Spearman (dev) | seconds |")
    print("|---|---|---|---|---|")
    for kind, cands in (("echo", ECHO_CANDIDATES), ("classical", CLASSICAL_CANDIDATES)):
        for name, source in cands.items():
            tpl = Template(source, name=name)
            t0 = time.perf_counter()
            rho = sts_spearman(
                data,
                lambda s, tpl=tpl: ref.encode(s, tpl, pooling="mean", batch_size=args.batch_size),
            )
            dt = time.perf_counter() - t0
            shown = source.replace("\n", "\\n").replace("|", "\\|")
            print(f"| {kind} | {name} | `{shown}` | {rho:.2f} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
