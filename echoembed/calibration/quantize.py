"""``quantize(artifact, out_dir, config, options) -> Artifact``: one entry point, typed recipes.

Stages: read and verify the fp32 parent; sample calibration and held-out texts; prepare the float
graph (SmoothQuant for INT8); quantize with the excluded layers kept in float; measure mean/min
cosine against the parent on held-out texts; with ``max_drop``, keep the most sensitive layers in
float until the budget holds; write a complete artifact atomically (nothing is left at the target
when the budget is missed, unless ``allow_over_budget``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.calibration.data import CalibrationSet, FixedShapeReader, load_calibration
from echoembed.calibration.graph import (
    EXTERNAL_DATA_BYTES,
    LinearNode,
    gemm_to_matmul,
    input_abs_max,
    linear_nodes,
)
from echoembed.calibration.recipes import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    QuantizeOptions,
    RecipeConfig,
    settings_of,
)
from echoembed.calibration.smooth import mlp_pairs, norm_groups, smooth_mlp, smooth_norm_inputs
from echoembed.echo import EchoEncoder, embed_texts
from echoembed.errors import AccuracyBudgetError, ArtifactError, require
from echoembed.runtime import Embedder, OrtRunner
from echoembed.runtime.manifest import (
    MANIFEST_NAME,
    MODEL_FILE,
    TOKENIZER_NAME,
    Artifact,
    QuantizationInfo,
    check_target,
    hash_files,
    install_dir,
    read_manifest,
    sha256_file,
    verify_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    excluded: tuple[str, ...]
    mean_cosine: float
    min_cosine: float


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


def _apply(float_path: Path, config: RecipeConfig, excluded: tuple[str, ...], out: Path, linear):
    """Quantize the float graph at ``float_path`` into ``out`` (model.onnx)."""
    onnx = require("onnx", "export")
    for f in out.parent.glob(MODEL_FILE + "*"):
        f.unlink()
    quantizable = [n for n in linear if n not in excluded]
    if not quantizable:  # onnxruntime reads an empty node list as "quantize everything"
        _save(onnx.load(str(float_path)), out)
        return
    if isinstance(config, Int8DynamicConfig):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(float_path),
            str(out),
            per_channel=config.per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=quantizable,
            use_external_data_format=float_path.with_name(float_path.name + ".data").exists(),
        )
    else:
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
            onnx.load(str(float_path)),
            bits=4,
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            nodes_to_include=quantizable,
            nodes_to_exclude=list(excluded),
            algo_config=algo,
        )
        q.process()
        _save(q.model.model, out)


def _accuracy(path: Path, encoder: EchoEncoder, texts: tuple[str, ...], want: np.ndarray):
    got = embed_texts(OrtRunner(path, providers=["CPUExecutionProvider"]), encoder, texts)
    cos = (got * want).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def sensitivity(model, config: RecipeConfig, linear: dict[str, LinearNode], reader) -> list[str]:
    """Linear nodes ordered from most to least sensitive (a cheap proxy, no re-quantization).

    INT8 dynamic: activation outliers of the node's input (max/median of per-channel |x| max).
    4-bit weight-only: relative error of 4-bit round-to-nearest on the node's weight blocks.
    """
    from onnx import numpy_helper

    if isinstance(config, Int8DynamicConfig):
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


def quantize(
    artifact_dir: str | Path,
    out_dir: str | Path,
    config: RecipeConfig,
    options: QuantizeOptions | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> Artifact:
    """Quantize the fp32 artifact at ``artifact_dir`` into a new artifact at ``out_dir``."""
    if not isinstance(config, (Int8DynamicConfig, Int4WeightOnlyConfig)):
        raise TypeError(
            f"config must be Int8DynamicConfig or Int4WeightOnlyConfig, got {type(config).__name__}"
        )
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
    runtime = Embedder.load(parent_dir, verify=False)
    encoder = runtime.encoder()
    cal: CalibrationSet = load_calibration(options.calibration)
    progress(
        f"{config.recipe}: {len(cal.calibration)} calibration + {len(cal.evaluation)} held-out "
        f"texts from {cal.source}"
    )
    want = runtime.encode(list(cal.evaluation), show_progress=False)
    reader = FixedShapeReader(encoder, cal.calibration, options.calibration.batch_size)
    model = onnx.load(str(parent_dir / parent.model_file))
    gemm_to_matmul(model)
    linear = linear_nodes(model)
    excluded = _match(config.exclude, linear)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        smoothed: list[str] = []
        if isinstance(config, Int8DynamicConfig) and config.smooth_alpha is not None:
            downs = [d.input for _, d in mlp_pairs(model, linear)]
            groups = [lns[0].input for _, lns in norm_groups(model, linear)]
            if downs or groups:
                progress(
                    f"SmoothQuant (alpha {config.smooth_alpha}): {len(downs)} MLP down "
                    f"projections, {len(groups)} norm-fed groups ..."
                )
                amax = input_abs_max(model, downs + groups, reader)
                smoothed = smooth_mlp(model, amax, config.smooth_alpha)
                smoothed += smooth_norm_inputs(model, linear, amax, config.smooth_alpha)
        float_path = work / "float.onnx"
        _save(model, float_path)
        model_path = tmp / MODEL_FILE

        tried: list[Attempt] = []

        def attempt(excl: tuple[str, ...]) -> Attempt:
            _apply(float_path, config, excl, model_path, linear)
            mean, worst = _accuracy(model_path, encoder, cal.evaluation, want)
            progress(f"  {len(excl)} layers kept in float: mean cosine {mean:.5f}, min {worst:.5f}")
            tried.append(Attempt(excl, mean, worst))
            return tried[-1]

        progress("quantizing ...")
        best = attempt(excluded)
        budget = options.max_drop
        if budget is not None and 1.0 - best.mean_cosine > budget:
            limit = int(options.max_float_fraction * len(linear)) - len(excluded)
            best = _search(
                model, config, linear, reader, excluded, budget, limit, attempt, progress
            )
            if tried[-1].excluded != best.excluded:  # the file on disk must be `best`
                attempt(best.excluded)
        within = budget is None or 1.0 - best.mean_cosine <= budget
        if not within and not options.allow_over_budget:
            raise AccuracyBudgetError(
                f"{config.recipe} misses the budget: mean cosine {best.mean_cosine:.5f} vs fp32 "
                f"(drop {1 - best.mean_cosine:.5f} > max_drop {budget}) even with "
                f"{len(best.excluded)} of {len(linear)} layers kept in float (at most "
                f"{options.max_float_fraction:.0%}); no artifact was written. Raise --max-drop, "
                "choose another recipe, or pass --allow-over-budget"
            )
        shutil.copy2(parent_dir / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        info = QuantizationInfo(
            recipe=config.recipe,
            settings=settings_of(config),
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
        )
        manifest = dataclasses.replace(
            parent,
            model_file=MODEL_FILE,
            precision=config.recipe,
            parity=None,  # the export-time check was the parent's; accuracy is in `quantization`
            files=hash_files(tmp),
            quantization=info,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"wrote {out}")
    return Artifact(out, manifest)


def _search(model, config, linear, reader, excluded, budget, limit, attempt, progress) -> Attempt:
    """Keep the top-k most sensitive layers in float, k = 1, 2, 4, ... (at most ``limit``); then
    bisect for the smallest k within budget. Returns the last attempt if none fits."""
    progress(f"mean cosine drop over budget {budget}: searching layers to keep in float ...")
    order = [n for n in sensitivity(model, config, linear, reader) if n not in excluded]
    order = order[: max(limit, 0)]
    if not order:
        return attempt(tuple(excluded))

    def run(k: int) -> Attempt:
        return attempt(tuple(excluded) + tuple(order[:k]))

    lo, hi, found, k = 0, 0, None, 1
    while found is None:
        a = run(min(k, len(order)))
        if 1.0 - a.mean_cosine <= budget:
            hi, found = min(k, len(order)), a
        elif k >= len(order):
            return a  # even all layers in float (of the ordered ones) misses the budget
        else:
            lo, k = k, k * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        a = run(mid)
        if 1.0 - a.mean_cosine <= budget:
            hi, found = mid, a
        else:
            lo = mid
    return found
