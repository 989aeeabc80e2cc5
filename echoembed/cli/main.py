"""The `echoembed` command: thin subcommands over the library (heavy imports are lazy)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from echoembed.errors import UserError


def cmd_embed(args: argparse.Namespace) -> int:
    from echoembed.artifact import atomic_save_npy
    from echoembed.textio import read_texts

    if (args.artifact is None) == (args.model is None):
        raise UserError(
            "give either an ARTIFACT directory (runtime) or --model (PyTorch reference)"
        )
    texts = read_texts(args.input)
    if args.artifact is not None:
        from echoembed.runtime import Embedder

        emb = Embedder.load(args.artifact, providers=args.providers, threads=args.threads).encode(
            texts,
            args.template,
            batch_size=args.batch_size,
            normalize=not args.no_normalize,
            show_progress=True,
        )
    else:
        from echoembed.reference import ReferenceEmbedder

        emb = ReferenceEmbedder.load(args.model, threads=args.threads).encode(
            texts,
            args.template or "echo",
            pooling=args.pooling,
            batch_size=args.batch_size,
            max_length=args.max_length,
            normalize=not args.no_normalize,
            show_progress=True,
        )
    out = atomic_save_npy(args.output, emb)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {out}")
    return 0


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from echoembed.corpus import (
        CorpusConfig,
        embed_corpus,
        format_summary,
        format_verify,
        verify_corpus,
    )

    if args.verify is not None:
        if args.paths:
            raise UserError("--verify takes OUT_DIR INPUT and nothing else")
        report = verify_corpus(*args.verify)
        print(format_verify(report))
        return 0 if report.ok else 1
    if len(args.paths) != 3:
        raise UserError("embed-corpus needs ARTIFACT INPUT OUT_DIR (or --verify OUT_DIR INPUT)")
    config = CorpusConfig(
        *args.paths,
        engine=args.engine,
        address=args.address,
        template=args.template,
        id_column=args.id_column,
        text_column=args.text_column,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        rows_per_shard=args.rows_per_shard,
        on_bad_row=args.on_bad_row,
        concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        threads=args.threads,
        providers=tuple(args.providers) if args.providers else None,
        force=args.force,
        progress=not args.no_progress,
    )
    print(format_summary(embed_corpus(config)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from echoembed.artifact import describe
    from echoembed.exporter import ExportConfig, ParityConfig, export

    config = ExportConfig(
        template=args.template,
        pooling=args.pooling,
        normalize=not args.no_normalize,
        dtype=args.dtype,
        opset=args.opset,
        exporter=args.exporter,
        max_length=args.max_length,
        external_data=True if args.external_data else None,
        parity=ParityConfig(tolerance=args.tolerance),
        force=args.force,
        threads=args.threads,
        fuse=not args.no_fuse,
        prefix_reuse=args.prefix_reuse,
        onnx_attention=not args.gqa,
    )
    artifact = export(args.model, args.out, config, progress=_progress)
    print(describe(artifact.manifest))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from echoembed.artifact import describe
    from echoembed.calibration import CalibrationConfig, QuantizeOptions, quantize, recipe_from_name

    if args.algorithm is not None and args.recipe != "int4-qdq":
        raise UserError(f"--algorithm applies to int4-qdq, not {args.recipe} (its name says it)")
    config = recipe_from_name(
        args.recipe,
        exclude=tuple(args.exclude) or None,
        block_size=args.block_size,
        algorithm=args.algorithm,
        accuracy_level=args.accuracy_level,
        quantize_embedding=False if args.float_embedding else None,
        method=args.method,
        percentile=args.percentile,
        smooth_alpha=args.smooth_alpha,
        per_channel=False if args.per_tensor else None,
        activations=args.activations,
        reduce_range=args.reduce_range,
        weights=args.weights,
        activation_scale=args.activation_scale,
        fold_row_scales=args.fold_row_scales,
    )
    if args.no_smooth:
        if not hasattr(config, "smooth_alpha"):
            raise UserError(f"--no-smooth applies to the INT8 recipes, not {args.recipe}")
        config = dataclasses.replace(config, smooth_alpha=None)
    options = QuantizeOptions(
        calibration=CalibrationConfig(path=args.calibration, samples=args.samples, seed=args.seed),
        max_drop=args.max_drop,
        metric=args.metric,
        sts=args.sts,
        sts_limit=args.sts_limit,
        calibration_cache=args.calibration_cache,
        allow_over_budget=args.allow_over_budget,
        force=args.force,
    )
    artifact = quantize(args.artifact, args.out, config, options, progress=_progress)
    print(describe(artifact.manifest))
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from echoembed.engines.builder import BuildConfig, build_engine, parse_profiles

    config = BuildConfig(
        artifact=Path(args.artifact),
        out=Path(args.out),
        profiles=parse_profiles(args.profile),
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        workspace_gb=args.workspace,
        hardware_compat=args.hardware_compat,
        version_compatible=args.version_compatible,
        device=args.device,
        force=args.force,
    )
    art = build_engine(config)
    e = art.manifest.engine
    print(f"wrote engine artifact {art.path} (TensorRT {e.tensorrt_version}, {e.device_name}, "
          f"compute capability {e.compute_capability})")  # fmt: skip
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from echoembed.artifact import describe, read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    print(describe(manifest))
    if not args.no_verify:
        verify_files(Path(args.artifact), manifest)
        print(f"checksums        all {len(manifest.files)} files verified")
    if args.trt:
        from echoembed.engines import PreflightConfig, format_report, preflight

        report = preflight(PreflightConfig(args.artifact, args.trt_version))
        print(format_report(report))
        return 1 if report.failed else 0
    return 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from echoembed.demo import DemoConfig, format_demo, run_demo

    config = DemoConfig(
        model=args.model,
        sts=args.sts,
        sts_limit=args.limit,
        batch_size=args.batch_size,
        threads=args.threads,
        artifact=None if args.no_runtime else args.artifact,
        quantize=tuple(args.quantize),
        prefix_quantize=None if args.no_prefix else ("int8-dynamic",),
        calibration=args.calibration,
    )
    result = run_demo(config, progress=_progress)
    print(format_demo(result))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from echoembed.validation.classification import ClassificationConfig
    from echoembed.validation.report import format_report
    from echoembed.validation.retrieval import RetrievalConfig
    from echoembed.validation.validate import LatencyConfig, ValidateConfig, validate

    config = ValidateConfig(
        reference=args.reference,
        sts=args.sts,
        retrieval=args.retrieval,
        classification=args.classification,
        limit=args.limit,
        distractors=_distractors(args.distractors),
        retrieval_options=RetrievalConfig(seed=args.seed, max_length=args.max_length),
        classification_options=ClassificationConfig(
            classifier=args.classifier, seed=args.seed, train_per_label=args.train_per_label
        ),
        classical=not args.no_classical,
        latency=None if args.no_latency else LatencyConfig(batch_size=args.batch_size),
        max_drop=args.max_drop,
        batch_size=args.batch_size,
        threads=args.threads,
        providers=tuple(args.providers) if args.providers else None,
        runs_dir=Path(args.runs_dir),
        cache_dir=None if args.no_cache else Path(args.runs_dir) / "cache",
    )
    result = validate(args.artifact, config, progress=_progress)
    print(format_report(result.report))
    if result.run_dir is not None:
        print(f"\nreport: {result.run_dir / 'report.json'}")
    budget = result.report.budget
    return 1 if budget is not None and not budget.passed else 0


def _distractors(text: str | None) -> int | str | None:
    """``--distractors``: None (500, or scaled with --limit), 'all', or a count."""
    if text is None or text == "all":
        return text
    return _count(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from echoembed.validation.bench import DEMO_ARTIFACTS, BenchConfig, format_bench, run_bench

    config = BenchConfig(
        artifacts=tuple(Path(a) for a in args.artifacts) if args.artifacts else DEMO_ARTIFACTS,
        model=args.model,
        sts=Path(args.sts),
        limit=args.limit,
        bf16=not args.no_bf16,
        bnb=tuple(args.bnb),
        peer=args.peer,
        speed_texts=args.speed_texts,
        latency_texts=args.latency_texts,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        repeats=args.repeats,
        threads=args.threads,
        providers=tuple(args.providers) if args.providers else None,
        runs_dir=Path(args.runs_dir),
        peer_dir=Path(args.runs_dir) / "peers",
        plot=not args.no_plot,
    )
    result = run_bench(config, progress=_progress)
    print(format_bench(result.report))
    print(f"\nresults: {result.run_dir}")
    return 0


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"expected a whole number or 'all', got {text!r}") from None
    if n < 0:
        raise UserError(f"expected a number >= 0, got {n}")
    return n


def cmd_tokenize(args: argparse.Namespace) -> int:
    from echoembed.deploy.tokenize import tokenize_file

    r = tokenize_file(args.artifact, args.input, args.output, args.template, args.max_length)
    baked = f", without the {r.prefix} baked prefix tokens" if r.prefix else ""
    print(
        f"wrote {r.texts} prompts ({r.template} template, longest {r.width} tokens{baked}, "
        f"{r.truncated} truncated) to {r.path}"
    )
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from echoembed.deploy.triton import TritonRepoConfig, write_triton_repo

    config = TritonRepoConfig(
        artifact=Path(args.artifact),
        out=Path(args.out),
        encoder=args.encoder,
        max_batch=args.max_batch,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        tensorrt_accelerator=args.tensorrt_accelerator,
        force=args.force,
    )
    out = write_triton_repo(config)
    print(f"wrote Triton model repository {out} (echo_embedder: text -> embedding; encoder "
          f"{args.encoder}); serve it with: echoembed serve {out}")  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from echoembed.deploy.serve import ServeConfig, serve

    config = ServeConfig(
        repo=Path(args.repo),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        start_timeout_s=args.timeout,
        log_file=Path(args.log_file) if args.log_file else None,
    )

    def ready(server) -> None:
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics "
              f"{server.metrics_url}  (pid {server.pid}; Ctrl-C stops it)", flush=True)  # fmt: skip

    return serve(config, ready)


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

    p = sub.add_parser(
        "embed",
        help="embed a text file (one text per line) into a .npy file",
        description="With ARTIFACT: the torch-free runtime. With --model: the PyTorch reference.",
    )
    p.add_argument("artifact", nargs="?", help="artifact directory (from `echoembed export`)")
    p.add_argument(
        "--model", help="PyTorch reference instead: smollm2, a HF directory or a .gguf file"
    )
    p.add_argument("-i", "--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("-o", "--output", required=True, help="output .npy path")
    p.add_argument(
        "--template",
        default=None,
        help="preset (echo, classical, query, document) or template string; default: the "
        "artifact's own, or echo for --model",
    )
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="--model only")
    p.add_argument("--max-length", type=int, default=None, help="--model only: tokens per piece")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime execution providers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "embed-corpus",
        help="embed a corpus into Parquet shards (resumable; local or Ray Data engine)",
        description="ARTIFACT INPUT OUT_DIR: embed every row of INPUT (.jsonl, .parquet, .tsv "
        "with a header, .txt one text a line; a file, directory or glob) into OUT_DIR "
        "(shard-XXXXX.parquet: id, embedding; job.json; summary.json). A rerun resumes. "
        "--verify OUT_DIR INPUT checks that every input id appears exactly once.",
    )
    p.add_argument("paths", nargs="*", metavar="ARTIFACT INPUT OUT_DIR")
    p.add_argument(
        "--verify", nargs=2, metavar=("OUT_DIR", "INPUT"), default=None,
        help="check a job's output against its input instead (exit 1 when it fails)",
    )  # fmt: skip
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument(
        "--address", default=None,
        help="ray: an existing cluster (default: $RAY_ADDRESS, else a local 127.0.0.1 cluster)",
    )  # fmt: skip
    p.add_argument("--template", default=None, help="default: the artifact's own")
    p.add_argument("--id-column", default="id")
    p.add_argument("--text-column", default="text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=None)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    p.add_argument("--concurrency", type=int, default=1, help="ray: actors (one model each)")
    p.add_argument("--cpus-per-actor", type=float, default=None)
    p.add_argument("--gpus-per-actor", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per actor")
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime execution providers")
    p.add_argument("--force", action="store_true", help="clear OUT_DIR's old output first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed_corpus)

    p = sub.add_parser("export", help="export a model with the echo pooling head to ONNX")
    p.add_argument("model", help="smollm2, a Hugging Face directory, or a .gguf file")
    p.add_argument("out", help="artifact directory to create")
    p.add_argument("--template", default="echo", help="default template (preset or string)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--no-normalize", action="store_true", help="leave the output unnormalized")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="weights and compute (fp16 keeps softmax and norms in fp32)",
    )
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    p.add_argument("--max-length", type=int, default=None, help="tokens per template piece")
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data")
    p.add_argument("--tolerance", type=float, default=None, help="parity: max abs diff")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep the unfused graph (for TensorRT; by default ONNX Runtime's fused attention, "
        "rotary and RMSNorm kernels go in where they apply)",
    )
    p.add_argument(
        "--gqa",
        action="store_true",
        help="keep ONNX Runtime's GroupQueryAttention in the fused graph (by default it becomes "
        "RotaryEmbedding + the ONNX Attention op, opset 23: faster on ONNX Runtime's CPU)",
    )
    p.add_argument(
        "--prefix-reuse",
        action="store_true",
        help="compute the template's constant leading tokens once and bake them into the graph "
        "(faster; the artifact then serves only templates that start with the same tokens)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize", help="quantize an fp32 artifact (INT8, 4-bit, fp16) into a new one"
    )
    p.add_argument("artifact", help="fp32 artifact directory (from `echoembed export`)")
    p.add_argument("out", help="artifact directory to create")
    p.add_argument(
        "--recipe",
        required=True,
        choices=[
            "int8-dynamic", "int8-static", "int8-blockwise", "int4-rtn", "int4-hqq", "int4-gptq",
            "int4-qdq", "fp16",
        ],
    )  # fmt: skip
    p.add_argument(
        "--calibration",
        default=None,
        help="texts: .txt (one per line), STS .tsv, .tsv with a text column, or .jsonl corpus "
        "(default: a small set shipped with echoembed)",
    )
    p.add_argument("--samples", type=int, default=64, help="calibration texts (as many held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--calibration-cache", default=None, help="int8-static: JSON file caching the ranges"
    )
    budget = p.add_argument_group("accuracy budget")
    budget.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="allowed drop vs fp32: mean cosine (e.g. 0.005) or, with --metric spearman, STS "
        "Spearman points (e.g. 0.5); the most sensitive layers are kept in float until it holds",
    )
    budget.add_argument("--metric", choices=["cosine", "spearman"], default="cosine")
    budget.add_argument(
        "--sts", default=None, help="STS TSV for the Spearman budget (default: --calibration)"
    )
    budget.add_argument("--sts-limit", type=int, default=500, help="STS pairs used (first N)")
    budget.add_argument("--allow-over-budget", action="store_true", help="write it even if over")
    p.add_argument("--exclude", nargs="*", default=[], help="layers to keep in float (globs)")
    p.add_argument(
        "--block-size", type=int, default=None, help="4-bit block size (32); int8-blockwise (128)"
    )
    p.add_argument(
        "--algorithm", choices=["rtn", "gptq"], default=None,
        help="int4-qdq: round to nearest (default) or GPTQ on the same INT4 grid",
    )  # fmt: skip
    p.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits compute (4: int8)")
    p.add_argument(
        "--float-embedding", action="store_true", help="4-bit: keep the embedding table float"
    )
    p.add_argument(
        "--method", choices=["minmax", "percentile", "entropy"], default=None,
        help="int8-static calibrator (minmax)",
    )  # fmt: skip
    p.add_argument("--percentile", type=float, default=None, help="int8-static percentile")
    p.add_argument(
        "--activations", choices=["int8", "uint8"], default=None,
        help="int8-static activations: int8 (TensorRT, default) or uint8 zero point 128 (ORT CPU)",
    )  # fmt: skip
    p.add_argument("--smooth-alpha", type=float, default=None, help="INT8 SmoothQuant alpha")
    p.add_argument("--no-smooth", action="store_true", help="INT8 without SmoothQuant")
    p.add_argument("--per-tensor", action="store_true", help="INT8 weights per tensor")
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="INT8 7-bit weights, exact on CPUs without VNNI (default: decided from this CPU)",
    )
    p.add_argument(
        "--weights", choices=["int8", "uint8"], default=None,
        help="int8-dynamic weights: int8 (u8 x s8 kernels, default) or uint8 with a zero point "
        "(u8 x u8 kernels: never saturate, no 7-bit weights needed)",
    )  # fmt: skip
    p.add_argument(
        "--activation-scale", choices=["token", "tensor"], default=None,
        help="int8-dynamic activations: a scale per token (default; a text embeds the same in "
        "any batch) or one per tensor (ORT's DynamicQuantizeLinear: fastest, batch-dependent)",
    )  # fmt: skip
    p.add_argument(
        "--fold-row-scales", action=argparse.BooleanOptionalAction, default=None,
        help="int8-dynamic per-token scales: the up projection skips its row scale, which the "
        "down projection's scale takes (exact but for rounding, faster; default: on for token)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="show an artifact's manifest and verify its checksums")
    p.add_argument("artifact")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.add_argument(
        "--trt", action="store_true",
        help="TensorRT pre-flight (CPU, no TensorRT): would its ONNX parser accept the graph? "
        "exit 1 when not",
    )  # fmt: skip
    p.add_argument("--trt-version", default=None, help="TensorRT 10.x (default: newest table)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "build-engine", help="build a TensorRT engine artifact from an ONNX artifact (GPU)"
    )
    p.add_argument("artifact", help="an ONNX artifact (export / quantize)")
    p.add_argument("out", help="the engine artifact directory to create")
    p.add_argument(
        "--profile", action="append", default=None, metavar="B_MIN,S_MIN:B_OPT,S_OPT:B_MAX,S_MAX",
        help="an optimization profile over [batch, seq]; repeat for several (default "
        "1,1:32,128:32,512)",
    )  # fmt: skip
    p.add_argument("--timing-cache", default=None, help="read, then update, this timing cache")
    p.add_argument("--workspace", type=float, default=None, help="workspace limit in GB")
    p.add_argument("--hardware-compat", default="none", choices=["none", "ampere+", "same-cc"])
    p.add_argument(
        "--version-compatible", action="store_true",
        help="a plan later TensorRT versions can run (slower)",
    )  # fmt: skip
    p.add_argument("--device", type=int, default=0, help="CUDA device to build on")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("demo", help="echo vs classical on shipped pairs (and STS with --sts)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sts", default=None, help="STS TSV, e.g. ../shared/data/stsb/test.tsv")
    p.add_argument("--limit", type=int, default=None, help="use only the first N STS pairs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--artifact",
        default="artifacts/smollm2-echo",
        help="where to export (or reuse) the artifact",
    )
    p.add_argument("--no-runtime", action="store_true", help="skip the export/runtime part")
    p.add_argument(
        "--quantize",
        nargs="*",
        default=["int8-dynamic", "int4-hqq"],
        help="recipes to quantize the artifact with and compare (none: skip)",
    )
    p.add_argument("--calibration", default=None, help="calibration texts for --quantize")
    p.add_argument(
        "--no-prefix",
        action="store_true",
        help="skip the shared-prefix artifact (<artifact>-prefix and its int8-dynamic)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "validate",
        help="an artifact vs the PyTorch reference on real data: agreement, tasks, latency",
        description="Exit status: 0 ok, 1 over the --max-drop budget, 2 bad input.",
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument(
        "--reference",
        default="auto",
        help="PyTorch reference model (smollm2, HF dir, .gguf); auto: the artifact's own "
        "bundled source; none: skip the reference",
    )
    p.add_argument("--sts", type=Path, default=None, help="STS TSV (../shared/data/stsb/test.tsv)")
    p.add_argument(
        "--retrieval", type=Path, default=None, help="BEIR directory (../shared/data/scifact)"
    )
    p.add_argument(
        "--classification",
        type=Path,
        default=None,
        help="text<TAB>label TSV (../shared/data/banking77/test.tsv)",
    )
    p.add_argument(
        "--limit", type=int, default=None,
        help="quick look: first N STS pairs, first N queries (+ min(500, N) distractors), "
        "~N classification texts",
    )  # fmt: skip
    p.add_argument(
        "--distractors", default=None,
        help="retrieval: documents added to the judged ones (seeded); default 500, or "
        "min(500, N) with --limit N; 'all': the full corpus",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="distractor draw and classifier splits")
    p.add_argument("--max-length", type=int, default=512, help="retrieval: tokens per copy")
    p.add_argument("--classifier", choices=["logreg", "knn"], default="logreg")
    p.add_argument("--train-per-label", type=int, default=20, help="classification")
    p.add_argument("--no-classical", action="store_true", help="skip the classical template")
    p.add_argument("--no-latency", action="store_true", help="skip latency and throughput")
    p.add_argument(
        "--max-drop", type=float, default=None,
        help="fail (exit 1) when any task metric is more than this many points below the "
        "reference",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime execution providers")
    p.add_argument("--runs-dir", default="runs", help="run directories go here (and the cache)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference embeddings")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "bench",
        help="PyTorch, bitsandbytes, echoembed artifacts and the optimum-onnx peer, side by side",
    )
    p.add_argument(
        "--artifacts", nargs="*", default=None,
        help="artifact directories (default: the five `make demo` writes)",
    )  # fmt: skip
    p.add_argument("--model", default="smollm2", help="the PyTorch reference")
    p.add_argument("--sts", default="../shared/data/stsb/test.tsv")
    p.add_argument("--limit", type=int, default=None, help="first N STS pairs (default: all)")
    p.add_argument("--no-bf16", action="store_true", help="skip PyTorch bf16 autocast")
    p.add_argument(
        "--bnb", nargs="*", default=["int8", "nf4"], help="bitsandbytes modes (none: skip)"
    )
    p.add_argument(
        "--peer", choices=["auto", "on", "off"], default="auto",
        help="optimum-onnx peer from `make bench-peers` (auto: when it is installed)",
    )  # fmt: skip
    p.add_argument("--speed-texts", type=int, default=256, help="texts timed per repeat")
    p.add_argument(
        "--latency-texts", type=int, default=64, help="texts timed alone, batch-1 latency (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-batch-tokens", type=int, default=None,
        help="also cap each artifact batch at this many padded tokens (token-budget batching)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--providers", nargs="+", default=None, help="onnxruntime execution providers")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "tokenize",
        help="texts -> the artifact's model inputs (.npz padded, .json per text), no runtime",
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("-i", "--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("-o", "--output", required=True, help="output .npz or .json path")
    p.add_argument("--template", default=None, help="preset or template string (default: own)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per template piece")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "triton", help="write a Triton model repository (tokenizer -> encoder -> ensemble)"
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("out", help="model repository to create")
    p.add_argument(
        "--encoder", choices=["python", "onnxruntime", "tensorrt"], default="python",
        help="python: echoembed.runtime in the Python backend (serves with `echoembed serve`); "
        "onnxruntime / tensorrt: Triton's own backends (a full Triton install)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="rows per dynamic batch")
    p.add_argument("--instances", type=int, default=1, help="instances of each model")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching wait")
    p.add_argument(
        "--tensorrt-accelerator", action="store_true",
        help="--encoder onnxruntime: run it with the TensorRT execution accelerator",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing repository")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("serve", help="run a model repository on the pytriton wheel's tritonserver")
    p.add_argument("repo", help="model repository (from `echoembed triton`)")
    p.add_argument("--http-port", type=int, default=None, help="default: a free port")
    p.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    p.add_argument("--metrics-port", type=int, default=None, help="default: a free port")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    p.add_argument("--log-file", default=None, help="tritonserver log (default: temporary)")
    p.set_defaults(func=cmd_serve)

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
