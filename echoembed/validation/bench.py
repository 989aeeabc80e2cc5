"""``echoembed bench``: every variant on identical inputs in one run, side by side.

Variants: the PyTorch fp32 reference (the baseline of every ratio), PyTorch bf16 autocast,
bitsandbytes 8-bit and nf4, the echoembed artifacts given (ONNX fp32 / INT8 / 4-bit; fp16 where
a GPU provider is present), and the optimum-onnx peer (``ORTModelForFeatureExtraction`` + echo
pooling in numpy, in its own environment from ``make bench-peers``). For each: mean/min cosine
to the reference and STS Spearman on the same sentences, model size, and throughput at one batch
size, timed round-robin in one process (the peer in its worker, driven between the others) so
load on a shared machine hits every variant alike. Writes bench.json, bench.md and bench.png
(STS Spearman against throughput) to a timestamped run directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from echoembed.artifact.writer import atomic_write
from echoembed.errors import InputError, MissingDependencyError
from echoembed.validation.report import MachineInfo, describe_machine, machine_info
from echoembed.validation.roofline import Peaks, measure_peaks
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import Latency, compare_latency, compare_throughput
from echoembed.validation.validate import new_run_dir

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

DEMO_ARTIFACTS = (
    Path("artifacts/smollm2-echo"),
    Path("artifacts/smollm2-echo-int8-dynamic"),
    Path("artifacts/smollm2-echo-int4-hqq"),
    Path("artifacts/smollm2-echo-prefix"),
    Path("artifacts/smollm2-echo-prefix-int8-dynamic"),
)
BENCH_SCHEMA = 1


@dataclass(frozen=True)
class BenchConfig:
    artifacts: tuple[Path, ...] = DEMO_ARTIFACTS
    model: str = "smollm2"
    sts: Path = Path("../shared/data/stsb/test.tsv")
    limit: int | None = None  # first N STS pairs
    bf16: bool = True
    bnb: tuple[str, ...] = ("int8", "nf4")
    peer: str = "auto"  # auto: when .venv-peers exists; on: required; off
    peer_dir: Path = Path("runs/peers")  # the peer's HF directory and optimum export cache
    # texts timed per repeat: 256 length-sorted texts make batches of 32 with 7.4% padding on
    # STS-B test (the first 128 made 10.4%: too few texts to sort into even batches)
    speed_texts: int = 256
    batch_size: int = 32
    max_batch_tokens: int | None = None  # ONNX artifacts: also cap each batch's padded tokens
    repeats: int = 3
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    runs_dir: Path = Path("runs")
    plot: bool = True
    peaks: bool = True  # measure the matmul peaks for the ONNX rows' roofline figures
    # batch-1 latency: the median over this many texts, each embedded alone (0: skip); 16 texts
    # moved the INT8 artifacts' ratio by +-0.02x between runs, 96 less
    latency_texts: int = 64


@dataclass(frozen=True)
class BenchRow:
    variant: str
    kind: str  # pytorch | bitsandbytes | onnx | peer
    precision: str
    file_bytes: int | None
    mean_cosine: float
    min_cosine: float
    sts_spearman: float
    texts_per_s: float
    vs_reference: float  # throughput ratio to PyTorch fp32
    size_vs_fp32: float | None = None  # ONNX file size relative to the fp32 artifact
    # ONNX artifacts: weight-GEMM GFLOP per text as executed (padding included), the rate that
    # makes at the measured throughput, and its fraction of this CPU's probe peak for the
    # kernel kind (fp32 or u8 x s8); see validation.roofline
    gflop_per_text: float | None = None
    achieved_gops: float | None = None
    peak_fraction: float | None = None
    latency_ms: float | None = None  # batch 1: median ms per text, each embedded alone
    latency_vs_reference: float | None = None  # to PyTorch fp32's (lower is faster)


@dataclass(frozen=True)
class Target:
    """One of the throughput issue's targets, checked on a bench run."""

    name: str
    goal: str  # e.g. ">= 1.30x"
    measured: float | None  # None: a row it needs is missing
    met: bool
    row: str  # the variant(s) measured


@dataclass(frozen=True)
class BenchReport:
    created: str
    machine: MachineInfo
    sts: str
    pairs: int
    sentences: int
    speed_texts: int
    batch_size: int
    repeats: int
    rows: tuple[BenchRow, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why
    schema: int = BENCH_SCHEMA
    max_batch_tokens: int | None = None
    padding_fraction: float | None = None  # of the artifacts' batches on the throughput texts
    peaks: dict[str, float] | None = None  # probe peaks, G(FL)OP/s: fp32, u8s8 (and u8u8)
    latency_texts: int = 0
    targets: tuple[Target, ...] = ()

    def to_json(self) -> str:
        import json

        data = dataclasses.asdict(self)
        data["machine"] = self.machine.to_dict()
        return json.dumps(data, indent=1) + "\n"


@dataclass(frozen=True)
class BenchResult:
    report: BenchReport
    run_dir: Path | None


@dataclass
class _Variant:
    name: str
    kind: str
    precision: str
    embed: Callable[[Sequence[str]], np.ndarray]
    time: Callable[[Sequence[str]], object]
    file_bytes: int | None = None
    flops_per_token: float | None = None  # ONNX artifacts: weight-GEMM FLOPs per token
    kernel: str = "fp32"  # the kernels those GEMMs run: fp32, u8s8 or u8u8 (roofline peaks)
    prefix_tokens: int = 0  # shared-prefix artifacts: leading tokens per row never computed


def _model_bytes(root: Path, model_file: str) -> int:
    model = root / model_file
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _reference_variants(config: BenchConfig, skipped: dict[str, str], say: Progress):
    import torch

    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(config.model, threads=config.threads)
    bs = config.batch_size

    def fp32(texts):
        return ref.encode(texts, "echo", batch_size=bs)

    out = [_Variant("pytorch fp32", "pytorch", "fp32", fp32, fp32)]
    if config.bf16:

        def bf16(texts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ref.encode(texts, "echo", batch_size=bs)

        out.append(_Variant("pytorch bf16", "pytorch", "bf16", bf16, bf16))
    for mode in config.bnb:
        try:
            from echoembed.reference import BnbConfig, BnbEmbedder

            say(f"bitsandbytes {mode}")
            b = BnbEmbedder.from_reference(ref, BnbConfig(mode=mode))
        except MissingDependencyError as e:
            skipped[f"bitsandbytes {mode}"] = str(e)
            continue

        def run(texts, b=b):
            return b.encode(texts, "echo", batch_size=bs)

        out.append(_Variant(f"bitsandbytes {mode}", "bitsandbytes", mode, run, run))
    return ref, out


def _artifact_variants(config: BenchConfig) -> list[_Variant]:
    from echoembed.runtime import Embedder
    from echoembed.runtime.cpu import runs_u8s8
    from echoembed.validation.roofline import graph_flops

    out = []
    seen: set[str] = set()
    for path in config.artifacts:
        emb = Embedder.load(path, providers=config.providers, threads=config.threads)
        fusion = emb.manifest.fusion
        fused = "" if fusion is None else (" fused" if fusion.applied else " unfused")
        if fusion is not None and fusion.applied and "Attention" in fusion.ops:
            fused += "+onnx-attn"  # GroupQueryAttention rewritten as ONNX Attention (opset 23)
        prefix = " prefix" if emb.manifest.prefix is not None else ""
        name = f"echoembed {emb.manifest.precision}{fused}{prefix}"
        if name in seen:
            name = f"{name} ({Path(path).name})"
        seen.add(name)

        def run(texts, emb=emb):
            return emb.encode(
                texts, batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens
            )

        flops = graph_flops(Path(path) / emb.manifest.model_file)
        q = emb.manifest.quantization
        out.append(
            _Variant(
                name,
                "onnx",
                emb.manifest.precision,
                run,
                run,
                _model_bytes(Path(path), emb.manifest.model_file),
                flops.per_token,
                "u8s8"
                if flops.kernel == "fp32" and q is not None and runs_u8s8(q.settings)
                else flops.kernel,
                len(emb.manifest.prefix_ids),
            )  # fmt: skip
        )
    return out


def _peer_variant(config: BenchConfig, ref, skipped: dict[str, str], say: Progress, stack):
    from echoembed.validation.peers import OptimumPeer, prepare_optimum_peer

    if config.peer == "off":
        return None
    try:
        cfg = prepare_optimum_peer(ref, "echo", config.peer_dir, threads=config.threads)
        say("starting the optimum-onnx peer (exports once into runs/peers, then reuses it)")
        peer = stack.enter_context(OptimumPeer.start(cfg))
    except MissingDependencyError as e:
        if config.peer == "on":
            raise
        skipped["optimum-onnx"] = str(e)
        return None
    bs = config.batch_size
    size = sum(p.stat().st_size for p in Path(cfg.onnx_dir).glob("*.onnx*") if p.is_file())
    return _Variant(
        "optimum-onnx fp32",
        "peer",
        "fp32",
        lambda texts: peer.embed(texts, batch_size=bs),
        lambda texts: peer.timed(texts, batch_size=bs),
        size or None,
    )


def _embed_and_time(config: BenchConfig, sentences: list[str], skipped: dict[str, str], say):
    """Load every variant, embed ``sentences`` with each, then time them round-robin."""
    import contextlib

    with contextlib.ExitStack() as stack:
        say(f"loading the PyTorch reference {config.model}")
        ref, variants = _reference_variants(config, skipped, say)
        variants += _artifact_variants(config)
        peer = _peer_variant(config, ref, skipped, say, stack)
        if peer is not None:
            variants.append(peer)
        embedded: dict[str, np.ndarray] = {}
        for v in variants:
            say(f"accuracy: {v.name} on {len(sentences)} sentences")
            embedded[v.name] = v.embed(sentences)
        say(
            f"throughput: {config.speed_texts} texts, batch {config.batch_size}, "
            f"{config.repeats} interleaved repeats"
        )
        speed = compare_throughput(
            {v.name: v.time for v in variants},
            sentences[: config.speed_texts],
            repeats=config.repeats,
        )
        latency = {}
        if config.latency_texts > 0:
            n = config.latency_texts
            say(f"batch-1 latency: {n} texts, each alone, the variants taking turns per 8 texts")
            latency = compare_latency(
                {v.name: v.time for v in variants}, sentences[: config.latency_texts]
            )
    return variants, embedded, speed, latency


def _roofline(v: _Variant, tps: float, tokens_per_text: float | None, peaks: Peaks | None):
    """(GFLOP per text, achieved G(FL)OP/s, fraction of the peak) of an ONNX variant."""
    if v.flops_per_token is None or tokens_per_text is None:
        return None, None, None
    gflop = v.flops_per_token * (tokens_per_text - v.prefix_tokens) / 1e9
    rate = gflop * tps
    peak = None if peaks is None else peaks.for_kernel(v.kernel)
    return gflop, rate, (rate / peak if peak else None)


def _rows(
    variants: list[_Variant],
    embedded: dict[str, np.ndarray],
    speed,
    data,
    sentences: list[str],
    tokens_per_text: float | None = None,
    peaks: Peaks | None = None,
    latency: dict[str, Latency] | None = None,
) -> list[BenchRow]:
    """One row per variant: cosine to PyTorch fp32, STS Spearman, throughput and size ratios
    (``sentences``: ``data``'s unique sentences, the rows of ``embedded``); ONNX rows also the
    roofline figures (``tokens_per_text``: executed, padding included, on the throughput texts)."""
    index = {s: i for i, s in enumerate(sentences)}
    want = embedded["pytorch fp32"]
    base = speed["pytorch fp32"].texts_per_second
    latency = latency or {}
    base_ms = latency["pytorch fp32"].median_ms if "pytorch fp32" in latency else None
    fp32_bytes = next(
        (v.file_bytes for v in variants if v.kind == "onnx" and v.precision == "fp32"), None
    )
    rows = []
    for v in variants:
        got = embedded[v.name]
        cos = (got * want).sum(axis=1) / np.maximum(
            np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12
        )
        rho = sts_spearman(data, lambda s, got=got: got[[index[x] for x in s]])
        tps = speed[v.name].texts_per_second
        ms = latency[v.name].median_ms if v.name in latency else None
        rows.append(
            BenchRow(
                v.name,
                v.kind,
                v.precision,
                v.file_bytes,
                float(cos.mean()),
                float(cos.min()),
                rho,
                tps,
                tps / base,
                None if (v.file_bytes is None or not fp32_bytes) else v.file_bytes / fp32_bytes,
                *_roofline(v, tps, tokens_per_text, peaks),
                ms,
                None if ms is None or not base_ms else ms / base_ms,
            )  # fmt: skip
        )
    return rows


def artifact_batches(config: BenchConfig, texts: list[str]) -> tuple[float, float] | None:
    """(padding share, executed tokens per text) of the artifacts' batches (first artifact's
    tokenizer and default template) on ``texts``, with the bench's ``batch_size`` and
    ``max_batch_tokens``."""
    from echoembed.echo import padding_fraction, plan_batches
    from echoembed.runtime import Embedder

    if not config.artifacts or not texts:
        return None
    enc = Embedder.load(config.artifacts[0], session=False).encoder()
    lengths = [len(r.ids) for r in enc.encode_ids(texts)]
    batches = plan_batches(lengths, config.batch_size, config.max_batch_tokens)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return padding_fraction(lengths, batches), padded / len(texts)


def run_bench(config: BenchConfig | None = None, progress: Progress | None = None) -> BenchResult:
    """Run every variant on the same STS sentences; see the module docstring."""
    config = config or BenchConfig()
    say = progress or (lambda _m: None)
    if config.peer not in ("auto", "on", "off"):
        raise InputError(f"peer must be auto, on or off, got {config.peer!r}")
    missing = [str(p) for p in config.artifacts if not Path(p).is_dir()]
    if missing:
        raise InputError(
            f"artifact directories not found: {', '.join(missing)}; run `make demo` (it writes "
            "artifacts/smollm2-echo, -int8-dynamic, -int4-hqq, -prefix and "
            "-prefix-int8-dynamic) or pass --artifacts"
        )
    data = read_sts(config.sts, limit=config.limit)
    sentences = data.unique_sentences()
    skipped: dict[str, str] = {}
    variants, embedded, speed, latency = _embed_and_time(config, sentences, skipped, say)
    batches = artifact_batches(config, sentences[: config.speed_texts])
    peaks = None
    if config.peaks and config.artifacts:
        say("measuring this CPU's matmul peaks (fp32, u8 x s8, u8 x u8) with ONNX Runtime")
        peaks = measure_peaks(config.threads)
    report = BenchReport(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
        sts=str(config.sts),
        pairs=len(data),
        sentences=len(sentences),
        speed_texts=min(config.speed_texts, len(sentences)),
        batch_size=config.batch_size,
        repeats=config.repeats,
        rows=tuple(
            _rows(
                variants,
                embedded,
                speed,
                data,
                sentences,
                None if batches is None else batches[1],
                peaks,
                latency,
            )  # fmt: skip
        ),
        skipped=skipped,
        max_batch_tokens=config.max_batch_tokens,
        padding_fraction=None if batches is None else batches[0],
        peaks=None
        if peaks is None
        else {"fp32": peaks.fp32_gflops, "u8s8": peaks.u8s8_gops, "u8u8": peaks.u8u8_gops},
        latency_texts=config.latency_texts if latency else 0,
    )
    report = dataclasses.replace(report, targets=check_targets(report))
    run_dir = new_run_dir(Path(config.runs_dir), "bench", Path(config.model).name)
    atomic_write(run_dir / "bench.json", report.to_json())
    atomic_write(run_dir / "bench.md", format_bench(report) + "\n")
    if config.plot:
        plot_bench(report, run_dir / "bench.png")
    say(f"wrote {run_dir}/bench.json, bench.md" + (", bench.png" if config.plot else ""))
    return BenchResult(report, run_dir)


def _fastest(rows, keep) -> BenchRow | None:
    rows = [r for r in rows if keep(r)]
    return max(rows, key=lambda r: r.texts_per_s) if rows else None


def check_targets(report: BenchReport) -> tuple[Target, ...]:
    """The throughput issue's targets on this run: the fastest fp32 and INT8 ONNX rows against
    PyTorch fp32 and the optimum-onnx peer; the INT8 speed goal is 3.5x on CPUs with VNNI, 2.5x
    on those without (``machine.int8_u8s8_saturates``)."""
    rows = report.rows
    ref = next((r for r in rows if r.variant == "pytorch fp32"), None)
    peer = next((r for r in rows if r.kind == "peer"), None)
    onnx32 = [r for r in rows if r.kind == "onnx" and r.precision == "fp32"]
    fp32 = _fastest(onnx32, lambda r: True)
    int8 = _fastest(rows, lambda r: r.kind == "onnx" and r.precision.startswith("int8"))
    vnni = report.machine.int8_u8s8_saturates is False
    out: list[Target] = []

    def add(name, goal, value, ok, row):
        out.append(Target(name, goal, value, bool(value is not None and ok(value)), row))

    def name(*rs):
        return " / ".join(r.variant for r in rs if r is not None) or "-"

    add("fp32 artifact vs optimum-onnx", ">= 1.30x",
        fp32.texts_per_s / peer.texts_per_s if fp32 and peer else None, lambda x: x >= 1.3,
        name(fp32, peer))  # fmt: skip
    add("fp32 artifact vs PyTorch fp32", ">= 1.60x", fp32.vs_reference if fp32 else None,
        lambda x: x >= 1.6, name(fp32))  # fmt: skip
    goal = 3.5 if vnni else 2.5
    add(f"INT8 artifact vs PyTorch fp32 ({'VNNI' if vnni else 'no VNNI'})", f">= {goal:.2f}x",
        int8.vs_reference if int8 else None, lambda x: x >= goal, name(int8))  # fmt: skip
    base = fp32 or ref
    add("INT8 STS Spearman vs fp32", ">= -1.00 points",
        int8.sts_spearman - base.sts_spearman if int8 and base else None, lambda x: x >= -1.0,
        name(int8, base))  # fmt: skip
    add("INT8 size vs fp32", "<= 0.45x", int8.size_vs_fp32 if int8 else None,
        lambda x: x <= 0.45, name(int8))  # fmt: skip
    add("INT8 batch-1 latency vs PyTorch fp32", "<= 0.25x",
        int8.latency_vs_reference if int8 else None, lambda x: x <= 0.25, name(int8))  # fmt: skip
    add("padding of the artifacts' batches", "< 10%",
        None if report.padding_fraction is None else 100 * report.padding_fraction,
        lambda x: x < 10.0, "echoembed artifacts")  # fmt: skip
    add("fp32 artifacts' min cosine vs PyTorch fp32", ">= 0.99999",
        min(r.min_cosine for r in onnx32) if onnx32 else None, lambda x: x >= 0.99999,
        name(*onnx32))  # fmt: skip
    return tuple(out)


def format_bench(report: BenchReport) -> str:
    lines = [
        describe_machine(report.machine),
        f"STS: {report.sts} ({report.pairs} pairs, {report.sentences} sentences); throughput: "
        f"{report.speed_texts} texts, batch {report.batch_size}, median of {report.repeats} "
        "interleaved repeats",
        "",
        "| variant | size MB | size vs fp32 | mean cos | min cos | STS Spearman | texts/s "
        "| vs PyTorch fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        mb = "-" if r.file_bytes is None else f"{r.file_bytes / 1e6:.1f}"
        rel = "-" if r.size_vs_fp32 is None else f"{r.size_vs_fp32:.2f}x"
        lines.append(
            f"| {r.variant} | {mb} | {rel} | {r.mean_cosine:.5f} | {r.min_cosine:.5f} | "
            f"{r.sts_spearman:.2f} | {r.texts_per_s:.1f} | {r.vs_reference:.2f}x |"
        )
    roof = [r for r in report.rows if r.gflop_per_text is not None]
    if roof and report.peaks:
        lines += [
            "",
            f"roofline (weight GEMMs, padding included): probe peaks on this CPU fp32 "
            f"{report.peaks['fp32']:.0f} GFLOP/s, u8 x s8 {report.peaks['u8s8']:.0f} GOP/s"
            + (
                f", u8 x u8 {report.peaks['u8u8']:.0f} GOP/s"
                if report.peaks.get("u8u8") is not None
                else ""
            ),
            "",
            "| variant | GFLOP/text | achieved G(FL)OP/s | of peak |",
            "|---|---|---|---|",
        ]
        for r in roof:
            frac = "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%"
            lines.append(
                f"| {r.variant} | {r.gflop_per_text:.2f} | {r.achieved_gops:.0f} | {frac} |"
            )
        over = [r.variant for r in roof if r.peak_fraction is not None and r.peak_fraction > 1.0]
        if over:
            lines.append(
                f"\nwarning: {', '.join(over)} ran above the probe's peak: the probe was slowed "
                "by other load on this machine, so these fractions are not meaningful; rerun "
                "the bench on a quieter machine"
            )
    if report.padding_fraction is not None:
        cap = report.max_batch_tokens
        budget = "" if cap is None else f", at most {cap} padded tokens each"
        lines.append(
            f"\npadding: {100 * report.padding_fraction:.1f}% of the echoembed artifacts' batch "
            f"tokens (length-sorted batches of {report.batch_size}{budget})"
        )
    timed = [r for r in report.rows if r.latency_ms is not None]
    if timed:
        lines += [
            "",
            f"batch-1 latency: median over {report.latency_texts} texts, each embedded alone",
            "",
            "| variant | ms per text | vs PyTorch fp32 |",
            "|---|---|---|",
        ]
        for r in timed:
            rel = "-" if r.latency_vs_reference is None else f"{r.latency_vs_reference:.2f}x"
            lines.append(f"| {r.variant} | {r.latency_ms:.1f} | {rel} |")
    if report.targets:
        lines += ["", "targets (issue 14)", "", "| target | goal | measured | met | rows |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for t in report.targets:
            value = "-" if t.measured is None else f"{t.measured:.5g}"
            met = "yes" if t.met else ("no row" if t.measured is None else "NO")
            lines.append(f"| {t.name} | {t.goal} | {value} | {met} | {t.row} |")
    for name, why in report.skipped.items():
        lines.append(f"\nskipped {name}: {why}")
    return "\n".join(lines)


def plot_bench(report: BenchReport, path: Path) -> Path:
    """STS Spearman against throughput, one labelled point per variant (PNG, atomic)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError(
            "the bench plot needs matplotlib: pip install 'echoembed[bench]' (or pass --no-plot)"
        ) from e
    colors = {"pytorch": "tab:blue", "bitsandbytes": "tab:purple", "onnx": "tab:green",
              "peer": "tab:orange"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 5.5))
    xs = [r.texts_per_s for r in report.rows]
    ys = [r.sts_spearman for r in report.rows]
    dx = (max(xs) - min(xs)) or 1.0
    dy = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    # numbered points, names in the legend: clustered variants (the fp32 ones) stay readable
    for i, r in enumerate(report.rows, start=1):
        ax.scatter(
            r.texts_per_s, r.sts_spearman, color=colors.get(r.kind, "k"), s=40,
            label=f"{i}  {r.variant}: {r.sts_spearman:.2f}, {r.texts_per_s:.1f}/s",
        )  # fmt: skip
        near = sum(
            abs(r.texts_per_s - x) < 0.05 * dx and abs(r.sts_spearman - y) < 0.04 * dy
            for x, y in placed
        )
        placed.append((r.texts_per_s, r.sts_spearman))
        ax.annotate(str(i), (r.texts_per_s, r.sts_spearman), textcoords="offset points",
                    xytext=(5 + 9 * near, 3), fontsize=8)  # fmt: skip
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(f"throughput, texts/s (batch {report.batch_size})")
    ax.set_ylabel("STS-B Spearman x100 (echo, mean pooling)")
    m = report.machine
    vnni = {True: " (no VNNI)", False: " (VNNI)"}.get(m.int8_u8s8_saturates, "")
    ax.set_title(
        f"echo embeddings, accuracy vs throughput\n{m.cpu_model or m.processor}{vnni}, "
        f"{m.cpu_count} cores, {report.sentences} sentences",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(path, png.getvalue())
