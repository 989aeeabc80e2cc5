"""``quantize(artifact, out_dir, config, options) -> Artifact``: one entry point, typed recipes.

One run is one ``QuantizeJob`` that goes through three parts:

- **prepare** (``_open_job``, ``_prepare``): read and verify the fp32 parent; sample calibration
  and held-out texts; smooth the float graph (SmoothQuant for INT8), save it, and measure what the
  recipe needs once (INT8 static: activation ranges, cached; GPTQ: Hessians);
- **search** (``_search``): quantize with the excluded layers kept in float and measure mean/min
  cosine against the parent on held-out texts (and STS Spearman when asked); with ``max_drop``,
  keep the most sensitive layers in float until the budget holds;
- **write** (``_write``): a complete artifact, staged and renamed into place (nothing is left at
  the target when the budget is missed, unless ``allow_over_budget``), whose manifest describes
  the saved graph (opsets, inputs and outputs read from it) and the settings as applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echoembed.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE,
    TOKENIZER_NAME,
    Artifact,
    Manifest,
    QuantizationInfo,
    TensorSpec,
    atomic_write,
    check_target,
    graph_opset_imports,
    hash_files,
    read_manifest,
    staged_dir,
    verify_files,
)
from echoembed.calibration.data import (
    CalibrationSet,
    FixedShapeReader,
    calibration_source,
    load_calibration,
)
from echoembed.calibration.graph import (
    EXTERNAL_DATA_BYTES,
    LinearNode,
    embedding_gathers,
    gemm_to_matmul,
    input_abs_max,
    linear_nodes,
)
from echoembed.calibration.per_token import fold_row_scales, per_token_activations
from echoembed.calibration.recipes import (
    RECIPE_TYPES,
    Fp16Config,
    Int4QdqConfig,
    Int4WeightOnlyConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeOptions,
    RecipeConfig,
    resolve_recipe,
)
from echoembed.calibration.smooth import mlp_pairs, norm_groups, smooth_mlp, smooth_norm_inputs
from echoembed.calibration.static import (
    CacheKey,
    collect_ranges,
    files_sha256,
    insert_qdq,
    read_cache,
    write_cache,
)
from echoembed.echo import EchoEncoder, PromptPlan, embed_texts, template_plans
from echoembed.errors import (
    AccuracyBudgetError,
    ArtifactError,
    InputError,
    InternalError,
    UserError,
    require,
)
from echoembed.runtime import Embedder, OrtRunner
from echoembed.validation.sts import StsData, read_sts, sts_spearman

if TYPE_CHECKING:
    from onnx import ModelProto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    excluded: tuple[str, ...]
    mean_cosine: float
    min_cosine: float
    spearman: float | None = None  # x100 on the budget's STS pairs, when measured


@dataclass
class FloatGraph:
    """The saved float graph every attempt quantizes, and what the recipe measured on it once."""

    path: Path
    linear: dict[str, LinearNode]
    smoothed: tuple[str, ...] = ()  # modules SmoothQuant rewrote
    ranges: dict[str, float] | None = None  # INT8 static: activation thresholds
    gptq: dict[str, tuple] | None = None  # GPTQ: (codes, scales, zeros) per layer


@dataclass
class QuantizeJob:
    """One ``quantize`` run: its inputs, what is derived from them, and where it writes."""

    parent_dir: Path
    parent: Manifest
    out: Path
    config: RecipeConfig  # resolved (``resolve_recipe``): what the manifest records
    options: QuantizeOptions
    progress: Callable[[str], None]
    sts: StsData | None  # the Spearman budget's pairs
    encoder: EchoEncoder
    cal: CalibrationSet
    evaluate: Evaluator
    reader: FixedShapeReader
    model: ModelProto  # the parent's graph (Gemms rewritten); smoothed in place by _prepare
    linear: dict[str, LinearNode]
    excluded: tuple[str, ...]  # asked for by the config; the search may add more
    stage: Path | None = None  # the staged artifact directory
    work: Path | None = None  # scratch directory (the float graph), removed always
    graph: FloatGraph | None = None
    tried: list[Attempt] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        if self.stage is None:
            raise InternalError("the job has no staged directory yet")
        return self.stage / MODEL_FILE


def _match(patterns: tuple[str, ...], linear: dict[str, LinearNode]) -> tuple[str, ...]:
    out = []
    for pat in patterns:
        hits = [n for n in linear if fnmatch.fnmatchcase(n, pat) or n == pat]
        if not hits:
            raise ArtifactError(
                f"exclude pattern {pat!r} matches no linear layer; names look like "
                f"{next(iter(linear), '?')!r}"
            )
        out += [h for h in hits if h not in out]
    return tuple(out)


def _save(model, path: Path) -> None:
    onnx = require("onnx", "export")
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


# --- quantizing the float graph -------------------------------------------------------------


def _apply(graph: FloatGraph, config: RecipeConfig, excluded: tuple[str, ...], out: Path) -> None:
    """Quantize the float graph at ``graph.path`` into ``out`` (model.onnx)."""
    onnx = require("onnx", "export")
    for f in out.parent.glob(MODEL_FILE + "*"):
        f.unlink()
    quantizable = [n for n in graph.linear if n not in excluded]
    if isinstance(config, Fp16Config):
        _save(_to_fp16(onnx.load(str(graph.path)), config, excluded), out)
    elif not quantizable:  # onnxruntime reads an empty node list as "quantize everything"
        _save(onnx.load(str(graph.path)), out)
    elif isinstance(config, Int8DynamicConfig):
        _int8_dynamic(graph.path, config, quantizable, out)
    elif isinstance(config, Int8BlockwiseConfig):
        _save(_int8_blockwise(onnx.load(str(graph.path)), config, quantizable, excluded), out)
    elif isinstance(config, Int8StaticConfig):
        model = onnx.load(str(graph.path))
        nodes = [graph.linear[n] for n in quantizable]
        insert_qdq(
            model, nodes, graph.ranges, config.per_channel, config.activations,
            weight_max=63 if config.reduce_range else 127,
        )  # fmt: skip
        _save(model, out)
    elif isinstance(config, Int4QdqConfig):
        from echoembed.calibration.int4qdq import to_int4_qdq

        model = onnx.load(str(graph.path))
        nodes = [graph.linear[n] for n in quantizable]
        to_int4_qdq(model, nodes, config.block_size, graph.gptq)
        _save(model, out)
    else:
        model = _int4(graph, config, quantizable, excluded)
        if config.quantize_embedding:
            model = _int4_embedding(model, config)
        _save(model, out)


def _int8_dynamic(float_path: Path, config: Int8DynamicConfig, nodes: list[str], out: Path):
    """ORT's ``quantize_dynamic``; then, for ``activation_scale="token"``, its
    ``DynamicQuantizeLinear`` nodes become per-token scales (``calibration.per_token``), with
    the row scales folded where ``fold_row_scales`` (resolved) says so."""
    onnx = require("onnx", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _without_preprocess_hint():
        quantize_dynamic(
            str(float_path),
            str(out),
            per_channel=config.per_channel,
            reduce_range=bool(config.reduce_range),
            weight_type=QuantType.QUInt8 if config.weights == "uint8" else QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=nodes,
            use_external_data_format=float_path.with_name(float_path.name + ".data").exists(),
        )
    if config.activation_scale == "token":
        model = onnx.load(str(out))
        per_token_activations(model)
        if config.fold_row_scales:
            fold_row_scales(model)
        for f in out.parent.glob(MODEL_FILE + "*"):
            f.unlink()
        _save(model, out)


def _int8_blockwise(model, config: Int8BlockwiseConfig, quantizable: list[str], excluded):
    """The linear layers -> 8-bit symmetric MatMulNBits (ORT's round-to-nearest quantizer),
    every one carrying ``config.accuracy_level``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=True,
        accuracy_level=config.accuracy_level,
        bits=8,
    )
    return _matmulnbits(model, algo, True, config.accuracy_level, quantizable, excluded)


def _matmulnbits(model, algo, symmetric: bool, accuracy_level: int, quantizable, excluded):
    """Run ORT's ``MatMulNBitsQuantizer`` with ``algo`` (its bits and block size) on the
    ``quantizable`` linear nodes; every MatMulNBits then carries ``accuracy_level`` (ORT's HQQ
    quantizer takes none and writes none, ORT 1.32)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from echoembed.calibration.gptq import set_accuracy_level

    q = MatMulNBitsQuantizer(
        model,
        bits=algo.bits,
        block_size=algo.block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_include=quantizable,
        nodes_to_exclude=list(excluded),
        algo_config=algo,
    )
    q.process()
    model = q.model.model
    set_accuracy_level(model, accuracy_level)
    return model


class _DropPreprocessHint(logging.Filter):
    """onnxruntime asks for ``quant_pre_process`` on every call; measured on SmolLM2 it changes
    neither the accuracy nor the speed of the INT8 graph (the exported graph already carries
    shapes), so the hint is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocess_hint():
    root, drop = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _int4(graph: FloatGraph, config: Int4WeightOnlyConfig, quantizable: list[str], excluded):
    """The linear layers -> MatMulNBits (GPTQ: echoembed's codes; RTN/HQQ: ORT's quantizer),
    every one carrying ``config.accuracy_level``."""
    onnx = require("onnx", "export")
    from echoembed.calibration.gptq import to_matmulnbits

    model = onnx.load(str(graph.path))
    if config.algorithm == "gptq":
        for name in quantizable:
            codes, scales, zeros = graph.gptq[name]
            to_matmulnbits(
                model, graph.linear[name], codes, scales, zeros, config.block_size,
                config.accuracy_level,
            )  # fmt: skip
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if config.algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    else:
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            bits=4,
        )
    return _matmulnbits(model, algo, config.symmetric, config.accuracy_level, quantizable, excluded)


def _int4_embedding(model, config: Int4WeightOnlyConfig):
    """The token embedding table -> GatherBlockQuantized (4-bit, blocks along hidden)."""
    gathers = embedding_gathers(model)
    if not gathers:
        log.info("no embedding table Gather found; left in float")
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    axes = (("Gather", 1),)
    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        op_types_to_quantize=("Gather",),
        quant_axes=axes,
    )
    q = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        nodes_to_include=gathers,
        op_types_to_quantize=("Gather",),
        quant_axes=axes,
        algo_config=algo,
    )
    q.process()
    return q.model.model


def _to_fp16(model, config: Fp16Config, excluded: tuple[str, ...]):
    """fp16 weights and compute, fp32 graph inputs/outputs and ``config.fp32_ops``."""
    from echoembed.calibration.fp16 import to_fp16

    return to_fp16(model, config.fp32_ops, excluded)


# --- the accuracy budget --------------------------------------------------------------------


def sensitivity(model, config: RecipeConfig, linear: dict[str, LinearNode], reader) -> list[str]:
    """Linear nodes ordered from most to least sensitive (a cheap proxy, no re-quantization).

    INT8 and fp16: activation outliers of the node's input (max/median of per-channel |x| max).
    4-bit weight-only: relative error of 4-bit round-to-nearest on the node's weight blocks.
    """
    from onnx import numpy_helper

    if isinstance(config, (Int8DynamicConfig, Int8StaticConfig, Fp16Config)):
        inputs = sorted({ln.input for ln in linear.values()})
        amax = input_abs_max(model, inputs, reader)
        score = {
            n: float(amax[ln.input].max() / max(np.median(amax[ln.input]), 1e-8))
            for n, ln in linear.items()
        }
    else:
        inits = {i.name: i for i in model.graph.initializer}
        score = {}
        for n, ln in linear.items():
            w = numpy_helper.to_array(inits[ln.weight]).astype(np.float32)
            score[n] = _rtn4_error(w, config.block_size)
    return sorted(score, key=lambda n: -score[n])


def _rtn4_error(w: np.ndarray, block: int) -> float:
    """Relative error of asymmetric 4-bit RTN along the input axis, in blocks of ``block``."""
    k = w.shape[0] - w.shape[0] % block
    if k == 0:
        return 0.0
    b = w[:k].reshape(-1, block, w.shape[1])
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    scale = np.maximum(hi - lo, 1e-8) / 15.0
    q = np.clip(np.round((b - lo) / scale), 0, 15) * scale + lo
    return float(np.linalg.norm(q - b) / max(np.linalg.norm(b), 1e-12))


class Evaluator:
    """Accuracy of a candidate graph vs the fp32 parent: mean/min cosine on held-out texts, and
    STS Spearman (x100) on the budget's pairs when those are given."""

    def __init__(self, parent: Embedder, texts: tuple[str, ...], sts: StsData | None):
        self.encoder = parent.encoder()
        self.prefix_ids = parent.manifest.prefix_ids  # candidates share the parent's prefix
        self.output_name = parent.manifest.output_name
        self.texts = texts
        self.want = parent.encode(list(texts), show_progress=False)
        self.sts = sts
        self.parent_spearman = None if sts is None else self._spearman(parent.runner)

    def _spearman(self, runner) -> float:
        return sts_spearman(self.sts, lambda s: embed_texts(runner, self.encoder, s))

    def __call__(self, path: Path, excluded: tuple[str, ...]) -> Attempt:
        runner = OrtRunner(path, self.output_name, providers=["CPUExecutionProvider"],
                           prefix_ids=self.prefix_ids)  # fmt: skip
        got = embed_texts(runner, self.encoder, self.texts)
        cos = (got * self.want).sum(axis=1)
        rho = None if self.sts is None else self._spearman(runner)
        return Attempt(excluded, float(cos.mean()), float(cos.min()), rho)

    def drop(self, a: Attempt, metric: str) -> float:
        if metric == "spearman":
            return self.parent_spearman - a.spearman
        return 1.0 - a.mean_cosine


def _budget_sts(options: QuantizeOptions) -> StsData | None:
    """The STS pairs the Spearman budget is measured on (None for a cosine budget)."""
    path = options.sts
    if options.metric != "spearman" and path is None:
        return None
    if path is None and options.calibration.path is not None:
        path = options.calibration.path if str(options.calibration.path).endswith(".tsv") else None
    if path is None:
        raise UserError(
            "a Spearman budget needs STS pairs: pass --sts PATH (e.g. ../shared/data/stsb/dev.tsv)"
        )
    try:
        return read_sts(path, limit=options.sts_limit)
    except InputError as e:
        raise UserError(f"{e}; the Spearman budget needs an STS TSV (--sts)") from e


# --- prepare --------------------------------------------------------------------------------


def _open_job(
    artifact_dir: str | Path,
    out_dir: str | Path,
    config: RecipeConfig,
    options: QuantizeOptions,
    progress: Callable[[str], None],
) -> QuantizeJob:
    """Read and verify the fp32 parent, load the calibration texts and the parent's graph."""
    onnx = require("onnx", "export")
    parent_dir, out = Path(artifact_dir), Path(out_dir)
    parent = read_manifest(parent_dir)
    verify_files(parent_dir, parent)
    if parent.precision != "fp32" or parent.quantization is not None:
        raise ArtifactError(
            f"{parent_dir} is {parent.precision}; quantize the fp32 artifact from "
            "`echoembed export`"
        )
    check_target(out, options.force)
    sts = _budget_sts(options)
    runtime = Embedder.load(parent_dir, verify=False)
    encoder = runtime.encoder()
    cal: CalibrationSet = load_calibration(options.calibration)
    progress(
        f"{config.recipe}: {len(cal.calibration)} calibration + {len(cal.evaluation)} held-out "
        f"texts from {cal.source}" + (f"; STS budget on {len(sts)} pairs" if sts else "")
    )
    model = onnx.load(str(parent_dir / parent.model_file))
    gemm_to_matmul(model)
    linear = linear_nodes(model)
    return QuantizeJob(
        parent_dir=parent_dir,
        parent=parent,
        out=out,
        config=config,
        options=options,
        progress=progress,
        sts=sts,
        encoder=encoder,
        cal=cal,
        evaluate=Evaluator(runtime, cal.evaluation, sts),
        reader=FixedShapeReader(
            encoder, cal.calibration, options.calibration.batch_size, parent.prefix_ids
        ),
        model=model,
        linear=linear,
        excluded=_match(config.exclude, linear),
    )


def _smooth_alpha(config: RecipeConfig) -> float | None:
    if isinstance(config, (Int8DynamicConfig, Int8StaticConfig)):
        return config.smooth_alpha
    return None


def _smooth(job: QuantizeJob) -> tuple[str, ...]:
    """SmoothQuant the job's graph in place (INT8 with ``smooth_alpha``); the modules rewritten."""
    alpha = _smooth_alpha(job.config)
    if alpha is None:
        return ()
    model, linear = job.model, job.linear
    downs = [d.input for _, d in mlp_pairs(model, linear)]
    groups = [lns[0].input for _, lns in norm_groups(model, linear)]
    if not downs and not groups:
        return ()
    job.progress(
        f"SmoothQuant (alpha {alpha}): {len(downs)} MLP down projections, "
        f"{len(groups)} norm-fed groups ..."
    )
    amax = input_abs_max(model, downs + groups, job.reader)
    smoothed = smooth_mlp(model, amax, alpha)
    smoothed += smooth_norm_inputs(model, linear, amax, alpha)
    return tuple(smoothed)


def _prepare(job: QuantizeJob) -> FloatGraph:
    """Smooth (INT8), save the float graph, and measure what the recipe needs once."""
    if job.work is None:
        raise InternalError("the job has no scratch directory yet")
    smoothed = _smooth(job)
    graph = FloatGraph(job.work / "float.onnx", job.linear, smoothed)
    _save(job.model, graph.path)
    config = job.config
    if isinstance(config, Int8StaticConfig):
        graph.ranges = _static_ranges(job, graph, config)
    elif isinstance(config, Int4QdqConfig):
        graph.gptq = _int4_qdq_prepare(job, config)
    elif isinstance(config, Int4WeightOnlyConfig) and config.algorithm == "gptq":
        from echoembed.calibration.gptq import gptq_solve

        graph.gptq = gptq_solve(
            job.model, list(job.linear.values()), job.reader, config.block_size,
            config.symmetric, config.gptq_damp, config.gptq_act_order, config.float_zero,
            job.progress,
        )  # fmt: skip
    job.graph = graph
    return graph


def _int4_qdq_prepare(job: QuantizeJob, config: Int4QdqConfig) -> dict[str, tuple] | None:
    """Refuse a block size that does not divide a layer's K (before any work); GPTQ codes on
    the positive symmetric INT4 grid for ``algorithm="gptq"`` (None for RTN)."""
    from echoembed.calibration.int4qdq import check_block_size

    nodes = [ln for n, ln in job.linear.items() if n not in job.excluded]
    check_block_size(job.model, nodes, config.block_size)
    if config.algorithm != "gptq":
        return None
    from echoembed.calibration.gptq import gptq_solve

    return gptq_solve(
        job.model, list(job.linear.values()), job.reader, config.block_size, True,
        config.gptq_damp, config.gptq_act_order, False, job.progress, positive=True,
    )  # fmt: skip


def _static_ranges(job: QuantizeJob, graph: FloatGraph, config: Int8StaticConfig):
    """Activation thresholds of every linear input: from the cache when it is fresh, else
    measured on the calibration texts (and cached)."""
    tensors = sorted({ln.input for ln in graph.linear.values()})
    key = CacheKey(
        files_sha256(graph.path),
        job.encoder.config.template.source,
        job.cal.sha256,
        config.method,
        config.percentile if config.method == "percentile" else 0.0,
    )
    cache = Path(job.options.calibration_cache) if job.options.calibration_cache else None
    if cache is not None:
        ranges = read_cache(cache, key)
        if ranges is not None and set(tensors) <= set(ranges):
            job.progress(f"activation ranges from the cache {cache}")
            return ranges
    job.progress(f"calibrating {len(tensors)} activation ranges ({config.method}) ...")
    ranges = collect_ranges(
        job.model, tensors, job.reader, config.method, config.percentile, job.progress
    )
    if cache is not None:
        write_cache(cache, key, ranges)
        job.progress(f"wrote the calibration cache {cache}")
    return ranges


# --- search ---------------------------------------------------------------------------------


def _attempt(job: QuantizeJob, excluded: tuple[str, ...]) -> Attempt:
    """Quantize with ``excluded`` kept in float into the staged model file and measure it."""
    _apply(job.graph, job.config, excluded, job.model_path)
    a = job.evaluate(job.model_path, excluded)
    rho = "" if a.spearman is None else f", STS Spearman {a.spearman:.2f}"
    job.progress(
        f"  {len(excluded)} layers kept in float: mean cosine {a.mean_cosine:.5f}, "
        f"min {a.min_cosine:.5f}{rho}"
    )
    job.tried.append(a)
    return a


def _within(job: QuantizeJob, a: Attempt) -> bool:
    budget = job.options.max_drop
    return budget is None or job.evaluate.drop(a, job.options.metric) <= budget


def _search(job: QuantizeJob) -> Attempt:
    """The attempt the artifact keeps: the config's exclusions, or (over budget) the fewest most
    sensitive layers in float that meet the budget. The staged model file is that attempt."""
    job.progress("quantizing ...")
    best = _attempt(job, job.excluded)
    if _within(job, best):
        return best
    limit = int(job.options.max_float_fraction * len(job.linear)) - len(job.excluded)
    order = sensitivity(job.model, job.config, job.linear, job.reader)
    best = _bisect_float_layers(
        order, job.excluded, lambda a: _within(job, a), limit, lambda e: _attempt(job, e),
        job.progress,
    )  # fmt: skip
    if job.tried[-1].excluded != best.excluded:  # the file on disk must be `best`
        _attempt(job, best.excluded)
    return best


def _bisect_float_layers(order, excluded, ok, limit, attempt, progress) -> Attempt:
    """Keep the top-k most sensitive layers in float, k = 1, 2, 4, ... (at most ``limit``); then
    bisect for the smallest k within budget. Returns the last attempt if none fits."""
    progress("over budget: searching the layers to keep in float ...")
    order = [n for n in order if n not in excluded][: max(limit, 0)]
    if not order:
        return attempt(tuple(excluded))

    def run(k: int) -> Attempt:
        return attempt(tuple(excluded) + tuple(order[:k]))

    lo, hi, found, k = 0, 0, None, 1
    while found is None:
        a = run(min(k, len(order)))
        if ok(a):
            hi, found = min(k, len(order)), a
        elif k >= len(order):
            return a  # even all layers in float (of the ordered ones) misses the budget
        else:
            lo, k = k, k * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        a = run(mid)
        if ok(a):
            hi, found = mid, a
        else:
            lo = mid
    return found


def _refuse_over_budget(job: QuantizeJob, best: Attempt) -> None:
    """Raise ``AccuracyBudgetError`` when ``best`` misses the budget (unless allowed)."""
    if _within(job, best) or job.options.allow_over_budget:
        return
    metric = job.options.metric
    unit = "mean cosine" if metric == "cosine" else "STS Spearman points"
    raise AccuracyBudgetError(
        f"{job.config.recipe} misses the budget: drop of {job.evaluate.drop(best, metric):.5f} "
        f"{unit} vs fp32 > max_drop {job.options.max_drop}, even with {len(best.excluded)} of "
        f"{len(job.linear)} layers kept in float (at most {job.options.max_float_fraction:.0%}); "
        "no artifact was written. Raise --max-drop, choose another recipe, or pass "
        "--allow-over-budget"
    )


# --- write ----------------------------------------------------------------------------------


def _tensor_specs(values) -> tuple[TensorSpec, ...]:
    """Graph inputs or outputs (``ValueInfoProto``) as manifest ``TensorSpec``s."""
    from onnx import helper

    specs = []
    for v in values:
        tt = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        dims = tuple(_dim(d) for d in tt.shape.dim)
        specs.append(TensorSpec(v.name, dtype, dims))
    return tuple(specs)


def _dim(d) -> str | int:
    """An ONNX dimension as a manifest writes it: its name, its size, or ``?`` when unknown."""
    if d.dim_param:
        return d.dim_param
    return d.dim_value if d.HasField("dim_value") else "?"


@dataclass(frozen=True)
class GraphContract:
    """What a manifest says about its graph, read from the saved graph itself."""

    opset_imports: dict[str, int]  # domain -> version, "" = ai.onnx
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _graph_contract(path: Path) -> GraphContract:
    """Opset imports, inputs and outputs of the saved graph at ``path`` (weights not loaded)."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path), load_external_data=False)
    return GraphContract(
        graph_opset_imports(model),
        _tensor_specs(model.graph.input),
        _tensor_specs(model.graph.output),
    )


def _check_contract(contract: GraphContract, parent: Manifest) -> None:
    """The quantized graph keeps the parent's input and output names, dtypes and ranks (what a
    runner feeds and fetches) and imports a default-domain opset."""
    for kind, want, got in (
        ("inputs", parent.inputs, contract.inputs),
        ("outputs", parent.outputs, contract.outputs),
    ):
        if [(t.name, t.dtype, len(t.shape)) for t in want] != [
            (t.name, t.dtype, len(t.shape)) for t in got
        ]:
            raise InternalError(f"the quantized graph's {kind} {got} differ from the parent's")
    if "" not in contract.opset_imports:
        raise InternalError(
            f"the quantized graph imports no default-domain opset: {contract.opset_imports}"
        )


def _describes_graph(root: Path, manifest: Manifest) -> bool:
    """Whether the manifest's graph-describing fields are those of its saved graph (manifests of
    older echoembed versions recorded the parent's opset)."""
    contract = _graph_contract(root / manifest.model_file)
    return (
        manifest.opset_imports == contract.opset_imports
        and manifest.opset == contract.opset_imports.get("")
        and manifest.inputs == contract.inputs
        and manifest.outputs == contract.outputs
    )


def _quantization_info(job: QuantizeJob, best: Attempt) -> QuantizationInfo:
    options, cal, sts = job.options, job.cal, job.sts
    return QuantizationInfo(
        recipe=job.config.recipe,
        settings=job.config,
        parent_sha256=job.parent.files[job.parent.model_file],  # verified by _open_job
        calibration_source=cal.source,
        calibration_sha256=cal.sha256,
        calibration_texts=len(cal.calibration),
        excluded=best.excluded,
        smoothed=job.graph.smoothed,
        eval_texts=len(cal.evaluation),
        mean_cosine=best.mean_cosine,
        min_cosine=best.min_cosine,
        max_drop=options.max_drop,
        within_budget=_within(job, best),
        metric=options.metric,
        sts_source=None if sts is None else str(options.sts or options.calibration.path),
        sts_pairs=0 if sts is None else len(sts),
        sts_spearman=best.spearman,
        parent_sts_spearman=job.evaluate.parent_spearman,
    )


def _plans(job: QuantizeJob) -> tuple[PromptPlan, ...]:
    """Prompt plans for a parent from an older format that recorded none."""
    m = job.parent
    templates = [t.to_template() for t in m.templates]
    return template_plans(
        job.encoder.tokenizer, m.special_tokens, templates, m.max_length, m.context_length
    )


def _write(job: QuantizeJob, best: Attempt) -> Manifest:
    """Tokenizer and manifest into the staged directory; the manifest's graph-describing fields
    (opset, opset_imports, inputs, outputs) are read from the saved quantized graph."""
    stage = job.stage
    shutil.copy2(job.parent_dir / TOKENIZER_NAME, stage / TOKENIZER_NAME)
    graph = _graph_contract(job.model_path)
    _check_contract(graph, job.parent)
    manifest = dataclasses.replace(
        job.parent,
        model_file=MODEL_FILE,
        format_version=FORMAT_VERSION,
        precision=job.config.recipe,
        opset=graph.opset_imports[""],
        opset_imports=graph.opset_imports,
        inputs=graph.inputs,
        outputs=graph.outputs,
        parity=None,  # the export-time check was the parent's; accuracy is in `quantization`
        prompt_plans=job.parent.prompt_plans or _plans(job),  # same tokenizer and templates
        files=hash_files(stage),
        quantization=_quantization_info(job, best),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write(stage / MANIFEST_NAME, manifest.to_json())
    return manifest


def quantize(
    artifact_dir: str | Path,
    out_dir: str | Path,
    config: RecipeConfig,
    options: QuantizeOptions | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> Artifact:
    """Quantize the fp32 artifact at ``artifact_dir`` into a new artifact at ``out_dir``."""
    if not isinstance(config, RECIPE_TYPES):
        raise TypeError(
            "config must be one of "
            + ", ".join(t.__name__ for t in RECIPE_TYPES)
            + f"; got {type(config).__name__}"
        )
    options = options or QuantizeOptions()
    job = _open_job(artifact_dir, out_dir, resolve_recipe(config), options, progress)
    with staged_dir(job.out, force=options.force) as stage:
        job.stage, job.work = stage.path, stage.scratch()
        _prepare(job)
        best = _search(job)
        _refuse_over_budget(job, best)
        manifest = _write(job, best)
    progress(f"wrote {job.out}")
    return Artifact(job.out, manifest)


def quantize_or_reuse(
    artifact_dir: str | Path,
    out_dir: str | Path,
    config: RecipeConfig,
    options: QuantizeOptions | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[Artifact, bool]:
    """Reuse ``out_dir`` when it verifies, was made from this parent with this recipe and
    settings (the resolved config equals the manifest's) and its manifest describes its graph;
    otherwise quantize (replacing it). Returns (artifact, reused)."""
    config = resolve_recipe(config)
    options = options or QuantizeOptions()
    parent = read_manifest(artifact_dir)
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file():
        try:
            have = read_manifest(out)
            verify_files(out, have)
            q = have.quantization
            same = (
                q is not None
                and q.recipe == config.recipe
                and q.settings == config
                and q.parent_sha256 == parent.files.get(parent.model_file)
                and q.calibration_source == calibration_source(options.calibration)
                and (not parent.prompt_plans or have.prompt_plans == parent.prompt_plans)
            )
            if same and not _describes_graph(out, have):
                progress(f"not reusing {out}: its manifest does not describe its graph")
                same = False
        except ArtifactError as e:
            progress(f"not reusing {out}: {e}")
            same = False
        if same:
            progress(f"reusing {out} ({config.recipe}, same parent and settings)")
            return Artifact(out, have), True
    forced = dataclasses.replace(options, force=True)
    return quantize(artifact_dir, out, config, forced, progress), False
