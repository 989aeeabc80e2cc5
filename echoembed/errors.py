"""Exception hierarchy: user errors (fixable by the caller) vs internal bugs."""

from __future__ import annotations


class EchoEmbedError(Exception):
    """Base class for every error echoembed raises on purpose."""


class UserError(EchoEmbedError):
    """The caller can fix this: bad input, a bad template, a missing file or package."""


class InternalError(EchoEmbedError):
    """A bug in echoembed: please report it with the traceback."""


class TemplateError(UserError, ValueError):
    """A template is malformed or cannot be bound to the given variables/tokenizer."""


class InputError(UserError, ValueError):
    """A text or batch passed to an encoder is unusable (empty, not a string, too long)."""


class ModelSourceError(UserError):
    """A model source (bundled name, HF directory, GGUF file) cannot be resolved or loaded."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message carries the install command."""


def require(module: str, extra: str, package: str | None = None):
    """Import an optional heavy dependency, or raise with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{pkg} is required for this step but is not installed. "
            f"Install it with: pip install 'echoembed[{extra}]'  (on CPU-only machines install "
            f"torch first: pip install torch==2.13.0)"
        ) from e


class ArtifactError(UserError):
    """An artifact directory is missing files, corrupt, or from a newer format."""


class ExportError(UserError):
    """An export could not produce a valid artifact."""


class ParityError(ExportError):
    """The exported graph disagrees with the PyTorch reference beyond the tolerance."""


class UnsupportedArchitectureError(ExportError):
    """The model's architecture is not one the exporter supports (the message lists them)."""


class BackendError(UserError):
    """An inference backend (ONNX Runtime, TensorRT) rejected the artifact or the request."""


class AccuracyBudgetError(UserError):
    """A quantized artifact falls below its accuracy budget (nothing is written)."""


class DeployError(UserError):
    """A Triton model repository or server cannot be written or started as configured."""
