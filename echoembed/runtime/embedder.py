"""The torch-free ``Embedder``: tokenizer + echo + an ONNX Runtime session, from an artifact."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echoembed.artifact import (
    TOKENIZER_NAME,
    Manifest,
    read_manifest,
    verify_files,
)
from echoembed.echo import (
    PRESETS,
    EchoEncoder,
    EncoderConfig,
    Runner,
    SpecialTokens,
    Template,
    check_plan_prefix,
    embed_texts,
    get_template,
)
from echoembed.errors import ArtifactError, BackendError
from echoembed.runtime.cpu import runs_u8s8, u8s8_saturates
from echoembed.runtime.ort import OrtRunner

log = logging.getLogger(__name__)


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ArtifactError(
            f"{path.parent}: {path.name} is missing; the artifact needs its tokenizer (re-export "
            "it or copy the whole directory)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ArtifactError(f"{path} is not a valid tokenizer file: {e}") from e


def _check_integer_kernels(root: Path, manifest: Manifest, active: Sequence[str]) -> None:
    """Warn when an INT8 artifact with 8-bit weights runs on a CPU whose u8 x s8 kernels saturate
    (x86-64 without VNNI; see ``echoembed.runtime.cpu``): its embeddings lose accuracy there."""
    q = manifest.quantization
    if q is None or not active or active[0] != "CPUExecutionProvider":
        return
    if runs_u8s8(q.settings) and not q.settings.reduce_range and u8s8_saturates():
        log.warning(
            "%s has 8-bit INT8 weights, and this CPU has no VNNI: ONNX Runtime's u8 x s8 kernels "
            "saturate here and the embeddings lose accuracy (measured on SmolLM2, AVX2 AMD EPYC, "
            "STS-B dev: mean cosine to fp32 0.966 instead of 0.996, -11.6 Spearman points). "
            "Re-quantize on this machine, or with `echoembed quantize --reduce-range`, to get "
            "7-bit weights that saturate on no CPU (or `--weights uint8`: u8 x u8 kernels, "
            "never saturating)",
            root,
        )


GPU_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
)


def fused_on_gpu_warning(manifest: Manifest, active: Sequence[str]) -> str | None:
    """Why a fused graph runs poorly, or not at all, on the active GPU provider, or None. From
    ONNX Runtime's and TensorRT's kernel tables (not run here: no GPU was lent): CUDA has no
    fp32 GroupQueryAttention (those nodes run on the CPU between GPU partitions); its ONNX
    ``Attention`` takes fp32 only with as many key/value heads as query heads (GQA models fail
    at run time); TensorRT's parser has no com.microsoft RotaryEmbedding or
    SkipSimplifiedLayerNormalization."""
    f = manifest.fusion
    gpu = [p for p in active if p in GPU_PROVIDERS]
    if f is None or not f.applied or not gpu:
        return None
    why = (
        "its fp32 Attention nodes may be refused at run time on CUDA for grouped key/value heads"
        if "Attention" in f.ops
        else "its fp32 attention nodes run on the CPU"
    )
    return (
        f"{manifest.architecture} artifact was exported with the fused stage for ONNX Runtime "
        f"on CPU ({', '.join(f.ops)}): on {gpu[0]} {why}, and TensorRT cannot parse its "
        "com.microsoft ops. For GPUs re-export with `echoembed export ... --no-fuse` (or --dtype "
        "fp16)"
    )


class Embedder:
    """Echo embeddings from an exported artifact; safe to call from several threads."""

    def __init__(self, root: Path, manifest: Manifest, tokenizer, runner: Runner | None):
        self.root = root
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.runner = runner
        self.special: SpecialTokens = manifest.special_tokens
        self._encoders: dict[tuple, EchoEncoder] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        artifact_dir: str | os.PathLike[str],
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        verify: bool = True,
        session: bool = True,
        allow_fallback: bool = False,
    ) -> Embedder:
        """Read the manifest, verify checksums, build the tokenizer and the session.

        ``session=False`` loads the tokenizer and templates only (no ONNX Runtime session; only
        ``tokenizer.json``'s checksum is verified): ``encoder()`` works, ``encode()`` does not.
        ``echoembed tokenize`` and Triton's ``echo_tokenizer`` load artifacts this way.
        ``providers``: names, (name, options) pairs or ``runtime.providers`` configs
        (``CudaProvider``, ``TensorRTProvider``, ``TensorRTRtxProvider``); a requested provider
        that is missing or does not start is a ``BackendError`` unless ``allow_fallback``.
        """
        root = Path(artifact_dir)
        manifest = read_manifest(root)
        if verify:
            verify_files(root, manifest, only=None if session else [TOKENIZER_NAME])
        tokenizer = _load_tokenizer(root / TOKENIZER_NAME)
        if not session:
            return cls(root, manifest, tokenizer, None)
        model_path = root / manifest.model_file
        if not model_path.is_file():
            raise ArtifactError(f"{root}: model file {manifest.model_file} is missing")
        if manifest.engine is not None:  # an engine artifact: its TensorRT plan on the GPU
            from echoembed.runtime.tensorrt import TensorRTRunner

            if providers is not None:
                log.warning("%s is a TensorRT engine artifact; providers=%s is ignored", root,
                            providers)  # fmt: skip
            engine_runner = TensorRTRunner(
                model_path, manifest.engine, manifest.output_name, prefix_ids=manifest.prefix_ids
            )
            return cls(root, manifest, tokenizer, engine_runner)
        runner = OrtRunner(
            model_path,
            manifest.output_name,
            providers=providers,
            threads=threads,
            allow_fallback=allow_fallback,
            prefix_ids=manifest.prefix_ids,
        )
        _check_integer_kernels(root, manifest, runner.providers)
        warning = fused_on_gpu_warning(manifest, runner.providers)
        if warning is not None:
            log.warning(warning)
        return cls(root, manifest, tokenizer, runner)

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def pooling(self) -> str:
        return self.manifest.pooling

    def template(self, spec: Template | str | None = None) -> Template:
        """None: the artifact's default; a name: the artifact's copy, else a preset; or a string."""
        if isinstance(spec, Template):
            return spec
        name = self.manifest.default_template if spec is None else spec
        stored = self.manifest.template(name)
        if stored is not None:
            return Template(stored.source, name=stored.name, defaults=stored.defaults)
        if name in PRESETS or spec is not None:
            return get_template(name)
        raise ArtifactError(f"the manifest's default template {name!r} is not in its templates")

    def encoder(
        self, template: Template | str | None = None, max_length: int | None = None
    ) -> EchoEncoder:
        """The (cached) encoder for ``template``; ``max_length`` (tokens per copy of the text)
        overrides the artifact's own limit. With a baked shared prefix (``manifest.prefix``), a
        template whose prompts do not start with it is an ``InputError`` naming both."""
        tpl = self.template(template)
        max_length = self.manifest.max_length if max_length is None else max_length
        key = (tpl.source, tuple(sorted(tpl.defaults.items())), max_length)
        with self._lock:
            enc = self._encoders.get(key)
            if enc is None:
                cfg = EncoderConfig(
                    tpl,
                    max_length=max_length,
                    context_length=self.manifest.context_length,
                )
                enc = EchoEncoder(self.tokenizer, self.special, cfg)
                self._check_prefix(enc)
                self._encoders[key] = enc
        return enc

    def _check_prefix(self, enc: EchoEncoder) -> None:
        x = self.manifest.prefix
        if x is None:
            return

        def decode(ids) -> str:
            return self.tokenizer.decode(list(ids), skip_special_tokens=False)

        check_plan_prefix(enc.plan(), x.ids, x.template, x.text, decode)

    def encode(
        self,
        texts: Sequence[str] | str,
        template: Template | str | None = None,
        *,
        batch_size: int = 32,
        normalize: bool = True,
        variables: Mapping[str, str] | None = None,
        max_length: int | None = None,
        show_progress: bool | None = None,
        max_batch_tokens: int | None = None,
    ) -> np.ndarray:
        """Embed texts -> float32 [n, hidden], rows in input order.

        ``template=None`` uses the template the artifact was exported and checked with. The
        pooling is fixed by the artifact. With ``normalize=False`` the graph output is returned
        as is (already unit-norm when the artifact was exported with normalization).
        ``max_length`` truncates each copy of a text to that many tokens (default: the
        artifact's limit, if any). ``max_batch_tokens`` caps each batch's padded size (rows x
        its longest prompt) as well as its rows (``batch_size``).
        """
        if self.runner is None:
            raise BackendError(
                f"{self.root} was loaded with session=False (tokenizer only); load it with "
                "Embedder.load(path) to compute embeddings"
            )
        return embed_texts(
            self.runner,
            self.encoder(template, max_length),
            texts,
            batch_size=batch_size,
            normalize=normalize,
            variables=variables,
            show_progress=show_progress,
            max_batch_tokens=max_batch_tokens,
        )
