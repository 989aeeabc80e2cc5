"""Causal LM -> ONNX artifact with the echo pooling head inside the graph.

Stages (each a small function): load the model, trace the graph, fix names and check it, save
the tokenizer, check parity against the PyTorch reference, write the manifest, move the finished
directory into place. Nothing is left at the target path unless every stage succeeded.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from echoembed import __version__
from echoembed.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_NAME,
    Artifact,
    FusionInfo,
    Manifest,
    PrefixInfo,
    SourceInfo,
    TemplateSpec,
    TensorSpec,
    atomic_write,
    check_target,
    graph_opset_imports,
    hash_files,
    staged_dir,
)
from echoembed.echo import (
    INPUT_NAMES,
    PRESETS,
    EchoEncoder,
    EncoderConfig,
    Pooling,
    PromptPlan,
    Template,
    get_template,
    template_plans,
)
from echoembed.errors import ExportError, InternalError, require
from echoembed.exporter.architectures import get_architecture
from echoembed.exporter.parity import ParityConfig, check_parity
from echoembed.reference.sources import LoadedModel, ModelSource, load_model, resolve_source

log = logging.getLogger(__name__)

MIN_OPSET = 17
# fp16 graphs are compared with the fp32 reference at this tolerance (max abs diff, normalized)
FP16_TOLERANCE = 5e-3
PROTOBUF_LIMIT = 2**31 - 1
_TMP_OUTPUT = "echoembed_pooled_output"


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how."""

    template: str = "echo"  # preset name or template string: the artifact's default
    pooling: Pooling = Pooling.MEAN
    normalize: bool = True
    dtype: Literal["fp32", "fp16"] = "fp32"  # weights and compute of the graph
    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    max_length: int | None = None  # per template piece, recorded in the manifest
    external_data: bool | None = None  # None: only when the graph would pass protobuf's 2 GB
    parity: ParityConfig = field(default_factory=ParityConfig)
    force: bool = False  # replace an existing artifact at the target
    threads: int | None = None
    # ORT's fused kernels (GroupQueryAttention with rotary, RMSNorm, skip-RMSNorm) where they
    # apply to an fp32 graph; off for graphs meant for TensorRT, which has no such ops
    fuse: bool = True
    # shared-prefix reuse: the template's constant leading tokens computed once and baked into
    # the graph (its inputs are then prompts without them; only templates starting with the
    # same tokens can use the artifact)
    prefix_reuse: bool = False
    # the fused graph's GroupQueryAttention rewritten as RotaryEmbedding + ONNX Attention
    # (opset 23), faster on ONNX Runtime's CPU provider (exporter.fusion); False keeps GQA
    onnx_attention: bool = True


def _check_config(config: ExportConfig) -> Template:
    Pooling.parse(config.pooling)
    if config.opset < MIN_OPSET:
        raise ExportError(f"opset {config.opset} is too old; use --opset {MIN_OPSET} or newer")
    if config.dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype must be 'fp32' or 'fp16', got {config.dtype!r}")
    if config.exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'dynamo' or 'torchscript', got {config.exporter!r}")
    return get_template(config.template)


def source_sha256(source: ModelSource) -> str:
    """sha256 of the weights: the GGUF file, or the weight files of a HF directory combined."""
    from echoembed.artifact import sha256_file

    if source.is_gguf:
        return sha256_file(source.path)
    files = sorted(
        p for p in source.path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _example_batch(encoder: EchoEncoder):
    """Two rows of different lengths so padding and both dynamic axes are exercised."""
    return encoder.encode(["Example sentence for tracing the graph.", "Short one."])


def _model_for_dtype(model, dtype: str):
    """The model to trace: as is for fp32; for fp16 a half-precision copy with eager attention,
    whose softmax runs in fp32 (RMSNorm/LayerNorm upcast internally, the head pools in fp32)."""
    if dtype == "fp32":
        return model
    import copy

    torch = require("torch", "export")
    half = copy.deepcopy(model).to(torch.float16)
    half.set_attn_implementation("eager")
    return half.eval()


def _trace(
    loaded: LoadedModel,
    config: ExportConfig,
    encoder: EchoEncoder,
    path: Path,
    prefix_ids: tuple[int, ...] = (),
) -> None:
    """Trace the model with the pooling head to ``path``; with ``prefix_ids``, the shared-prefix
    module (the prefix's cache baked in; inputs are prompts without the prefix)."""
    torch = require("torch", "export")
    from echoembed.echo import strip_prefix
    from echoembed.exporter.head import EchoEmbeddingModel, PrefixEchoModel, prefix_cache

    base = _model_for_dtype(loaded.model, config.dtype)
    pooling = Pooling.parse(config.pooling)
    if prefix_ids:
        try:
            cache = prefix_cache(base, prefix_ids)
        except (TypeError, AttributeError) as e:
            raise ExportError(
                f"{loaded.architecture} gives no key/value cache to bake a prefix from ({e}); "
                "export without --prefix-reuse"
            ) from e
        module = PrefixEchoModel(base, pooling, config.normalize, cache)
    else:
        module = EchoEmbeddingModel(base, pooling, config.normalize)
    module.eval()
    batch = strip_prefix(_example_batch(encoder), prefix_ids)
    args = tuple(torch.from_numpy(getattr(batch, n)) for n in INPUT_NAMES)
    external = bool(config.external_data) or _param_bytes(base) > PROTOBUF_LIMIT * 0.9
    common = dict(
        input_names=list(INPUT_NAMES),
        output_names=[_TMP_OUTPUT],
        opset_version=config.opset,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if config.exporter == "dynamo":
                dim_b = torch.export.Dim("batch", min=1)
                dim_s = torch.export.Dim("sequence", min=1)
                shapes = {n: {0: dim_b, 1: dim_s} for n in INPUT_NAMES}
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamic_shapes=shapes,
                    dynamo=True,
                    external_data=external,
                    verbose=False,
                    **common,
                )
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES}
                axes[_TMP_OUTPUT] = {0: "batch"}
                torch.onnx.export(
                    module, args, str(path), dynamic_axes=axes, dynamo=False, **common
                )
        except Exception as e:
            raise ExportError(
                f"torch.onnx.export ({config.exporter}) failed for {loaded.architecture}: "
                f"{str(e).splitlines()[0][:400]}; try --exporter "
                f"{'torchscript' if config.exporter == 'dynamo' else 'dynamo'}"
            ) from e


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rename(graph, old: str, new: str) -> None:
    """Rename a value everywhere in ``graph`` (nodes, inputs, outputs, initializers, value_info)."""
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in coll:
            if v.name == old:
                v.name = new


LINEAR_OPS = ("MatMul", "Gemm")


def _module_path(node) -> str | None:
    """The torch module a node came from: dynamo metadata, or a TorchScript '/a/b.0/c/Op' name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip("'\" ") for s in prop.value.strip("[]").split(",")]
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


def _name_linear_nodes(graph) -> None:
    """Name every MatMul/Gemm with a weight initializer ``<module path>/<op>`` (e.g.
    ``base.layers.3.mlp.down_proj/MatMul``), so quantization can address layers and projections."""
    weights = {i.name for i in graph.initializer}
    taken = {n.name for n in graph.node}
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or not any(i in weights for i in node.input[1:]):
            continue
        module = _module_path(node)
        if module is None:
            continue
        name, k = f"{module}/{node.op_type}", 1
        while name in taken and name != node.name:
            name, k = f"{module}/{node.op_type}_{k}", k + 1
        taken.discard(node.name)
        node.name = name
        taken.add(name)


def _finalize_graph(path: Path, external: bool, batch_dim: str = "batch") -> dict[str, int]:
    """Name the output ``embedding`` (renaming any internal value that already has the name),
    check the graph, and save it once, with external data when needed. Returns the graph's
    opset imports, as saved."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    graph = model.graph
    names = {o for node in graph.node for o in node.output} | {i.name for i in graph.initializer}
    if OUTPUT_NAME in names:  # the dynamo exporter names the token-embedding output so
        k = 0
        while f"{OUTPUT_NAME}_internal_{k}" in names:
            k += 1
        _rename(graph, OUTPUT_NAME, f"{OUTPUT_NAME}_internal_{k}")
    _rename(graph, _TMP_OUTPUT, OUTPUT_NAME)
    _name_linear_nodes(graph)
    if [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise InternalError(f"unexpected graph outputs {[o.name for o in graph.output]}")
    dims = graph.output[0].type.tensor_type.shape.dim
    if dims and not dims[0].dim_value:
        dims[0].dim_param = batch_dim
    for f in path.parent.iterdir():
        if f.name != MANIFEST_NAME and f.name.startswith(MODEL_FILE):
            f.unlink()
    if external or model.ByteSize() > PROTOBUF_LIMIT * 0.9:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=MODEL_FILE + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e)[:400]}") from e
    return graph_opset_imports(model)


def _graph_imports(path: Path) -> dict[str, int]:
    onnx = require("onnx", "export")
    return graph_opset_imports(onnx.load(str(path), load_external_data=False))


def _num_layers(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not isinstance(n, int):
        raise InternalError(f"cannot tell the layer count of {loaded.architecture}")
    return n


def _fusion_settings(config: ExportConfig, tolerance: float):
    """What the fused, prefix and attention stages check their graphs with."""
    from echoembed.exporter.fusion import FusionSettings

    return FusionSettings(
        tolerance=tolerance,
        batch_sizes=config.parity.batch_sizes,
        texts=config.parity.texts,
        threads=config.threads,
    )


def _fuse(
    loaded: LoadedModel,
    config: ExportConfig,
    encoder: EchoEncoder,
    model_path: Path,
    tolerance: float,
    progress: Callable[[str], None],
) -> FusionInfo:
    """The fused stage where it applies (``exporter.fusion``), else the recorded reason."""
    from echoembed.exporter.fusion import (
        fuse_stage,
        not_applied,
        sliding_window_reason,
    )

    if not config.fuse:
        return not_applied("not requested (--no-fuse)", requested=False)
    reason = sliding_window_reason(loaded.model.config)
    if config.dtype != "fp32":
        reason = f"{config.dtype} graphs are not fused (they target GPUs and TensorRT)"
    if reason is not None:
        log.info("fusion not applied: %s", reason)
        progress(f"not fused: {reason}")
        return not_applied(reason)
    progress("fusing attention, rotary and RMSNorm for ONNX Runtime ...")
    settings = _fusion_settings(config, tolerance)
    info = fuse_stage(model_path, encoder, _num_layers(loaded), settings)
    if info.applied:
        progress(
            f"fused: {', '.join(f'{k} x{v}' for k, v in info.ops.items())} "
            f"({info.nodes_before} -> {info.nodes_after} nodes, max abs diff vs unfused "
            f"{info.max_abs_diff:.1e})"
        )
    else:
        progress(f"not fused: {info.reason}")
    return info


def _prefix(
    loaded: LoadedModel,
    config: ExportConfig,
    encoder: EchoEncoder,
    ids: tuple[int, ...],
    model_path: Path,
    tolerance: float,
    fusion: FusionInfo,
    progress: Callable[[str], None],
) -> PrefixInfo:
    """The shared-prefix stage (``exporter.prefix``): the fused graph's GroupQueryAttention
    rewritten, or the prefix module traced; checked against the whole-prompt graph."""
    from echoembed.exporter.prefix import gqa_prefix_stage, traced_prefix_stage

    settings = _fusion_settings(config, tolerance)
    if fusion.applied:
        if "GroupQueryAttention" not in fusion.ops:
            raise ExportError(
                f"the fused {loaded.architecture} graph has {', '.join(fusion.ops)} but no "
                "GroupQueryAttention to bake a prefix into; export with --no-fuse --prefix-reuse"
            )
        progress(f"baking the {len(ids)}-token prefix into GroupQueryAttention ...")
        info = gqa_prefix_stage(model_path, encoder, ids, settings)
    else:
        progress(f"tracing with the {len(ids)}-token prefix baked in ...")

        def trace(path: Path) -> None:
            _trace(loaded, config, encoder, path, prefix_ids=ids)
            _finalize_graph(path, external=bool(config.external_data))

        info = traced_prefix_stage(model_path, encoder, ids, settings, trace)
    progress(
        f"prefix {info.text!r} ({len(ids)} tokens, {info.method}): max abs diff vs whole "
        f"prompts {info.max_abs_diff:.1e}"
    )
    return info


def _onnx_attention(
    config: ExportConfig,
    encoder: EchoEncoder,
    model_path: Path,
    tolerance: float,
    fusion: FusionInfo,
    prefix: PrefixInfo | None,
    progress: Callable[[str], None],
) -> FusionInfo:
    """The fused graph's last step (``exporter.fusion.onnx_attention_stage``); returns the
    fusion record with the graph's final ops."""
    from echoembed.exporter.fusion import onnx_attention_stage

    if not (fusion.applied and config.onnx_attention and "GroupQueryAttention" in fusion.ops):
        return fusion
    progress("rewriting GroupQueryAttention as RotaryEmbedding + ONNX Attention (opset 23) ...")
    settings = _fusion_settings(config, tolerance)
    done = onnx_attention_stage(model_path, encoder, settings, () if prefix is None else prefix.ids)
    if isinstance(done, str):
        progress(f"GroupQueryAttention kept: {done}")
        return fusion
    (n, ops, nodes), diff = done
    progress(f"ONNX Attention in {n} layers (max abs diff vs GroupQueryAttention {diff:.1e})")
    return dataclasses.replace(
        fusion,
        ops=ops,
        nodes_after=nodes,
        tool=f"{fusion.tool}; GroupQueryAttention -> RotaryEmbedding + Attention-23",
        max_abs_diff=(fusion.max_abs_diff or 0.0) + diff,  # a bound on fused vs unfused
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"echoembed": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _templates(default: Template) -> tuple[str, tuple[TemplateSpec, ...]]:
    specs = [TemplateSpec(p.name, p.source, dict(p.defaults)) for p in PRESETS.values()]
    if default.name in PRESETS and default.source == PRESETS[default.name].source:
        return default.name, tuple(specs)
    specs.append(TemplateSpec("default", default.source, dict(default.defaults)))
    return "default", tuple(specs)


def _plans(
    loaded: LoadedModel, config: ExportConfig, templates: tuple[TemplateSpec, ...]
) -> tuple[PromptPlan, ...]:
    """The prompt plan of every shipped template, as the runtime will encode it."""
    tpls = [t.to_template() for t in templates]
    return template_plans(
        loaded.tokenizer, loaded.special, tpls, config.max_length, loaded.context_length
    )


def _manifest(
    loaded: LoadedModel,
    config: ExportConfig,
    template: Template,
    root: Path,
    imports: dict[str, int],
    parity,
    fusion: FusionInfo,
    prefix: PrefixInfo | None,
) -> Manifest:
    """The manifest of the artifact being built in ``root`` (every file there is hashed)."""
    default_name, templates = _templates(template)
    return Manifest(
        format_version=FORMAT_VERSION,
        model_file=MODEL_FILE,
        source=SourceInfo(
            name=loaded.source.name, kind=loaded.source.kind, sha256=source_sha256(loaded.source)
        ),
        architecture=loaded.architecture,
        hidden_size=loaded.hidden_size,
        default_template=default_name,
        templates=templates,
        prompt_plans=_plans(loaded, config, templates),
        pooling=Pooling.parse(config.pooling).value,
        normalize=config.normalize,
        max_length=config.max_length,
        context_length=loaded.context_length,
        special_tokens=loaded.special,
        precision=config.dtype,
        opset=imports.get("", config.opset),
        opset_imports=imports,
        requested_opset=config.opset,
        exporter=config.exporter,
        inputs=tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in INPUT_NAMES),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", ("batch", loaded.hidden_size)),),
        files=hash_files(root),
        versions=_versions(),
        parity=parity,
        fusion=fusion,
        prefix=None if prefix is None else dataclasses.replace(prefix, template=default_name),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def export(
    source: str | os.PathLike[str] | LoadedModel,
    out_dir: str | os.PathLike[str],
    config: ExportConfig | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> Artifact:
    """Export ``source`` to an artifact at ``out_dir``.

    ``source`` is what ``ReferenceEmbedder.load`` takes (``smollm2``, a HF directory, a .gguf
    file) or an already loaded model (``ReferenceEmbedder.loaded``), which is not modified.
    """
    config = config or ExportConfig()
    template = _check_config(config)
    out = Path(out_dir)
    check_target(out, config.force)
    if isinstance(source, LoadedModel):
        loaded = source
    else:
        progress(f"loading {source} ...")
        loaded = load_model(resolve_source(source), threads=config.threads)
    arch = get_architecture(loaded.architecture)
    encoder = EchoEncoder(
        loaded.tokenizer,
        loaded.special,
        EncoderConfig(template, max_length=config.max_length, context_length=loaded.context_length),
    )
    prefix_ids: tuple[int, ...] = ()
    if config.prefix_reuse:  # refuse a template without constant leading tokens before tracing
        from echoembed.exporter.prefix import prefix_ids_of

        prefix_ids = prefix_ids_of(encoder)
    with staged_dir(out, force=config.force) as stage:
        model_path = stage.path / MODEL_FILE
        progress(
            f"tracing {arch.family} with the {config.exporter} exporter (opset {config.opset}) ..."
        )
        _trace(loaded, config, encoder, model_path)
        imports = _finalize_graph(model_path, external=bool(config.external_data))
        loaded.tokenizer.save(str(stage.path / TOKENIZER_NAME))
        tolerance = config.parity.tolerance
        if tolerance is None:
            tolerance = arch.parity_tolerance if config.dtype == "fp32" else FP16_TOLERANCE
        fusion = _fuse(loaded, config, encoder, model_path, tolerance, progress)
        prefix = None
        if config.prefix_reuse:
            prefix = _prefix(
                loaded, config, encoder, prefix_ids, model_path, tolerance, fusion, progress
            )
        fusion = _onnx_attention(config, encoder, model_path, tolerance, fusion, prefix, progress)
        if fusion.applied or prefix is not None:
            imports = _graph_imports(model_path)
        progress("checking parity against the PyTorch reference ...")
        parity = check_parity(
            loaded, encoder, model_path, config.parity,
            pooling=config.pooling, tolerance=tolerance, threads=config.threads,
            prefix_ids=() if prefix is None else prefix.ids,
        )  # fmt: skip
        manifest = _manifest(loaded, config, template, stage.path, imports, parity, fusion, prefix)
        atomic_write(stage.path / MANIFEST_NAME, manifest.to_json())
    progress(f"wrote {out}")
    return Artifact(out, manifest)


def export_or_reuse(
    loaded: LoadedModel,
    out_dir: str | os.PathLike[str],
    config: ExportConfig | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[Artifact, bool]:
    """Reuse the artifact at ``out_dir`` when it verifies and matches the source weights, the
    export settings and this echoembed version; otherwise export it again (replacing it)."""
    from echoembed.artifact import read_manifest, verify_files
    from echoembed.errors import ArtifactError

    config = config or ExportConfig()
    out = Path(out_dir)
    if out.exists():
        try:
            m = read_manifest(out)
            verify_files(out, m)
            template = _check_config(config)
            default_name, templates = _templates(template)
            same = (
                m.source.sha256 == source_sha256(loaded.source)
                and m.versions.get("echoembed") == __version__
                and m.pooling == Pooling.parse(config.pooling).value
                and m.normalize == config.normalize
                and m.precision == config.dtype
                and m.requested_opset == config.opset
                and m.max_length == config.max_length
                and m.templates == templates
                and m.default_template == default_name
                and m.prompt_plans == _plans(loaded, config, templates)
                and m.fusion is not None
                and m.fusion.requested == config.fuse
                and (not m.fusion.applied or ("Attention" in m.fusion.ops) == config.onnx_attention)
                and (m.prefix is not None) == config.prefix_reuse
            )
            if same:
                progress(f"reusing {out} (checksums verified)")
                return Artifact(out, m), True
        except ArtifactError as e:
            progress(f"re-exporting {out}: {e}")
    forced = dataclasses.replace(config, force=True)
    return export(loaded, out, forced, progress), False
