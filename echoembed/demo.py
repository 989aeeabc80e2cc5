"""The demo behind `make demo`: echo vs classical embeddings on the default model, then the
same model exported to an ONNX artifact and run by the torch-free runtime.

1. Embeds the shipped sentence pairs (echoembed/data/demo_pairs.tsv: paraphrases and unrelated
   pairs) with the ``echo`` and ``classical`` presets (and STS Spearman with ``--sts``).
2. Exports the model to an artifact (reused when it verifies and matches), embeds the same
   sentences with the runtime, and reports parity and the runtime/reference speed ratio.
3. Quantizes that artifact to INT8 and 4-bit (reused when their parent and settings match) and
   prints their size, accuracy and speed beside fp32, measured side by side in one run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from echoembed.data import DemoPair, load_demo_pairs
from echoembed.echo import Pooling
from echoembed.validation.metrics import paired_cosine
from echoembed.validation.sts import read_sts, sts_spearman

TEMPLATES = ("echo", "classical")


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2"
    pooling: Pooling = Pooling.MEAN
    batch_size: int = 32
    sts: str | os.PathLike[str] | None = None
    sts_limit: int | None = None
    threads: int | None = None
    artifact: str | os.PathLike[str] | None = "artifacts/smollm2-echo"  # None: skip the runtime
    speed_repeats: int = 3
    quantize: tuple[str, ...] = ("int8-dynamic", "int4-hqq")  # recipes next to the artifact
    # a shared-prefix export of the same model (ExportConfig(prefix_reuse=True)) beside the
    # artifact as <artifact>-prefix, and these recipes of it (<artifact>-prefix-<recipe>); None:
    # no prefix artifact
    prefix_quantize: tuple[str, ...] | None = ("int8-dynamic",)
    calibration: str | os.PathLike[str] | None = None  # None: texts shipped with echoembed


@dataclass
class VariantCheck:
    """One artifact (fp32 or quantized) against the PyTorch fp32 reference on the demo texts."""

    name: str
    path: str
    reused: bool
    file_mb: float
    mean_cosine: float
    min_cosine: float
    texts_per_s: float


@dataclass
class RuntimeCheck:
    artifact: str
    reused: bool
    max_abs_diff: float
    min_cosine: float
    batch_size: int
    texts: int
    reference_texts_per_s: float
    runtime_texts_per_s: float
    variants: list[VariantCheck] = field(default_factory=list)

    @property
    def speed_ratio(self) -> float:
        return self.runtime_texts_per_s / self.reference_texts_per_s


@dataclass
class TemplateScores:
    cosines: np.ndarray  # one per demo pair
    paraphrase_mean: float
    unrelated_mean: float
    ranking_accuracy: float  # share of (paraphrase, unrelated) combinations ordered correctly
    sts_spearman: float | None = None


@dataclass
class DemoResult:
    model: str
    pairs: list[DemoPair]
    scores: dict[str, TemplateScores] = field(default_factory=dict)
    sts_path: str | None = None
    sts_pairs: int = 0
    runtime: RuntimeCheck | None = None


def score_pairs(pairs: list[DemoPair], embed: Callable[[list[str]], np.ndarray]) -> TemplateScores:
    """Cosine per pair and how well paraphrases rank above unrelated pairs."""
    sentences = list(dict.fromkeys([p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]))
    index = {s: i for i, s in enumerate(sentences)}
    emb = embed(sentences)
    cos = paired_cosine(
        emb[[index[p.sentence1] for p in pairs]], emb[[index[p.sentence2] for p in pairs]]
    )
    para = cos[[p.label == "paraphrase" for p in pairs]]
    unrel = cos[[p.label == "unrelated" for p in pairs]]
    ranking = float((para[:, None] > unrel[None, :]).mean())
    return TemplateScores(cos, float(para.mean()), float(unrel.mean()), ranking)


def run_demo(config: DemoConfig, progress: Callable[[str], None] = lambda s: None) -> DemoResult:
    """Load the reference model and score echo vs classical on the demo pairs (and STS)."""
    from echoembed.reference import ReferenceEmbedder

    progress(f"loading {config.model} (PyTorch fp32 reference)...")
    ref = ReferenceEmbedder.load(config.model, threads=config.threads)
    pairs = load_demo_pairs()
    result = DemoResult(model=config.model, pairs=pairs)
    sts = read_sts(config.sts, limit=config.sts_limit) if config.sts else None
    for name in TEMPLATES:

        def embed(texts: list[str], name: str = name) -> np.ndarray:
            return ref.encode(texts, name, pooling=config.pooling, batch_size=config.batch_size)

        progress(f"embedding demo pairs with the {name!r} template...")
        scores = score_pairs(pairs, embed)
        if sts is not None:
            progress(f"STS with {name!r}: {len(sts)} pairs...")
            scores.sts_spearman = sts_spearman(sts, embed)
        result.scores[name] = scores
    if sts is not None:
        result.sts_path, result.sts_pairs = str(config.sts), len(sts)
    if config.artifact is not None:
        result.runtime = check_runtime(ref, pairs, config, progress)
    return result


def _file_mb(path) -> float:
    from pathlib import Path

    model = Path(path) / "model.onnx"
    data = model.with_name("model.onnx.data")
    return (model.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def check_runtime(ref, pairs: list[DemoPair], config: DemoConfig, progress) -> RuntimeCheck:
    """Export (or reuse) the artifact and its quantized variants, then compare each with the
    reference: cosine on the demo texts and throughput, side by side in one run."""
    from echoembed.calibration import CalibrationConfig, QuantizeOptions, recipe_from_name
    from echoembed.calibration.quantize import quantize_or_reuse
    from echoembed.exporter import ExportConfig, export_or_reuse
    from echoembed.runtime import Embedder
    from echoembed.validation.timing import compare_throughput

    export_config = ExportConfig(template="echo", pooling=config.pooling, threads=config.threads)
    artifact, reused = export_or_reuse(ref.loaded, config.artifact, export_config, progress)
    built = [("onnx fp32", artifact, reused)]
    options = QuantizeOptions(calibration=CalibrationConfig(path=config.calibration))
    for recipe in config.quantize:
        target = artifact.path.with_name(f"{artifact.path.name}-{recipe}")
        progress(f"quantizing to {recipe} ({target}) ...")
        q, q_reused = quantize_or_reuse(
            artifact.path, target, recipe_from_name(recipe), options, progress
        )
        built.append((f"onnx {recipe}", q, q_reused))
    if config.prefix_quantize is not None:
        target = artifact.path.with_name(f"{artifact.path.name}-prefix")
        prefix_config = dataclasses.replace(export_config, prefix_reuse=True)
        progress(f"exporting with the shared prefix baked in ({target}) ...")
        pa, p_reused = export_or_reuse(ref.loaded, target, prefix_config, progress)
        built.append(("onnx fp32 prefix", pa, p_reused))
        for recipe in config.prefix_quantize:
            qt = pa.path.with_name(f"{pa.path.name}-{recipe}")
            progress(f"quantizing to {recipe} ({qt}) ...")
            q, q_reused = quantize_or_reuse(pa.path, qt, recipe_from_name(recipe), options,
                                            progress)  # fmt: skip
            built.append((f"onnx {recipe} prefix", q, q_reused))
    texts = list(dict.fromkeys([p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]))
    bs = config.batch_size
    want = ref.encode(texts, "echo", pooling=config.pooling, batch_size=bs)
    runners = {name: Embedder.load(a.path, threads=config.threads) for name, a, _ in built}
    runs: dict[str, Callable] = {
        "reference": lambda t: ref.encode(t, "echo", pooling=config.pooling, batch_size=bs)
    }
    for name, emb in runners.items():
        runs[name] = lambda t, emb=emb: emb.encode(t, batch_size=bs)
    progress(f"timing {len(runs)} variants on {len(texts)} texts, batch {bs} ...")
    speed = compare_throughput(runs, texts, repeats=config.speed_repeats)
    variants, embedded = [], {}
    for name, a, was_reused in built:
        got = embedded[name] = runners[name].encode(texts, batch_size=bs)
        cos = (got * want).sum(axis=1)
        variants.append(
            VariantCheck(
                name, str(a.path), was_reused, _file_mb(a.path), float(cos.mean()),
                float(cos.min()), speed[name].texts_per_second,
            )  # fmt: skip
        )
    got = embedded["onnx fp32"]
    return RuntimeCheck(
        artifact=str(artifact.path),
        reused=reused,
        max_abs_diff=float(np.abs(got - want).max()),
        min_cosine=float((got * want).sum(axis=1).min()),
        batch_size=bs,
        texts=len(texts),
        reference_texts_per_s=speed["reference"].texts_per_second,
        runtime_texts_per_s=speed["onnx fp32"].texts_per_second,
        variants=variants,
    )


_WIDTH = 78


def _row(label: str, values: list[str]) -> str:
    return f"{label:<{_WIDTH}} " + " ".join(f"{v:>9}" for v in values)


def _format_pairs(result: DemoResult) -> list[str]:
    """Cosine per pair under each template, then the per-template summary rows."""
    names = list(result.scores)
    lines = [f"echo vs classical embeddings, model {result.model}, mean pooling", ""]
    lines.append(_row("pair", names))
    for i, p in enumerate(result.pairs):
        pair = f"[{p.label[:4]}] {p.sentence1} | {p.sentence2}"
        if len(pair) > _WIDTH:
            pair = pair[: _WIDTH - 3] + "..."
        lines.append(_row(pair, [f"{result.scores[n].cosines[i]:.3f}" for n in names]))
    lines.append("")
    s = [result.scores[n] for n in names]
    lines.append(_row("mean cosine, paraphrases", [f"{x.paraphrase_mean:.3f}" for x in s]))
    lines.append(_row("mean cosine, unrelated", [f"{x.unrelated_mean:.3f}" for x in s]))
    gaps = [f"{x.paraphrase_mean - x.unrelated_mean:.3f}" for x in s]
    lines.append(_row("gap (paraphrase - unrelated)", gaps))
    ranked = [f"{100 * x.ranking_accuracy:.1f}%" for x in s]
    lines.append(_row("paraphrase ranked above unrelated", ranked))
    if result.sts_path:
        label = f"STS Spearman x100 ({os.path.basename(result.sts_path)}, {result.sts_pairs} pairs)"
        lines.append(_row(label, [f"{x.sts_spearman:.2f}" for x in s]))
    return lines


def _format_runtime(rt: RuntimeCheck) -> list[str]:
    """The artifact's parity and speed, then each quantized variant beside fp32."""
    how = "reused" if rt.reused else "exported"
    lines = [
        "",
        f"ONNX artifact ({how}): {rt.artifact}",
        f"  runtime (onnxruntime fp32) vs reference (PyTorch fp32), echo template, "
        f"{rt.texts} texts:",
        f"  parity: max abs diff {rt.max_abs_diff:.2e}, min cosine {rt.min_cosine:.7f}",
        f"  speed at batch {rt.batch_size}: reference {rt.reference_texts_per_s:.1f} texts/s, "
        f"runtime {rt.runtime_texts_per_s:.1f} texts/s, ratio {rt.speed_ratio:.2f}x "
        "(median of interleaved runs, one process)",
    ]
    if len(rt.variants) <= 1:
        return lines
    fp32_mb = rt.variants[0].file_mb
    lines += [
        "",
        "  artifacts vs the PyTorch fp32 reference (same texts, same run):",
        f"  {'variant':<25} {'file MB':>8} {'size':>6} {'mean cos':>9} {'min cos':>9} "
        f"{'texts/s':>8} {'vs PyTorch':>10}",
    ]
    for v in rt.variants:
        lines.append(
            f"  {v.name:<25} {v.file_mb:8.1f} {v.file_mb / fp32_mb:5.2f}x "
            f"{v.mean_cosine:9.5f} {v.min_cosine:9.5f} {v.texts_per_s:8.1f} "
            f"{v.texts_per_s / rt.reference_texts_per_s:9.2f}x"
            + ("  (reused)" if v.reused else "")
        )
    return lines


def format_demo(result: DemoResult) -> str:
    """A plain-text report of a demo run."""
    lines = _format_pairs(result)
    if result.runtime is not None:
        lines += _format_runtime(result.runtime)
    return "\n".join(lines)
