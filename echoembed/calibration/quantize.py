"""``quantize(artifact, out_dir, config, options) -> Artifact``: one entry point, typed recipes.

Stages: read and verify the fp32 parent; sample calibration and held-out texts; prepare the float
graph (SmoothQuant for INT8) and what the recipe measures once (INT8 static: activation ranges,
cached; GPTQ: Hessians); quantize with the excluded layers kept in float; measure mean/min cosine
against the parent on held-out texts (and STS Spearman when asked); with ``max_drop``, keep the
most sensitive layers in float until the budget holds; write a complete artifact atomically
(nothing is left at the target when the budget is missed, unless ``allow_over_budget``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.artifact import (
    MANIFEST_NAME,
    MODEL_FILE,
    TOKENIZER_NAME,
    Artifact,
    QuantizationInfo,
    atomic_write,
    check_target,
    hash_files,
    read_manifest,
    sha256_file,
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
from echoembed.calibration.recipes import (
    RECIPE_TYPES,
    Fp16Config,
    Int4WeightOnlyConfig,
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
from echoembed.echo import embed_texts
from echoembed.errors import AccuracyBudgetError, ArtifactError, InputError, UserError, require
from echoembed.runtime import Embedder, OrtRunner
from echoembed.validation.sts import StsData, read_sts, sts_spearman

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    excluded: tuple[str, ...]
    mean_cosine: float
    min_cosine: float
    spearman: float | None = None  # x100 on the budget's STS pairs, when measured


@dataclass
class Prepared:
    """What a recipe measures once and every attempt of the budget search reuses."""

    float_path: Path
    linear: dict[str, LinearNode]
    ranges: dict[str, float] | None = None  # INT8 static: activation thresholds
    gptq: dict[str, tuple] | None = None  # GPTQ: (codes, scales, zeros) per layer


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


def _apply(prep: Prepared, config: RecipeConfig, excluded: tuple[str, ...], out: Path) -> None:
    """Quantize the float graph at ``prep.float_path`` into ``out`` (model.onnx)."""
    onnx = require("onnx", "export")
    for f in out.parent.glob(MODEL_FILE + "*"):
        f.unlink()
    quantizable = [n for n in prep.linear if n not in excluded]
    if isinstance(config, Fp16Config):
        _save(_to_fp16(onnx.load(str(prep.float_path)), config, excluded), out)
        return
    if not quantizable:  # onnxruntime reads an empty node list as "quantize everything"
        _save(onnx.load(str(prep.float_path)), out)
        return
    if isinstance(config, Int8DynamicConfig):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _without_preprocess_hint():
            quantize_dynamic(
                str(prep.float_path),
                str(out),
                per_channel=config.per_channel,
                reduce_range=bool(config.reduce_range),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=quantizable,
                use_external_data_format=prep.float_path.with_name(
                    prep.float_path.name + ".data"
                ).exists(),
            )
    elif isinstance(config, Int8StaticConfig):
        model = onnx.load(str(prep.float_path))
        nodes = [prep.linear[n] for n in quantizable]
        insert_qdq(
            model, nodes, prep.ranges, config.per_channel, config.activations,
            weight_max=63 if config.reduce_range else 127,
        )  # fmt: skip
        _save(model, out)
    else:
        model = _int4(prep, config, quantizable, excluded)
        if config.quantize_embedding:
            model = _int4_embedding(model, config)
        _save(model, out)


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


def _int4(prep: Prepared, config: Int4WeightOnlyConfig, quantizable: list[str], excluded):
    onnx = require("onnx", "export")
    model = onnx.load(str(prep.float_path))
    if config.algorithm == "gptq":
        from echoembed.calibration.gptq import to_matmulnbits

        for name in quantizable:
            codes, scales, zeros = prep.gptq[name]
            to_matmulnbits(
                model, prep.linear[name], codes, scales, zeros, config.block_size,
                config.accuracy_level,
            )  # fmt: skip
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if config.algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    else:
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
        )
    q = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        nodes_to_include=quantizable,
        nodes_to_exclude=list(excluded),
        algo_config=algo,
    )
    q.process()
    return q.model.model


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
        self.texts = texts
        self.want = parent.encode(list(texts), show_progress=False)
        self.sts = sts
        self.parent_spearman = None if sts is None else self._spearman(parent.runner)

    def _spearman(self, runner) -> float:
        return sts_spearman(self.sts, lambda s: embed_texts(runner, self.encoder, s))

    def __call__(self, path: Path, excluded: tuple[str, ...]) -> Attempt:
        runner = OrtRunner(path, providers=["CPUExecutionProvider"])
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


def _prepare(model, config, linear, reader, encoder, cal, options, work: Path, progress):
    """Smooth (INT8), save the float graph, and measure what the recipe needs once."""
    smoothed: list[str] = []
    alpha = getattr(config, "smooth_alpha", None)
    if alpha is not None:
        downs = [d.input for _, d in mlp_pairs(model, linear)]
        groups = [lns[0].input for _, lns in norm_groups(model, linear)]
        if downs or groups:
            progress(
                f"SmoothQuant (alpha {alpha}): {len(downs)} MLP down projections, "
                f"{len(groups)} norm-fed groups ..."
            )
            amax = input_abs_max(model, downs + groups, reader)
            smoothed = smooth_mlp(model, amax, alpha)
            smoothed += smooth_norm_inputs(model, linear, amax, alpha)
    prep = Prepared(work / "float.onnx", linear)
    _save(model, prep.float_path)
    if isinstance(config, Int8StaticConfig):
        prep.ranges = _static_ranges(prep, model, config, reader, encoder, cal, options, progress)
    elif isinstance(config, Int4WeightOnlyConfig) and config.algorithm == "gptq":
        from echoembed.calibration.gptq import gptq_solve

        prep.gptq = gptq_solve(
            model, list(linear.values()), reader, config.block_size, config.symmetric,
            config.gptq_damp, config.gptq_act_order, config.float_zero, progress,
        )  # fmt: skip
    return prep, smoothed


def _static_ranges(prep, model, config, reader, encoder, cal, options, progress):
    tensors = sorted({ln.input for ln in prep.linear.values()})
    key = CacheKey(
        files_sha256(prep.float_path),
        encoder.config.template.source,
        cal.sha256,
        config.method,
        config.percentile if config.method == "percentile" else 0.0,
    )
    cache = Path(options.calibration_cache) if options.calibration_cache else None
    if cache is not None:
        ranges = read_cache(cache, key)
        if ranges is not None and set(tensors) <= set(ranges):
            progress(f"activation ranges from the cache {cache}")
            return ranges
    progress(f"calibrating {len(tensors)} activation ranges ({config.method}) ...")
    ranges = collect_ranges(model, tensors, reader, config.method, config.percentile, progress)
    if cache is not None:
        write_cache(cache, key, ranges)
        progress(f"wrote the calibration cache {cache}")
    return ranges


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
    config = resolve_recipe(config)
    options = options or QuantizeOptions()
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
    evaluate = Evaluator(runtime, cal.evaluation, sts)
    reader = FixedShapeReader(encoder, cal.calibration, options.calibration.batch_size)
    model = onnx.load(str(parent_dir / parent.model_file))
    gemm_to_matmul(model)
    linear = linear_nodes(model)
    excluded = _match(config.exclude, linear)
    with staged_dir(out, force=options.force) as stage:
        tmp, work = stage.path, stage.scratch()
        prep, smoothed = _prepare(
            model, config, linear, reader, encoder, cal, options, work, progress
        )
        model_path = tmp / MODEL_FILE
        tried: list[Attempt] = []
        metric = options.metric

        def attempt(excl: tuple[str, ...]) -> Attempt:
            _apply(prep, config, excl, model_path)
            a = evaluate(model_path, excl)
            rho = "" if a.spearman is None else f", STS Spearman {a.spearman:.2f}"
            progress(
                f"  {len(excl)} layers kept in float: mean cosine {a.mean_cosine:.5f}, "
                f"min {a.min_cosine:.5f}{rho}"
            )
            tried.append(a)
            return a

        progress("quantizing ...")
        best = attempt(excluded)
        budget = options.max_drop
        if budget is not None and evaluate.drop(best, metric) > budget:
            limit = int(options.max_float_fraction * len(linear)) - len(excluded)
            order = sensitivity(model, config, linear, reader)
            best = _search(
                order, excluded, lambda a: evaluate.drop(a, metric) <= budget, limit, attempt,
                progress,
            )  # fmt: skip
            if tried[-1].excluded != best.excluded:  # the file on disk must be `best`
                attempt(best.excluded)
        within = budget is None or evaluate.drop(best, metric) <= budget
        if not within and not options.allow_over_budget:
            unit = "mean cosine" if metric == "cosine" else "STS Spearman points"
            raise AccuracyBudgetError(
                f"{config.recipe} misses the budget: drop of {evaluate.drop(best, metric):.5f} "
                f"{unit} vs fp32 > max_drop {budget}, even with {len(best.excluded)} of "
                f"{len(linear)} layers kept in float (at most {options.max_float_fraction:.0%}); "
                "no artifact was written. Raise --max-drop, choose another recipe, or pass "
                "--allow-over-budget"
            )
        shutil.copy2(parent_dir / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        info = QuantizationInfo(
            recipe=config.recipe,
            settings=config,
            parent_sha256=sha256_file(parent_dir / parent.model_file),
            calibration_source=cal.source,
            calibration_sha256=cal.sha256,
            calibration_texts=len(cal.calibration),
            excluded=best.excluded,
            smoothed=tuple(smoothed),
            eval_texts=len(cal.evaluation),
            mean_cosine=best.mean_cosine,
            min_cosine=best.min_cosine,
            max_drop=budget,
            within_budget=within,
            metric=metric,
            sts_source=None if sts is None else str(options.sts or options.calibration.path),
            sts_pairs=0 if sts is None else len(sts),
            sts_spearman=best.spearman,
            parent_sts_spearman=evaluate.parent_spearman,
        )
        manifest = dataclasses.replace(
            parent,
            model_file=MODEL_FILE,
            precision=config.recipe,
            parity=None,  # the export-time check was the parent's; accuracy is in `quantization`
            files=hash_files(tmp),
            quantization=info,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        atomic_write(tmp / MANIFEST_NAME, manifest.to_json())
    progress(f"wrote {out}")
    return Artifact(out, manifest)


def quantize_or_reuse(
    artifact_dir: str | Path,
    out_dir: str | Path,
    config: RecipeConfig,
    options: QuantizeOptions | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[Artifact, bool]:
    """Reuse ``out_dir`` when it verifies and was made from this parent with this recipe and
    settings; otherwise quantize (replacing it). Returns (artifact, reused)."""
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
            )
        except ArtifactError as e:
            progress(f"not reusing {out}: {e}")
            same = False
        if same:
            progress(f"reusing {out} ({config.recipe}, same parent and settings)")
            return Artifact(out, have), True
    forced = dataclasses.replace(options, force=True)
    return quantize(artifact_dir, out, config, forced, progress), False


def _search(order, excluded, ok, limit, attempt, progress) -> Attempt:
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
