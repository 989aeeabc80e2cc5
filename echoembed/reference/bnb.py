"""bitsandbytes 8-bit (LLM.int8) and 4-bit nf4 variants of the PyTorch reference (comparators).

These are what a user would otherwise pick to shrink the model, measured against our artifacts.
The fp32 reference is loaded first (``load_model``: bundled name, HF directory or .gguf) and
its state dict is re-loaded through transformers' bitsandbytes quantizer on the CPU, so every
source works the same way and the weights are exactly the reference's.

Pitfalls handled here (transformers 5.24, bitsandbytes 0.50.2, CPU):
- transformers refuses ``quantization_config`` together with ``gguf_file``: we quantize the
  dequantized fp32 state dict instead (``from_pretrained(None, config=, state_dict=)``, which
  ``AutoModel`` rejects, so the concrete model class is used, and the GGUF
  ``quantization_config`` is dropped from a copy of the config);
- LLM.int8 logs "MatMul8bitLt: inputs will be cast ... to float16" on every matmul, and
  bitsandbytes logs at import that its optional Hub CPU kernel (``kernels``) is missing: both
  messages are filtered out (the first is by design, the second needs network access);
- on CPUs with AVX512-BF16, nf4 layers repack their weights for a fused bf16 kernel on the
  first inference-mode call, which crashes for in_features not a multiple of the block size
  (64) or out_features not a multiple of 32 (tiny test models): those layers keep the plain
  dequantize-then-matmul path. The fused kernel runs activations in bf16 whatever
  ``compute_dtype`` says; on SmolLM2 that changed the cosine to fp32 by < 1e-4.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from echoembed.errors import ModelSourceError, UserError, require
from echoembed.reference.embedder import ReferenceEmbedder
from echoembed.reference.sources import DEFAULT_MODEL, LoadedModel, load_model, resolve_source

BNB_EXTRA = "bnb"
BnbMode = Literal["int8", "nf4"]
ComputeDtype = Literal["float32", "bfloat16"]

_NOISY_LOGS = {
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class BnbConfigError(UserError, ValueError):
    """A ``BnbConfig`` asks for a combination bitsandbytes does not offer."""


@dataclass(frozen=True)
class BnbConfig:
    """How to quantize: ``int8`` (LLM.int8, outlier threshold) or ``nf4`` (4-bit NormalFloat).

    ``compute_dtype`` is the dtype of everything that is not a quantized Linear (embeddings,
    norms, activations) and, for nf4, of the dequantized matmul; ``double_quant`` also
    quantizes the nf4 block scales (nf4 only).
    """

    mode: BnbMode = "int8"
    compute_dtype: ComputeDtype = "float32"
    double_quant: bool = False
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "nf4"):
            raise BnbConfigError(f"mode must be 'int8' or 'nf4', got {self.mode!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise BnbConfigError(
                f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}"
            )
        if self.double_quant and self.mode != "nf4":
            raise BnbConfigError("double_quant applies to nf4 only")
        if not self.int8_threshold >= 0:
            raise BnbConfigError(f"int8_threshold must be >= 0, got {self.int8_threshold!r}")

    @property
    def name(self) -> str:
        """Short label for reports: ``bnb-int8``, ``bnb-nf4``, plus ``-dq`` / ``-bf16``."""
        name = f"bnb-{self.mode}"
        if self.double_quant:
            name += "-dq"
        if self.compute_dtype != "float32":
            name += "-bf16"
        return name

    def to_transformers(self) -> Any:
        """The equivalent ``transformers.BitsAndBytesConfig``."""
        torch = require("torch", "export")
        transformers = require("transformers", "export")
        if self.mode == "int8":
            return transformers.BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=float(self.int8_threshold)
            )
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
        )


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _quiet_bnb_logs() -> None:
    """Filter bitsandbytes' per-call and import-time noise (idempotent; before the import)."""
    for name, prefixes in _NOISY_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def require_bnb():
    """Import bitsandbytes, or raise ``MissingDependencyError`` with the install hint."""
    _quiet_bnb_logs()
    with warnings.catch_warnings():  # its import pulls in torch inductor's deprecation noise
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
        return require("bitsandbytes", BNB_EXTRA, "bitsandbytes")


def quantize_bnb(loaded: LoadedModel, config: BnbConfig | None = None) -> LoadedModel:
    """A copy of ``loaded`` whose Linear layers are bitsandbytes modules (CPU).

    ``loaded`` must be the fp32 reference (from ``load_model``); it is left untouched.
    Embeddings and norms stay unquantized; there is no LM head to skip.
    """
    config = config or BnbConfig()
    require_bnb()
    torch = require("torch", "export")
    require("accelerate", "export")
    fp32 = loaded.model
    model_config = copy.deepcopy(fp32.config)
    existing = getattr(model_config, "quantization_config", None)
    if existing is not None:
        method = getattr(existing, "quant_method", None)
        if isinstance(existing, dict):
            method = existing.get("quant_method")
        method = str(getattr(method, "value", method))
        if "gguf" not in method.lower():
            raise BnbConfigError(
                f"{loaded.source.name!r} is already quantized ({method}); "
                "quantize_bnb needs the fp32 reference"
            )
        delattr(model_config, "quantization_config")
    try:
        model = type(fp32).from_pretrained(
            None,
            config=model_config,
            state_dict=fp32.state_dict(),
            quantization_config=config.to_transformers(),
            device_map="cpu",
            dtype=getattr(torch, config.compute_dtype),
        )
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelSourceError(
            f"cannot quantize {loaded.source.name!r} with bitsandbytes ({config.name}): {e}"
        ) from e
    model.eval()
    _guard_cpu_packing(model)
    return dataclasses.replace(loaded, model=model)


def _guard_cpu_packing(model) -> None:
    """Keep nf4 layers the fused CPU kernel cannot repack on the plain path (see module doc)."""
    bnb = require_bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.support_avx512bf16_for_cpu:
            block = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
            if module.in_features % block or module.out_features % 32:
                module.support_avx512bf16_for_cpu = False


class BnbEmbedder(ReferenceEmbedder):
    """The reference embedder over a bitsandbytes int8/nf4 model: same ``encode``/``runner``."""

    def __init__(self, loaded: LoadedModel, config: BnbConfig):
        super().__init__(loaded)
        self.config = config

    @property
    def name(self) -> str:
        """``bnb-int8``, ``bnb-nf4`` (see ``BnbConfig.name``), for reports."""
        return self.config.name

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] = DEFAULT_MODEL,
        threads: int | None = None,
        config: BnbConfig | None = None,
    ) -> BnbEmbedder:
        """Load ``smollm2``, a Hugging Face directory or a ``.gguf`` file, then quantize it."""
        config = config or BnbConfig()
        require_bnb()  # fail before the (slow) fp32 load
        loaded = load_model(resolve_source(source), threads=threads)
        return cls(quantize_bnb(loaded, config), config)

    @classmethod
    def from_reference(
        cls, reference: ReferenceEmbedder, config: BnbConfig | None = None
    ) -> BnbEmbedder:
        """Quantize an already-loaded fp32 reference (which stays usable)."""
        config = config or BnbConfig()
        return cls(quantize_bnb(reference.loaded, config), config)
