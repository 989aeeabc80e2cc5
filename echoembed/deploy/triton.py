"""Triton model repositories from an artifact: ``echo_tokenizer`` -> ``echo_encoder`` ->
``echo_embedder`` (the ensemble clients call: ``text`` [+ ``template``] in, ``embedding`` out).

The repository is self-contained and relocatable: every file a model needs (tokenizer, manifest,
model, plans) is copied into its version directory, the Python models are shipped with echoembed
(``triton_models/``) and import ``echoembed`` from the server's Python environment, and no config
holds an absolute path. ``encoder`` picks how ``echo_encoder`` runs:

- ``python``: ``echoembed.runtime`` (the artifact's ORT session) in Triton's Python backend; its
  inputs allow ragged batches, so a dynamic batch of different-length requests is padded and run
  as ONE ONNX Runtime batch; the output is L2-normalized as ``Embedder.encode`` returns it;
- ``onnxruntime``: Triton's ``onnxruntime_onnx`` backend on the artifact's ``model.onnx`` (with
  ``tensorrt_accelerator``: its TensorRT execution accelerator); requests of equal length batch;
- ``tensorrt``: ``tensorrt_plan`` with ``cc_model_filenames`` (one plan per GPU compute
  capability); needs TensorRT engines, which come with engine artifacts (``build-engine``).

A prefix-reuse artifact (``manifest.prefix``, format 5) has its template's constant leading ids
baked into the graph, which then takes prompts without them. ``echo_tokenizer`` emits what
``echo_encoder`` takes: for ``onnxruntime`` and ``tensorrt`` (the graph itself) the prompts without
the prefix (its ``strip_prefix`` parameter is ``"true"``), for ``python`` the whole prompts, which
``echoembed.runtime`` checks and strips as ``Embedder.encode`` does. Templates whose prompts do not
start with the prefix are refused per request (INVALID_ARG).

Every model has dynamic batching. Configs are written as protobuf text; the tests parse each one
with Triton's own ``ModelConfig`` schema.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import echoembed
from echoembed.artifact import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    atomic_write,
    read_manifest,
    staged_dir,
    verify_files,
)
from echoembed.deploy.models import ARTIFACT_SUBDIR
from echoembed.echo import INPUT_NAMES
from echoembed.errors import ArtifactError, DeployError

TOKENIZER_MODEL = "echo_tokenizer"
ENCODER_MODEL = "echo_encoder"
ENSEMBLE_MODEL = "echo_embedder"
MODEL_NAMES = (TOKENIZER_MODEL, ENCODER_MODEL, ENSEMBLE_MODEL)
ENCODERS = ("python", "onnxruntime", "tensorrt")
VERSION = "1"

_DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32",
           "float16": "TYPE_FP16"}  # fmt: skip
_CC = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class TritonRepoConfig:
    """What ``write_triton_repo`` writes, from which artifact, and how it batches."""

    artifact: Path  # an ONNX artifact directory (`echoembed export` / `quantize`)
    out: Path  # the model repository to create
    encoder: Literal["python", "onnxruntime", "tensorrt"] = "python"
    max_batch: int = 32  # rows per dynamic batch (every model)
    instances: int = 1  # instances of each model
    max_queue_delay_us: int = 2000  # how long a request may wait for batch-mates
    tensorrt_accelerator: bool = False  # onnxruntime: TensorRT execution accelerator (GPU)
    tensorrt_plans: Mapping[str, str | Path] | None = None  # tensorrt: compute capability -> plan
    max_text_bytes: int = 131072  # echo_tokenizer: UTF-8 bytes per text, else INVALID_ARG
    custom_templates: bool = False  # echo_tokenizer: accept template strings, not only names
    threads: int | None = None  # python encoder: ONNX Runtime intra-op threads (None: all)
    force: bool = False  # replace an existing repository


def _check_config(config: TritonRepoConfig) -> None:
    if config.encoder not in ENCODERS:
        raise DeployError(f"unknown encoder {config.encoder!r}; choose one of {list(ENCODERS)}")
    for name in ("max_batch", "instances", "max_text_bytes"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise DeployError(f"{name} must be a whole number >= 1, got {value!r}")
    if not isinstance(config.max_queue_delay_us, int) or config.max_queue_delay_us < 0:
        raise DeployError(f"max_queue_delay_us must be >= 0, got {config.max_queue_delay_us!r}")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise DeployError(f"threads must be >= 1 or None, got {config.threads!r}")
    if config.tensorrt_accelerator and config.encoder != "onnxruntime":
        raise DeployError("tensorrt_accelerator applies to --encoder onnxruntime only")
    if config.encoder != "tensorrt" and config.tensorrt_plans is not None:
        raise DeployError("tensorrt_plans applies to --encoder tensorrt only")


def _q(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensor(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    dims_s = ", ".join(str(d) for d in dims)
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {dims_s} ]{extra} }}"


def _tensors(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: Mapping[str, str]) -> str:
    return "".join(
        f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n"
        for k, v in params.items()
    )


def _header(name: str, kind: str, max_batch: int) -> str:
    return f"name: {_q(name)}\n{kind}\nmax_batch_size: {max_batch}\n"


def _batching(config: TritonRepoConfig) -> str:
    return f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}\n"


def _instances(config: TritonRepoConfig, kind: str) -> str:
    return f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]\n"


def _text_inputs() -> str:
    return _tensors(
        "input",
        [
            _tensor("text", "TYPE_STRING", [1]),
            _tensor("template", "TYPE_STRING", [1], " optional: true"),
        ],
    )


def _graph_inputs(manifest: Manifest) -> list[tuple[str, str]]:
    """(name, Triton dtype) of the graph inputs the echo contract feeds."""
    out = []
    for t in manifest.inputs:
        if t.name not in INPUT_NAMES:
            raise ArtifactError(
                f"the artifact's graph input {t.name!r} is not one of {list(INPUT_NAMES)}; "
                "re-export it with `echoembed export`"
            )
        out.append((t.name, _dtype(t.dtype)))
    return out


def _dtype(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise ArtifactError(f"tensor type {dtype!r} has no Triton type this writer knows")
    return _DTYPES[dtype]


def strips_prefix(config: TritonRepoConfig, manifest: Manifest | None) -> bool:
    """Whether ``echo_tokenizer`` drops the artifact's baked prefix from its outputs: when
    ``echo_encoder`` is the graph itself (``onnxruntime``, ``tensorrt``); the ``python`` encoder
    takes whole prompts and strips them in ``echoembed.runtime``."""
    return manifest is not None and manifest.prefix is not None and config.encoder != "python"


def tokenizer_config(config: TritonRepoConfig, manifest: Manifest | None = None) -> str:
    """``echo_tokenizer``'s config.pbtxt (Python backend); ``manifest``: the artifact's, which
    decides ``strip_prefix`` (None: no prefix)."""
    out = [_tensor(n, "TYPE_INT64", [-1]) for n in INPUT_NAMES]
    params = {
        "max_text_bytes": str(config.max_text_bytes),
        "custom_templates": "true" if config.custom_templates else "false",
        "strip_prefix": "true" if strips_prefix(config, manifest) else "false",
        "echoembed_version": echoembed.__version__,
    }
    return (
        _header(TOKENIZER_MODEL, 'backend: "python"', config.max_batch)
        + _text_inputs()
        + _tensors("output", out)
        + _instances(config, "KIND_CPU")
        + _batching(config)
        + _parameters(params)
    )


def encoder_config(
    config: TritonRepoConfig, manifest: Manifest, plans: Mapping[str, str] | None = None
) -> str:
    """``echo_encoder``'s config.pbtxt for ``config.encoder``; ``plans`` (tensorrt): compute
    capability (e.g. "8.9") -> plan file name inside the version directory."""
    hidden = int(manifest.hidden_size)
    inputs = _graph_inputs(manifest)
    if config.encoder == "python":
        ins = [_tensor(n, "TYPE_INT64", [-1], " allow_ragged_batch: true") for n, _ in inputs]
        params = {"echoembed_version": echoembed.__version__}
        if config.threads is not None:
            params["threads"] = str(config.threads)
        return (
            _header(ENCODER_MODEL, 'backend: "python"', config.max_batch)
            + _tensors("input", ins)
            + _tensors("output", [_tensor("embedding", "TYPE_FP32", [hidden])])
            + _instances(config, "KIND_CPU")
            + _batching(config)
            + _parameters(params)
        )
    ins = [_tensor(n, t, [-1]) for n, t in inputs]
    out = _tensor(manifest.output_name, _dtype(manifest.outputs[0].dtype), [hidden])
    if config.encoder == "onnxruntime":
        head = _header(ENCODER_MODEL, 'platform: "onnxruntime_onnx"', config.max_batch)
        if manifest.model_file != "model.onnx":
            head += f"default_model_filename: {_q(manifest.model_file)}\n"
        kind = "KIND_GPU" if config.tensorrt_accelerator else "KIND_AUTO"
        extra = _trt_accelerator(manifest) if config.tensorrt_accelerator else ""
    else:
        if not plans:
            raise DeployError("a tensorrt encoder needs at least one plan (compute capability)")
        head = _header(ENCODER_MODEL, 'platform: "tensorrt_plan"', config.max_batch)
        head += "".join(
            f"cc_model_filenames {{ key: {_q(cc)} value: {_q(f)} }}\n"
            for cc, f in sorted(plans.items())
        )
        kind = "KIND_GPU"
        extra = ""
    return (
        head
        + _tensors("input", ins)
        + _tensors("output", [out])
        + _instances(config, kind)
        + _batching(config)
        + extra
    )


def _trt_accelerator(manifest: Manifest) -> str:
    precision = "FP16" if manifest.precision == "fp16" else "FP32"
    return (
        "optimization { execution_accelerators {\n"
        '  gpu_execution_accelerator : [ { name : "tensorrt"\n'
        f'    parameters {{ key: "precision_mode" value: "{precision}" }}\n'
        '    parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
        '    parameters { key: "trt_engine_cache_enable" value: "true" } } ]\n'
        "} }\n"
    )


def ensemble_config(config: TritonRepoConfig, manifest: Manifest) -> str:
    """``echo_embedder``: the ensemble clients call."""
    names = [n for n, _ in _graph_inputs(manifest)]
    tok_out = "".join(f"      output_map {{ key: {_q(n)} value: {_q(n)} }}\n" for n in INPUT_NAMES)
    enc_in = "".join(f"      input_map {{ key: {_q(n)} value: {_q(n)} }}\n" for n in names)
    out = manifest.output_name
    return (
        _header(ENSEMBLE_MODEL, 'platform: "ensemble"', config.max_batch)
        + _text_inputs()
        + _tensors("output", [_tensor("embedding", "TYPE_FP32", [int(manifest.hidden_size)])])
        + "ensemble_scheduling { step [\n"
        + f"    {{ model_name: {_q(TOKENIZER_MODEL)} model_version: -1\n"
        + '      input_map { key: "text" value: "text" }\n'
        + '      input_map { key: "template" value: "template" }\n'
        + tok_out
        + "    },\n"
        + f"    {{ model_name: {_q(ENCODER_MODEL)} model_version: -1\n"
        + enc_in
        + f'      output_map {{ key: {_q(out)} value: "embedding" }}\n'
        + "    }\n] }\n"
    )


def _python_model(name: str) -> str:
    return (
        resources.files("echoembed.deploy")
        .joinpath("triton_models", f"{name}.py")
        .read_text(encoding="utf-8")
    )


def _copy_artifact(src: Path, manifest: Manifest, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for rel in names:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
    shutil.copyfile(src / MANIFEST_NAME, dest / MANIFEST_NAME)


def _plans(config: TritonRepoConfig, manifest: Manifest) -> dict[str, Path]:
    if config.tensorrt_plans is None:
        kind = "an ONNX artifact" if manifest.model_file.endswith(".onnx") else "not an engine"
        raise DeployError(
            f"--encoder tensorrt needs an engine artifact (TensorRT plans per GPU compute "
            f"capability, built by the coming `echoembed build-engine`); {config.artifact} is "
            f"{kind}. Serve it with --encoder python or --encoder onnxruntime (optionally with "
            "its TensorRT accelerator) until then"
        )
    plans = {}
    for cc, path in config.tensorrt_plans.items():
        if not isinstance(cc, str) or not _CC.match(cc):
            raise DeployError(f"compute capability keys look like '8.9', got {cc!r}")
        p = Path(path)
        if not p.is_file():
            raise DeployError(f"TensorRT plan for compute capability {cc} not found: {p}")
        plans[cc] = p
    if not plans:
        raise DeployError("tensorrt_plans is empty: give at least one compute capability -> plan")
    return plans


def write_triton_repo(config: TritonRepoConfig) -> Path:
    """Write the model repository (atomically: built beside ``config.out``, then renamed)."""
    _check_config(config)
    src = Path(config.artifact)
    manifest = read_manifest(src)
    files = sorted(manifest.files)
    if config.encoder != "python" and not manifest.normalize:
        raise DeployError(
            f"{src} was exported without normalization, and the {config.encoder} encoder returns "
            "the graph output as is; re-export it normalized or use --encoder python"
        )
    plans = _plans(config, manifest) if config.encoder == "tensorrt" else None
    if TOKENIZER_NAME not in files:
        raise ArtifactError(f"{src}: the manifest lists no {TOKENIZER_NAME}; re-export it")

    def verify(stage: Path) -> None:
        """Every copied file has the checksum the artifact's manifest records."""
        tok_copy = stage / TOKENIZER_MODEL / VERSION / ARTIFACT_SUBDIR
        verify_files(tok_copy, _only(manifest, [TOKENIZER_NAME]))
        if config.encoder == "python":
            verify_files(stage / ENCODER_MODEL / VERSION / ARTIFACT_SUBDIR, manifest)
        elif config.encoder == "onnxruntime":
            verify_files(stage / ENCODER_MODEL / VERSION, manifest)

    with staged_dir(config.out, force=config.force, verify=verify) as stage:
        root = stage.path
        tok = root / TOKENIZER_MODEL
        _copy_artifact(src, manifest, tok / VERSION / ARTIFACT_SUBDIR, [TOKENIZER_NAME])
        atomic_write(tok / VERSION / "model.py", _python_model("tokenizer"))
        atomic_write(tok / "config.pbtxt", tokenizer_config(config, manifest))

        enc = root / ENCODER_MODEL
        plan_names = None
        if config.encoder == "python":
            _copy_artifact(src, manifest, enc / VERSION / ARTIFACT_SUBDIR, files)
            atomic_write(enc / VERSION / "model.py", _python_model("encoder"))
        elif config.encoder == "onnxruntime":
            _copy_artifact(src, manifest, enc / VERSION, files)
        else:
            (enc / VERSION).mkdir(parents=True)
            plan_names = {}
            for cc, plan in (plans or {}).items():
                plan_names[cc] = f"model.sm{cc.replace('.', '')}.plan"
                shutil.copyfile(plan, enc / VERSION / plan_names[cc])
            shutil.copyfile(src / MANIFEST_NAME, enc / VERSION / MANIFEST_NAME)
        atomic_write(enc / "config.pbtxt", encoder_config(config, manifest, plan_names))

        ens = root / ENSEMBLE_MODEL
        (ens / VERSION).mkdir(parents=True)
        atomic_write(ens / "config.pbtxt", ensemble_config(config, manifest))
    return Path(config.out)


def _only(manifest: Manifest, names: list[str]) -> Manifest:
    """The manifest restricted to ``names`` (the tokenizer's copy holds only its tokenizer)."""
    return dataclasses.replace(
        manifest, files={k: v for k, v in manifest.files.items() if k in names}
    )
