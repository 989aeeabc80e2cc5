"""The `echoembed` command: thin subcommands over the library (heavy imports are lazy)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from echoembed.errors import UserError


def _add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        default="echo",
        help="preset name (echo, classical, query, document) or a template string",
    )
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-length", type=int, default=None, help="truncate every template piece to N tokens"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def cmd_embed(args: argparse.Namespace) -> int:
    from echoembed.reference import ReferenceEmbedder
    from echoembed.textio import read_texts, save_npy_atomic

    texts = read_texts(args.input)
    ref = ReferenceEmbedder.load(args.model, threads=args.threads)
    emb = ref.encode(
        texts,
        args.template,
        pooling=args.pooling,
        batch_size=args.batch_size,
        max_length=args.max_length,
        normalize=not args.no_normalize,
        show_progress=True,
    )
    out = save_npy_atomic(emb, args.output)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from echoembed.demo import DemoConfig, format_demo, run_demo

    config = DemoConfig(
        model=args.model,
        sts=args.sts,
        sts_limit=args.limit,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    result = run_demo(config, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_demo(result))
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from echoembed.echo import PRESETS

    for p in PRESETS.values():
        print(f"{p.name:<10} {p.description}")
        print(f"{'':<10} {p.source!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echoembed", description="Echo embeddings from causal LMs: reference, export, runtime."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("embed", help="embed a text file (one text per line) into a .npy file")
    p.add_argument(
        "--model", default="smollm2", help="PyTorch reference: smollm2, a HF directory or a .gguf"
    )
    p.add_argument("-i", "--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("-o", "--output", required=True, help="output .npy path")
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    _add_template_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("demo", help="echo vs classical on shipped pairs (and STS with --sts)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sts", default=None, help="STS TSV, e.g. ../shared/data/stsb/test.tsv")
    p.add_argument("--limit", type=int, default=None, help="use only the first N STS pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("templates", help="list the template presets")
    p.set_defaults(func=cmd_templates)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except UserError as e:
        print(f"echoembed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
