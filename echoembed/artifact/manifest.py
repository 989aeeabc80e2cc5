"""The artifact contract: one frozen dataclass, written as ``manifest.json`` beside the model.

Format 5 adds ``prefix`` (shared-prefix reuse, ``PrefixInfo``): the template whose constant
leading token ids are baked into the graph as keys/values; the graph's inputs are then each
prompt *without* those ids (a runner checks and strips them, ``echo.strip_prefix``). ``None``:
the graph takes whole prompts, as in formats 1-4.
Format 4 added ``fusion`` (``FusionInfo``).
Format 3 (this release) adds ``prompt_plans``: per shipped template, its ``echo.PromptPlan``
(fixed piece ids, text slots, pool flags, limits, pad id), so consumers without the template
parser (examples/cpp, services bringing their own runtime) assemble prompts exactly as
``EchoEncoder`` does. Format-1/2 manifests load with no plans.
Format 2 added ``opset_imports`` (every operator domain the saved graph imports,
read from the graph) and ``requested_opset`` (what the export asked for), and types
``special_tokens`` (``SpecialTokens``) and ``quantization.settings`` (the recipe's own frozen
config). Older manifests still load (``format_version`` says which format was read) and are
written back in the current format.
No torch, no onnx: every stage and the runtime read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echoembed.artifact.engine import EngineInfo
from echoembed.artifact.recipes import RecipeConfig, recipe_from_settings, settings_of
from echoembed.echo.encode import SpecialTokens
from echoembed.echo.plan import PromptPlan
from echoembed.echo.template import Template
from echoembed.errors import ArtifactError

FORMAT_VERSION = 5
READABLE_FORMATS = (1, 2, 3, 4, 5)
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
MODEL_FILE = "model.onnx"
OUTPUT_NAME = "embedding"  # the pooled embedding, the graph's one output


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type, shape (str = dynamic axis name)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from."""

    name: str
    kind: str  # bundled | hf_dir | gguf
    sha256: str  # of the weight file(s)


@dataclass(frozen=True)
class TemplateSpec:
    """A template shipped with the artifact (its source and default variables)."""

    name: str
    source: str
    defaults: dict[str, str] = field(default_factory=dict)

    def to_template(self) -> Template:
        """The parsed template (raises TemplateError when the source is malformed)."""
        return Template(self.source, name=self.name, defaults=self.defaults)


@dataclass(frozen=True)
class ParityReport:
    """How the artifact compared with the PyTorch reference at export time."""

    reference: str  # what it was compared against
    max_abs_diff: float
    min_cosine: float
    tolerance: float  # on max_abs_diff
    batch_sizes: tuple[int, ...]
    num_texts: int
    passed: bool


@dataclass(frozen=True)
class QuantizationInfo:
    """How a quantized artifact was derived from its fp32 parent, and what it cost in accuracy."""

    recipe: str  # e.g. int8-dynamic, int4-hqq
    settings: RecipeConfig  # the recipe's own frozen config, as applied to the graph
    parent_sha256: str  # sha256 of the fp32 parent's model file
    calibration_source: str
    calibration_sha256: str
    calibration_texts: int
    excluded: tuple[str, ...]  # linear nodes kept in float
    smoothed: tuple[str, ...]  # modules rewritten by SmoothQuant
    eval_texts: int
    mean_cosine: float  # vs the fp32 parent on held-out texts
    min_cosine: float
    max_drop: float | None  # the accuracy budget, in units of `metric`, if any
    within_budget: bool
    metric: str = "cosine"  # what max_drop limits: mean cosine drop or STS Spearman points
    sts_source: str | None = None  # STS file the Spearman figures were measured on
    sts_pairs: int = 0
    sts_spearman: float | None = None  # x100, this artifact
    parent_sts_spearman: float | None = None  # x100, the fp32 parent, same pairs


@dataclass(frozen=True)
class FusionInfo:
    """The fused export stage (``exporter.fusion``): whether ORT's fused kernels are in the graph,
    and if not, why."""

    requested: bool
    applied: bool
    reason: str  # why it was not applied ("" when it was)
    tool: str  # e.g. "onnxscript 0.7.2 optimize_for_ort"
    # fused op -> count in the graph: ORT contrib ops, and ONNX ``Attention`` (opset 23) where
    # the last step rewrote GroupQueryAttention (exporter.fusion.to_onnx_attention)
    ops: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    max_abs_diff: float | None = None  # fused vs unfused graph, normalized embeddings
    # GroupQueryAttention takes each row's length from attention_mask: exact for right-padded
    # batches (every echoembed encoder pads on the right), not for left padding
    requires_right_padding: bool = False


@dataclass(frozen=True)
class PrefixInfo:
    """Shared-prefix reuse (format 5): the constant leading tokens of ``template`` computed once
    at export time and baked into the graph as keys/values. The graph's inputs are each prompt
    without these ``ids``: every consumer encodes as usual, checks that each row starts with
    them, and drops them (``echo.strip_prefix``; examples/cpp and Triton's tokenizer do the
    same). Only templates whose prompts start with these ids can use the artifact."""

    template: str  # the template the prefix was taken from (the artifact's default)
    text: str  # the prefix decoded, for messages (e.g. "<|im_start|>Rewrite the sentence:")
    ids: tuple[int, ...]
    # how the keys/values were made: "gqa-capture" (the fused graph's own GroupQueryAttention
    # inputs at the prefix positions, concatenated in front of each call) or "torch-cache"
    # (the PyTorch model's cache of the prefix, traced in as past keys/values)
    method: str
    max_abs_diff: float | None = None  # vs the same graph without prefix reuse, normalized

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        if not self.ids:
            raise ValueError("a baked prefix has at least one token")

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Manifest:
    """Everything a runner needs to use an artifact, and where it came from."""

    format_version: int
    model_file: str
    source: SourceInfo
    architecture: str
    hidden_size: int
    default_template: str
    templates: tuple[TemplateSpec, ...]
    pooling: str
    normalize: bool
    max_length: int | None
    context_length: int | None
    special_tokens: SpecialTokens
    precision: str
    opset: int  # the default ("ai.onnx") domain's opset the saved graph imports
    exporter: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]  # relative path -> sha256, every file but the manifest
    versions: dict[str, str]
    parity: ParityReport | None = None
    created: str = ""
    quantization: QuantizationInfo | None = None
    opset_imports: dict[str, int] = field(default_factory=dict)  # domain -> version ("" = ai.onnx)
    requested_opset: int | None = None  # what the export asked for (the graph may import newer)
    prompt_plans: tuple[PromptPlan, ...] = ()  # one per template this tokenizer can encode
    engine: EngineInfo | None = None  # engine artifacts only: the TensorRT plan's contract
    fusion: FusionInfo | None = None  # format 4: the fused export stage (None: not recorded)
    prefix: PrefixInfo | None = None  # format 5: baked shared prefix (None: whole prompts)

    def template(self, name: str) -> TemplateSpec | None:
        return next((t for t in self.templates if t.name == name), None)

    def plan(self, name: str) -> PromptPlan | None:
        """The recorded prompt plan of template ``name`` (None: not recorded)."""
        return next((p for p in self.prompt_plans if p.template == name), None)

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """The ids a runner strips from every row before feeding the graph (() for none)."""
        return () if self.prefix is None else self.prefix.ids

    @property
    def output_name(self) -> str:
        """The graph output a runner fetches (``embedding``)."""
        return self.outputs[0].name

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, always in the current format (a manifest read from an older format is
        written back in the current one, with what it recorded)."""
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        if self.quantization is not None:  # asdict keeps tuples; JSON wants lists either way
            d["quantization"]["settings"] = settings_of(self.quantization.settings)
        if self.engine is not None:
            d["engine"] = self.engine.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(
                f"{where}: no integer format_version; this is not an echoembed artifact"
            )
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: artifact format version {version} is newer than this echoembed "
                f"understands ({FORMAT_VERSION}); upgrade echoembed (pip install -U echoembed)"
            )
        if version not in READABLE_FORMATS:
            raise ArtifactError(f"{where}: unknown artifact format version {version}; re-export")
        try:
            d = dict(data)  # format_version stays as read; to_dict writes the current one
            d["special_tokens"] = SpecialTokens(**d["special_tokens"])
            d["source"] = SourceInfo(**d["source"])
            d["templates"] = tuple(TemplateSpec(**t) for t in d["templates"])
            d["inputs"] = tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]
            )
            d["outputs"] = tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]
            )
            if d.get("parity") is not None:
                p = dict(d["parity"])
                p["batch_sizes"] = tuple(p["batch_sizes"])
                d["parity"] = ParityReport(**p)
            if d.get("quantization") is not None:
                q = dict(d["quantization"])
                q["excluded"] = tuple(q["excluded"])
                q["smoothed"] = tuple(q["smoothed"])
                q["settings"] = recipe_from_settings(q["recipe"], q["settings"])
                d["quantization"] = QuantizationInfo(**q)
            if version == 1:  # format 1 recorded the requested opset only
                d.setdefault("opset_imports", {"": d["opset"]})
                d.setdefault("requested_opset", d["opset"])
            d["opset_imports"] = {str(k): int(v) for k, v in d["opset_imports"].items()}
            if version < 3:  # formats 1 and 2 recorded no prompt plans
                d.setdefault("prompt_plans", [])
            d["prompt_plans"] = tuple(PromptPlan.from_dict(p) for p in d["prompt_plans"])
            if d.get("engine") is not None:
                d["engine"] = EngineInfo.from_dict(d["engine"])
            if d.get("fusion") is not None:
                d["fusion"] = FusionInfo(**d["fusion"])
            if d.get("prefix") is not None:
                d["prefix"] = PrefixInfo(**d["prefix"])
            return cls(**d)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({e}); re-export the artifact") from e


@dataclass(frozen=True)
class Artifact:
    """A finished artifact directory and its manifest (what export and quantize return)."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def graph_opset_imports(model) -> dict[str, int]:
    """Every operator domain an ``onnx.ModelProto`` imports, with its version (``""`` is the
    default domain), as a manifest records it. Reads the proto; does not import onnx."""
    return {
        ("" if imp.domain == "ai.onnx" else imp.domain): int(imp.version)
        for imp in model.opset_import
    }


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def read_manifest(artifact_dir: str | os.PathLike[str]) -> Manifest:
    """Read ``manifest.json`` (no checksum verification)."""
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory; pass an artifact directory")
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: not an echoembed artifact (create one with "
            "`echoembed export MODEL OUT`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
    return Manifest.from_dict(data, where=str(path))


def verify_files(root: Path, manifest: Manifest, only: Iterable[str] | None = None) -> None:
    """Every file listed in the manifest (or those of ``only`` it lists) exists and has its
    recorded sha256."""
    wanted = None if only is None else set(only)
    for rel, expected in manifest.files.items():
        if wanted is not None and rel not in wanted:
            continue
        p = root / rel
        if not p.is_file():
            raise ArtifactError(
                f"{root}: file {rel} listed in the manifest is missing; copy the whole artifact "
                "directory or re-export it"
            )
        actual = sha256_file(p)
        if actual != expected:
            raise ArtifactError(
                f"{root}: checksum mismatch for {rel} (expected sha256 {expected[:12]}..., got "
                f"{actual[:12]}...): the file is corrupt or was modified; re-export or re-copy it"
            )


def describe(manifest: Manifest) -> str:
    """A human-readable summary of a manifest (for `echoembed inspect`)."""
    m = manifest
    lines = [
        f"format version   {m.format_version}",
        f"source           {m.source.name} ({m.source.kind}, sha256 {m.source.sha256[:16]}...)",
        f"architecture     {m.architecture}, hidden size {m.hidden_size}",
        f"precision        {m.precision}, opset {m.opset}, exporter {m.exporter}",
        "opset imports    "
        + ", ".join(f"{k or 'ai.onnx'} {v}" for k, v in sorted(m.opset_imports.items())),
        f"pooling          {m.pooling}, normalize {m.normalize}",
        f"template         {m.default_template} (default); available: "
        + ", ".join(t.name for t in m.templates),
        f"lengths          max_length per piece {m.max_length}, context {m.context_length}",
        "prompt plans     "
        + (
            ", ".join(p.template for p in m.prompt_plans)
            if m.prompt_plans
            else "none (an older format: re-export for examples/cpp)"
        ),
        "inputs           " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs),
        *(
            [
                f"engine           TensorRT {m.engine.tensorrt_version}, {m.engine.device_name} "
                f"(compute capability {m.engine.compute_capability}), profiles "
                + " ".join(p.spec() for p in m.engine.profiles)
                + f", version-compatible {m.engine.version_compatible}, hardware "
                f"{m.engine.hardware_compatibility}"
            ]
            if m.engine is not None
            else []
        ),
        "outputs          " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.outputs),
    ]
    if m.fusion is not None:
        f = m.fusion
        lines.append(
            "fusion           "
            + (
                ", ".join(f"{k} x{v}" for k, v in f.ops.items())
                + f" ({f.nodes_before} -> {f.nodes_after} nodes, max abs diff vs unfused "
                f"{f.max_abs_diff:.1e}; {f.tool})"
                if f.applied
                else f"not applied: {f.reason}"
            )
        )
    if m.prefix is not None:
        x = m.prefix
        lines.append(
            f"prefix           {x.length} tokens of template {x.template!r} baked in ({x.text!r}, "
            f"{x.method}"
            + ("" if x.max_abs_diff is None else f", max abs diff vs whole prompts "
               f"{x.max_abs_diff:.1e}")
            + "); inputs are prompts without them"
        )  # fmt: skip
    if m.parity is not None:
        p = m.parity
        lines.append(
            f"parity           vs {p.reference}: max abs diff {p.max_abs_diff:.2e}, min cosine "
            f"{p.min_cosine:.7f} (tolerance {p.tolerance:.0e}, batch sizes {list(p.batch_sizes)}, "
            f"{p.num_texts} texts)"
        )
    lines.append("files            " + ", ".join(f"{k} ({v[:12]}...)" for k, v in m.files.items()))
    lines.append("versions         " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    if m.quantization is not None:
        q = m.quantization
        lines.append(
            f"quantization     {q.recipe}: mean/min cosine vs fp32 {q.mean_cosine:.5f}/"
            f"{q.min_cosine:.5f} on {q.eval_texts} held-out texts; {len(q.excluded)} layers kept "
            f"in float, {len(q.smoothed)} smoothed; calibration {q.calibration_texts} texts from "
            f"{q.calibration_source}"
        )
        if q.sts_spearman is not None:
            lines.append(
                f"sts spearman     {q.sts_spearman:.2f} vs fp32 {q.parent_sts_spearman:.2f} on "
                f"{q.sts_pairs} pairs of {q.sts_source}"
            )
        if q.max_drop is not None:
            lines.append(
                f"budget           max drop {q.max_drop:g} ({q.metric}): "
                + ("within" if q.within_budget else "MISSED (written with --allow-over-budget)")
            )
    lines.append(f"created          {m.created}")
    return "\n".join(lines)
