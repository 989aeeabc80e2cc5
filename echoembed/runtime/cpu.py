"""What this CPU means for ONNX Runtime's integer kernels (pure Python, no dependencies).

ONNX Runtime's CPU GEMM for uint8 activations x int8 weights (``MatMulInteger``,
``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``: what INT8 dynamic and uint8 static QDQ
artifacts run) uses ``vpmaddubsw`` on x86-64 CPUs without VNNI (AVX2, AVX-512 without VNNI). That
instruction adds two u8 x s8 products into a *saturating* int16: with 8-bit weights
(|q| <= 127) two products can reach 2 x 255 x 127 = 64770 > 32767 and are clipped. VNNI
(``vpdpbusd``) accumulates in int32 and never saturates; Arm kernels widen first. 7-bit weights
(|q| <= 64 in ONNX Runtime's ``reduce_range``, 63 in echoembed's static QDQ: 2 x 255 x 64 =
32640) keep every pair below 32767 on every CPU.
Measured on SmolLM2 (STS-B dev texts, AMD EPYC with AVX2 only): see the README's calibration
section.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from echoembed.artifact.recipes import Int8DynamicConfig, Int8StaticConfig, RecipeConfig

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_value(key: str) -> str | None:
    """The first processor's ``key`` line in /proc/cpuinfo, or None (not Linux, no such key)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        k, _, value = line.partition(":")
        if k.strip() == key:
            return value.strip()
    return None


def cpu_model() -> str | None:
    """The CPU's marketing name (``model name``), for reports; None where unknown."""
    return _cpuinfo_value("model name")


KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_id() -> str | None:
    """Vendor, family, model and the SIMD flags that choose ONNX Runtime's and PyTorch's kernels,
    e.g. ``AuthenticAMD family 25 model 1; has avx2; lacks avx512f avx512_vnni ...``: under KVM
    the model name alone ("AMD EPYC") names CPUs of different generations. None where unknown."""
    keys = [("", "vendor_id"), ("family ", "cpu family"), ("model ", "model")]
    head = " ".join(f"{label}{v}" for label, key in keys if (v := _cpuinfo_value(key)) is not None)
    parts = [head] if head else []
    flags = cpu_flags()
    if flags is not None:
        has = " ".join(f for f in KERNEL_FLAGS if f in flags)
        lacks = " ".join(f for f in KERNEL_FLAGS if f not in flags)
        parts += [f"{word} {names}" for word, names in (("has", has), ("lacks", lacks)) if names]
    return "; ".join(parts) or None


def cpu_flags() -> frozenset[str] | None:
    """The first processor's flags, or None where /proc/cpuinfo is not readable (not Linux)."""
    flags = _cpuinfo_value("flags")
    return None if flags is None else frozenset(flags.split())


def runs_u8s8(settings: RecipeConfig) -> bool:
    """Whether an artifact quantized with ``settings`` runs the u8 x s8 integer GEMM on ONNX
    Runtime's CPU provider: INT8 dynamic with int8 weights (uint8 weights run u8 x u8), INT8
    static with uint8 activations (int8 Q/DQ runs in float)."""
    if isinstance(settings, Int8StaticConfig):
        return settings.activations == "uint8"
    return isinstance(settings, Int8DynamicConfig) and settings.weights == "int8"


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """True where ONNX Runtime's u8 x s8 CPU kernels can saturate with 8-bit weights: x86-64
    without VNNI, and x86-64 whose flags cannot be read (assumed, to be safe)."""
    if platform.machine().lower() not in X86:
        return False
    flags = cpu_flags()
    return flags is None or not (flags & VNNI_FLAGS)
