"""The TensorRT side of the artifact contract: optimization profiles and engine compatibility.

Pure data and decisions (stdlib only), shared by the engine builder (``echoembed.engines``), the
runtime's TensorRT runner and ONNX Runtime's TensorRT provider options, and tested on any
machine.

- ``Profile``: one TensorRT optimization profile over the three graph inputs, all
  ``[batch, seq]``: ``min``/``opt``/``max`` as ``(batch, seq)`` pairs. ``parse_profile`` reads the
  CLI form ``B_MIN,S_MIN:B_OPT,S_OPT:B_MAX,S_MAX``; ``choose_profile`` picks the profile a batch
  runs under (the smallest that holds it) or raises ``InputError`` naming the limits.
- ``EngineInfo``: what an engine artifact's manifest records about its plan (TensorRT version,
  GPU, compute capability, profiles, compatibility flags). ``check_engine_compatible`` compares
  it with the running TensorRT and GPU *before* deserializing (TensorRT itself only returns
  ``None`` from ``deserialize_cuda_engine`` after logging "...please rebuild").

Compatibility rules (NVIDIA TensorRT docs, "Version Compatibility" 10.16 and "Engine
Compatibility" 11.1, read 2026-12-02):

- by default a plan runs only on the TensorRT version that built it, and only on GPUs of the
  compute capability it was built for;
- ``version_compatible`` (``BuilderFlag.VERSION_COMPATIBLE``, TensorRT >= 8.6): the plan runs on
  the same or a later runtime of the same major version, and across majors 8 -> 10 and 10 -> 11
  only; never on an older runtime (the runtime must also set ``engine_host_code_allowed``);
- hardware compatibility ``ampere+`` (``HardwareCompatibilityLevel.AMPERE_PLUS``): any GPU of
  compute capability 8.0 or newer; ``same-cc`` (``SAME_COMPUTE_CAPABILITY``): any GPU of the
  build GPU's compute capability.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from echoembed.errors import ArtifactError, InputError

PLAN_FILE = "model.plan"
HARDWARE_LEVELS = ("none", "ampere+", "same-cc")
# Cross-major runs TensorRT supports for version-compatible plans: (built with, running).
_CROSS_MAJOR = frozenset({(8, 10), (10, 11)})
_PAIR = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ``(batch, seq)`` at min, opt and max, for every input."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
                raise InputError(
                    f"profile {name} must be (batch, seq) with whole numbers >= 1, got {value!r}"
                )
            object.__setattr__(self, name, value)
        for axis, label in ((0, "batch"), (1, "sequence")):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            if not lo <= mid <= hi:
                raise InputError(
                    f"profile {self.spec()}: {label} must satisfy min <= opt <= max, got "
                    f"{lo}, {mid}, {hi}"
                )

    def holds(self, batch: int, seq: int) -> bool:
        """Whether a ``[batch, seq]`` input lies inside this profile."""
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= seq <= self.max[1]

    def spec(self) -> str:
        """The CLI form, ``B,S:B,S:B,S``."""
        return ":".join(f"{b},{s}" for b, s in (self.min, self.opt, self.max))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))  # type: ignore[arg-type]


# Batch 1..32 around 32 x 128 tokens, up to 512 tokens: an echo prompt of a ~250-token text.
DEFAULT_PROFILE = Profile((1, 1), (32, 128), (32, 512))


def parse_profile(text: str) -> Profile:
    """``B_MIN,S_MIN:B_OPT,S_OPT:B_MAX,S_MAX`` -> ``Profile`` (InputError naming the form)."""
    parts = str(text).split(":")
    pairs = [_PAIR.match(p) for p in parts]
    if len(parts) != 3 or not all(pairs):
        raise InputError(
            f"profile {text!r} is not B_MIN,S_MIN:B_OPT,S_OPT:B_MAX,S_MAX (batch and sequence "
            "at min, opt and max; e.g. 1,1:32,128:32,512)"
        )
    lo, mid, hi = ((int(m.group(1)), int(m.group(2))) for m in pairs if m)
    return Profile(lo, mid, hi)


def choose_profile(profiles: Sequence[Profile], batch: int, seq: int) -> int:
    """The index of the profile a ``[batch, seq]`` batch runs under: the smallest (by max batch
    x max seq) that holds it. ``InputError`` naming every profile's limits when none does."""
    fits = [i for i, p in enumerate(profiles) if p.holds(batch, seq)]
    if not fits:
        limits = "; ".join(
            f"#{i}: batch {p.min[0]}-{p.max[0]}, sequence {p.min[1]}-{p.max[1]}"
            for i, p in enumerate(profiles)
        )
        raise InputError(
            f"a batch of {batch} prompts x {seq} tokens is outside every optimization profile of "
            f"this engine ({limits}); use a smaller batch_size, a max_length, or rebuild the "
            "engine with a larger --profile"
        )
    return min(fits, key=lambda i: (profiles[i].max[0] * profiles[i].max[1], i))


def ort_profile_options(profiles: Sequence[Profile], inputs: Sequence[str]) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options for explicit profiles: ``trt_profile_min_shapes``
    / ``_opt_`` / ``_max_`` as ``"input_ids:1x1,attention_mask:1x1,..."``, every input listed
    once per profile, in profile order."""
    if not profiles:
        raise InputError("at least one optimization profile is needed")
    out = {}
    for key in ("min", "opt", "max"):
        out[f"trt_profile_{key}_shapes"] = ",".join(
            f"{name}:{getattr(p, key)[0]}x{getattr(p, key)[1]}" for p in profiles for name in inputs
        )
    return out


def _version_tuple(version: str, what: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(version))
    if not nums:
        raise ArtifactError(f"{what} {version!r} is not a TensorRT version such as 10.13.0")
    return tuple(int(n) for n in nums[:3])


def _cc_tuple(cc: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(cc))
    if not m:
        raise ArtifactError(f"{what} {cc!r} is not a compute capability such as 8.9")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class EngineInfo:
    """What an engine artifact's manifest records about its TensorRT plan."""

    tensorrt_version: str  # of the builder, e.g. "10.13.0.35"
    device_name: str  # the build GPU, e.g. "NVIDIA H200"
    compute_capability: str  # the build GPU's, e.g. "9.0"
    profiles: tuple[Profile, ...]
    precision: str  # what the graph asks for: fp32, fp16, int8 (Q/DQ), int4 (Q/DQ)
    plan_file: str = PLAN_FILE
    version_compatible: bool = False
    hardware_compatibility: str = "none"  # none | ampere+ | same-cc
    source_files: dict[str, str] = field(default_factory=dict)  # the ONNX artifact's checksums

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if not self.profiles:
            raise ArtifactError("an engine records at least one optimization profile")
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise ArtifactError(
                f"unknown hardware compatibility {self.hardware_compatibility!r}; expected one "
                f"of {list(HARDWARE_LEVELS)}"
            )
        _version_tuple(self.tensorrt_version, "the engine's TensorRT version")
        _cc_tuple(self.compute_capability, "the engine's compute capability")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.tensorrt_version,
            "device_name": self.device_name,
            "compute_capability": self.compute_capability,
            "profiles": [p.to_dict() for p in self.profiles],
            "precision": self.precision,
            "plan_file": self.plan_file,
            "version_compatible": self.version_compatible,
            "hardware_compatibility": self.hardware_compatibility,
            "source_files": dict(self.source_files),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineInfo:
        try:
            return cls(
                tensorrt_version=str(d["tensorrt_version"]),
                device_name=str(d["device_name"]),
                compute_capability=str(d["compute_capability"]),
                profiles=tuple(Profile.from_dict(p) for p in d["profiles"]),
                precision=str(d["precision"]),
                plan_file=str(d.get("plan_file", PLAN_FILE)),
                version_compatible=bool(d.get("version_compatible", False)),
                hardware_compatibility=str(d.get("hardware_compatibility", "none")),
                source_files=dict(d.get("source_files", {})),
            )
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise ArtifactError(f"malformed engine section in the manifest ({e})") from e


def _version_problem(info: EngineInfo, running: str) -> str | None:
    built = _version_tuple(info.tensorrt_version, "the engine's TensorRT version")
    run = _version_tuple(running, "the running TensorRT version")
    if not info.version_compatible:
        if built != run:
            return (
                f"it was built with TensorRT {info.tensorrt_version} and this is TensorRT "
                f"{running}; a plan runs only on the TensorRT that built it unless built with "
                "--version-compatible"
            )
        return None
    if run < built:
        return (
            f"it was built with TensorRT {info.tensorrt_version}, newer than this TensorRT "
            f"{running}; version-compatible plans run on the same or a later TensorRT only"
        )
    if run[0] != built[0] and (built[0], run[0]) not in _CROSS_MAJOR:
        return (
            f"it was built with TensorRT {info.tensorrt_version} and this is TensorRT {running}; "
            "version-compatible plans cross major versions only from 8 to 10 and from 10 to 11"
        )
    return None


def _hardware_problem(info: EngineInfo, device_cc: str) -> str | None:
    built = _cc_tuple(info.compute_capability, "the engine's compute capability")
    here = _cc_tuple(device_cc, "this GPU's compute capability")
    if info.hardware_compatibility == "ampere+":
        if here < (8, 0):
            return (
                f"it was built for Ampere and newer (compute capability >= 8.0) and this GPU has "
                f"compute capability {device_cc}"
            )
        return None
    if here != built:
        return (
            f"it was built for compute capability {info.compute_capability} "
            f"({info.device_name}) and this GPU has {device_cc}; build on this GPU, or with "
            "--hardware-compat ampere+ to run on any GPU of compute capability 8.0 or newer"
        )
    return None


def check_engine_compatible(info: EngineInfo, running_tensorrt: str, device_cc: str) -> None:
    """ArtifactError saying how to rebuild when the plan cannot run on this TensorRT and GPU."""
    problems = [
        p
        for p in (_version_problem(info, running_tensorrt), _hardware_problem(info, device_cc))
        if p is not None
    ]
    if problems:
        raise ArtifactError(
            "this engine cannot run here: "
            + "; and ".join(problems)
            + ". Rebuild it from its ONNX artifact on this machine: echoembed build-engine "
            "ONNX_ARTIFACT OUT"
        )
