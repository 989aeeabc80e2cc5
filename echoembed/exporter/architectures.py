"""Architectures the exporter supports, each with its I/O contract details in one place."""

from __future__ import annotations

from dataclasses import dataclass

from echoembed.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """One supported decoder family (keyed by transformers' ``config.model_type``)."""

    model_type: str
    family: str
    parity_tolerance: float = 1e-4  # max abs diff of normalized embeddings vs the reference
    notes: str = ""


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    a.model_type: a
    for a in (
        ArchitectureSpec("llama", "Llama", notes="SmolLM2, Llama 2/3"),
        ArchitectureSpec("mistral", "Mistral", notes="sliding-window attention"),
        ArchitectureSpec("qwen2", "Qwen2"),
        ArchitectureSpec("qwen3", "Qwen3", notes="q/k RMSNorm"),
        ArchitectureSpec("gemma2", "Gemma 2", notes="logit soft-capping, alternating windows"),
        ArchitectureSpec("gemma3_text", "Gemma 3 (text)", notes="q/k norm, local/global layers"),
        ArchitectureSpec("phi3", "Phi-3", notes="fused qkv and gate_up projections"),
        ArchitectureSpec("gpt2", "GPT-2", notes="learned absolute positions, Conv1D"),
    )
}


def get_architecture(model_type: str) -> ArchitectureSpec:
    """The spec for ``model_type``, or an error listing the supported ones."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(f"{a.model_type} ({a.family})" for a in ARCHITECTURES.values())
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported by the exporter; supported: "
            f"{supported}. Open an issue with the model's config.json to add it."
        )
    return spec
