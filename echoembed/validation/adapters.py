"""Hand an echo embedder to sentence-transformers-style code and to MTEB 2.x.

``SentenceTransformerAdapter`` gives the surface that evaluators duck-type on a
``SentenceTransformer`` (``encode``/``encode_query``/``encode_document`` with its flags,
``similarity``, ``get_embedding_dimension``); ``MtebEncoder`` implements MTEB 2.x's
``EncoderProtocol`` (``encode`` over a DataLoader of ``{"text": [...]}`` batches with a
``prompt_type``, ``similarity``, ``similarity_pairwise``, ``mteb_model_meta``). Both wrap anything
with ``Embedder.encode``'s signature: the runtime ``Embedder`` or the PyTorch
``ReferenceEmbedder``. Queries get the ``query`` template (with the task's instruction in its
``prompt`` variable), documents the ``document`` template, everything else (STS, classification,
clustering: MTEB passes ``prompt_type=None``) the embedder's default template.

Nothing heavy is imported here: numpy only; torch only when a caller asks for tensors or passes
them in, mteb only for ``MtebEncoder.mteb_model_meta``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from echoembed.echo import Template, get_template
from echoembed.echo.pooling import l2_normalize
from echoembed.errors import InputError, MissingDependencyError, TemplateError

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta

__all__ = [
    "AdapterConfig",
    "MtebEncoder",
    "SentenceTransformerAdapter",
]

QUERY = "query"
DOCUMENT = "document"
PROMPT_TYPES = (QUERY, DOCUMENT)
# sentence-transformers' encode_document falls back to these prompt names, in this order.
DOCUMENT_ALIASES = ("document", "passage", "corpus")


def _frozen_map(value: Mapping[str, Any] | None, what: str) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise InputError(f"AdapterConfig.{what} must be a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise InputError(f"AdapterConfig.{what} keys must be strings, got {k!r}")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class AdapterConfig:
    """Which echo template each kind of input gets.

    ``query``/``document``: template (preset name or template string) for MTEB's
    ``PromptType.query``/``document`` and for ``encode_query``/``encode_document``.
    ``symmetric``: template for everything else; None means the embedder's own default (an
    artifact's ``default_template``, ``echo`` for the reference).
    The query template's ``instruction_variable`` (``prompt``) gets, in order: ``instructions``
    [task name]; MTEB's task prompt when ``use_task_prompts`` (the query entry of
    ``TaskMetadata.prompt``); ``query_instruction``; else the template's default ("Retrieve
    passages that answer the question"). Outside MTEB (``encode_query``) there is no task.
    ``extra_prompts``: more sentence-transformers ``prompt_name`` -> template entries.
    ``normalize``: L2-normalize MTEB embeddings (sentence-transformers callers choose per call).
    ``blank``: ``"error"`` rejects empty/whitespace texts; ``"zero"`` embeds them as zero vectors
    (cosine 0 to everything), for benchmark data that contains a few.
    ``encode_kwargs``: passed to every ``embedder.encode`` call, e.g. ``{"pooling": "last"}`` or
    ``{"max_length": 512}``.
    """

    query: str = QUERY
    document: str = DOCUMENT
    symmetric: str | None = None
    instructions: Mapping[str, str] = field(default_factory=dict)
    use_task_prompts: bool = True
    query_instruction: str | None = None
    instruction_variable: str = "prompt"
    extra_prompts: Mapping[str, str] = field(default_factory=dict)
    normalize: bool = True
    blank: Literal["error", "zero"] = "error"
    encode_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("query", "document", "instruction_variable"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"AdapterConfig.{name} must be a string")
        for name in ("symmetric", "query_instruction"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InputError(f"AdapterConfig.{name} must be a string or None")
        if self.blank not in ("error", "zero"):
            raise InputError(f"AdapterConfig.blank must be 'error' or 'zero', got {self.blank!r}")
        for name in ("instructions", "extra_prompts", "encode_kwargs"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name), name))
        for name in ("instructions", "extra_prompts"):
            for k, v in getattr(self, name).items():
                if not isinstance(v, str):
                    raise InputError(f"AdapterConfig.{name}[{k!r}] must be a string")
        if taken := {QUERY, *DOCUMENT_ALIASES} & set(self.extra_prompts):
            raise InputError(
                f"AdapterConfig.extra_prompts cannot redefine {sorted(taken)}: set "
                "AdapterConfig.query / AdapterConfig.document instead"
            )
        reserved = {"template", "texts", "variables", "normalize", "batch_size", "show_progress"}
        if clash := reserved & set(self.encode_kwargs):
            raise InputError(
                f"AdapterConfig.encode_kwargs cannot set {sorted(clash)}: the adapter sets them"
            )

    def prompt_names(self) -> dict[str, str | None]:
        """sentence-transformers prompt name -> template spec (None: the embedder's default)."""
        names: dict[str, str | None] = {QUERY: self.query}
        names.update({alias: self.document for alias in DOCUMENT_ALIASES})
        names.update(self.extra_prompts)
        return names


def _prompt_type_name(prompt_type: object) -> str | None:
    """None, or 'query'/'document' from a str or an mteb ``PromptType`` (a str enum)."""
    if prompt_type is None:
        return None
    value = getattr(prompt_type, "value", prompt_type)
    if isinstance(value, str) and value in PROMPT_TYPES:
        return value
    raise InputError(
        f"unknown prompt_type {prompt_type!r}: expected None (symmetric tasks), 'query' or "
        "'document' (mteb.types.PromptType)"
    )


def _is_torch(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _torch():
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(
            "torch is needed for tensor outputs (convert_to_tensor=True or "
            "convert_to_numpy=False); pass convert_to_numpy=True or install torch"
        ) from e
    return torch


def _as_2d(a: Any, which: str) -> Any:
    """A float 2-D array or tensor ([dim] becomes [1, dim])."""
    if _is_torch(a):
        a = a.float() if not a.is_floating_point() else a
    else:
        a = np.asarray(a)
        a = a.astype(np.float32) if not np.issubdtype(a.dtype, np.floating) else a
    if a.ndim == 1:
        return a[None, :]
    if a.ndim != 2:
        raise InputError(f"{which} must be [n, dim] or [dim], got shape {tuple(a.shape)}")
    return a


def cosine_similarity(a: Any, b: Any, pairwise: bool = False, as_torch: bool = False) -> Any:
    """Cosine of every row of ``a`` with every row of ``b`` ([n, m]), or of row pairs ([n]).

    A 1-D input counts as one row. numpy in, numpy out; a torch tensor in (as
    sentence-transformers evaluators pass) or ``as_torch``, a torch tensor out. Zero rows score 0.
    """
    a = _as_2d(a, "embeddings1")
    b = _as_2d(b, "embeddings2")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if pairwise and a.shape[0] != b.shape[0]:
        raise InputError(f"pairwise similarity needs as many rows: {a.shape[0]} vs {b.shape[0]}")
    if as_torch or _is_torch(a) or _is_torch(b):
        torch = _torch()
        a = torch.nn.functional.normalize(torch.as_tensor(a), dim=-1)
        b = torch.nn.functional.normalize(
            torch.as_tensor(b, device=a.device, dtype=a.dtype), dim=-1
        )
        return (a * b).sum(-1) if pairwise else a @ b.T
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1) if pairwise else a @ b.T


def _short(spec: str | None) -> str:
    """A template spec as a short, path-safe label (preset names as is)."""
    if spec is None:
        return "default"
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", spec):
        return spec
    return "custom-" + hashlib.sha256(spec.encode()).hexdigest()[:8]


class _EchoAdapter:
    """What both adapters share: the embedder, the config, template routing, similarity."""

    similarity_fn_name = "cosine"

    def __init__(self, embedder: Any, config: AdapterConfig | None = None):
        if not callable(getattr(embedder, "encode", None)):
            raise InputError(
                f"{type(embedder).__name__} has no encode(texts, template, ...): pass an "
                "echoembed.runtime.Embedder or an echoembed.reference.ReferenceEmbedder"
            )
        config = AdapterConfig() if config is None else config
        if not isinstance(config, AdapterConfig):
            raise InputError(f"config must be an AdapterConfig, got {type(config).__name__}")
        self.embedder = embedder
        self.config = config
        # Resolve every template now: a bad name fails here, not halfway through a benchmark.
        specs = {config.query, config.document, config.symmetric, *config.extra_prompts.values()}
        for spec in specs:
            self._template(spec)
        self._query_takes_instruction = config.instruction_variable in (
            self._template(config.query).defaults
        )
        if (config.instructions or config.query_instruction) and not self._query_takes_instruction:
            raise TemplateError(
                f"AdapterConfig sets query instructions but the query template {config.query!r} "
                f"has no settable %%{config.instruction_variable}%% variable"
            )

    def _template(self, spec: str | None) -> Template:
        resolve = getattr(self.embedder, "template", None)
        if callable(resolve):  # the runtime Embedder: artifact copies, then presets
            return resolve(spec)
        return get_template("echo" if spec is None else spec)

    def _instruction(self, task_name: str | None, task_prompt: object) -> str | None:
        """The query instruction for a task: the config's, else MTEB's task prompt, else None."""
        if not self._query_takes_instruction:
            return None
        if task_name is not None and task_name in self.config.instructions:
            return self.config.instructions[task_name]
        if self.config.use_task_prompts:
            if isinstance(task_prompt, Mapping):
                task_prompt = task_prompt.get(QUERY)
            if isinstance(task_prompt, str) and task_prompt.strip():
                return task_prompt
        return self.config.query_instruction

    def _route(
        self, prompt_type: str | None, task_name: str | None = None, task_prompt: object = None
    ) -> tuple[str | None, dict[str, str] | None]:
        """(template spec, variables) for a prompt type ('query', 'document' or None)."""
        if prompt_type == QUERY:
            instruction = self._instruction(task_name, task_prompt)
            variables = (
                None if instruction is None else {self.config.instruction_variable: instruction}
            )
            return self.config.query, variables
        if prompt_type == DOCUMENT:
            return self.config.document, None
        return self.config.symmetric, None

    def _embed(
        self,
        texts: Sequence[str],
        template: str | None,
        variables: Mapping[str, str] | None,
        *,
        batch_size: int,
        normalize: bool,
        show_progress: bool | None,
    ) -> np.ndarray:
        """Validate ``texts`` and call the embedder once (so batching matches a direct call)."""
        blank: list[int] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(
                    f"texts[{i}] is {type(t).__name__}, not str: the echo adapters embed text only"
                )
            if not t.strip():
                blank.append(i)
        if blank and self.config.blank == "error":
            raise InputError(
                f"texts[{blank[0]}] is empty or whitespace-only ({len(blank)} such texts): drop "
                "them, or use AdapterConfig(blank='zero') to embed them as zero vectors"
            )
        dim = self.get_embedding_dimension()
        skip = set(blank)
        keep = [i for i in range(len(texts)) if i not in skip] if blank else None
        todo = [texts[i] for i in keep] if keep is not None else list(texts)
        if not todo:
            if dim is None:
                raise InputError("nothing to encode and the embedding size is unknown")
            return np.zeros((len(texts), dim), dtype=np.float32)
        kwargs: dict[str, Any] = dict(self.config.encode_kwargs)
        if template is not None:
            kwargs["template"] = template
        if variables:
            kwargs["variables"] = dict(variables)
        emb = self.embedder.encode(
            todo, batch_size=batch_size, normalize=normalize, show_progress=show_progress, **kwargs
        )
        emb = np.asarray(emb, dtype=np.float32)
        if keep is None:
            return emb
        out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        out[keep] = emb
        return out

    def get_embedding_dimension(self) -> int | None:
        """The embedding size (the model's hidden size), or None when the embedder hides it."""
        size = getattr(self.embedder, "hidden_size", None)
        return int(size) if size is not None else None

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine matrix [n1, n2] (numpy for numpy inputs, torch for tensors)."""
        return cosine_similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine of each row pair [n]."""
        return cosine_similarity(embeddings1, embeddings2, pairwise=True)


def _check_precision(precision: object) -> None:
    if precision not in (None, "float32"):
        raise InputError(
            f"precision {precision!r} is not supported by the echo adapters: embeddings are "
            "float32 (quantize the model instead, see echoembed.calibration)"
        )


class EvaluationLog:
    """Stands in for ``SentenceTransformer.model_card_data``: sentence-transformers evaluators
    report their metrics here; they are kept in ``records`` as (evaluator name, metrics)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def set_evaluation_metrics(
        self, evaluator: Any, metrics: Mapping[str, Any], epoch: int = 0, step: int = 0
    ) -> None:
        self.records.append((type(evaluator).__name__, dict(metrics)))


def _texts_of(
    sentences: str | Sequence[str] | None, inputs: str | Sequence[str] | None
) -> tuple[list[str], bool]:
    """``encode``'s texts as a list, and whether a single str was given."""
    if sentences is None:
        sentences = inputs
    elif inputs is not None:
        raise InputError("pass the texts once: sentences= or inputs=, not both")
    if sentences is None:
        raise InputError("encode() needs texts (a str or a list of str)")
    single = isinstance(sentences, str)
    texts = [sentences] if single else sentences
    if isinstance(texts, Mapping) or not isinstance(texts, Iterable):
        raise InputError(
            f"sentences must be a str or a list of str, got {type(sentences).__name__}"
        )
    return list(texts.tolist() if isinstance(texts, np.ndarray) else texts), single


class SentenceTransformerAdapter(_EchoAdapter):
    """The ``SentenceTransformer`` surface over an echo embedder.

    ``prompt_name`` picks a template (``query``; ``document``/``passage``/``corpus``; plus
    ``AdapterConfig.extra_prompts``); ``prompt`` is an echo template itself (a preset name or a
    template string with ``%%text%%``), not a prefix. Without either, ``encode`` uses the
    symmetric template, ``encode_query`` the query one (instruction: ``AdapterConfig.
    query_instruction`` or the template's default), ``encode_document`` the document one.
    """

    default_prompt_name: str | None = None

    def __init__(self, embedder: Any, config: AdapterConfig | None = None):
        super().__init__(embedder, config)
        self.model_card_data = EvaluationLog()

    @property
    def prompts(self) -> dict[str, str]:
        """Prompt name -> the template source it selects."""
        return {
            name: self._template(spec).source for name, spec in self.config.prompt_names().items()
        }

    @property
    def max_seq_length(self) -> int | None:
        """Token limit per copy of a text (the artifact's), or None."""
        manifest = getattr(self.embedder, "manifest", None)
        return getattr(manifest, "max_length", None)

    def get_sentence_embedding_dimension(self) -> int | None:
        """Alias of ``get_embedding_dimension`` (sentence-transformers < 6 name)."""
        return self.get_embedding_dimension()

    def _template_for(
        self, prompt_name: str | None, prompt: str | None, task: str | None
    ) -> tuple[str | None, dict[str, str] | None]:
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            try:
                self._template(prompt)
            except TemplateError as e:
                raise InputError(
                    f"prompt={prompt!r} is not an echo template: echo embeddings take a preset "
                    "name or a template string with %%text%% (not a text prefix); use "
                    f"prompt_name= one of {sorted(self.config.prompt_names())} ({e})"
                ) from None
            return prompt, None
        if prompt_name is None:
            prompt_name = self.default_prompt_name
        if prompt_name is None:
            if task is not None and task not in PROMPT_TYPES:
                raise InputError(f"unknown task {task!r}: expected 'query' or 'document'")
            return self._route(task)
        names = self.config.prompt_names()
        if not isinstance(prompt_name, str) or prompt_name not in names:
            raise InputError(f"unknown prompt_name {prompt_name!r}; known: {sorted(names)}")
        if prompt_name == QUERY:
            return self._route(QUERY)
        if prompt_name in DOCUMENT_ALIASES:
            return self._route(DOCUMENT)
        return names[prompt_name], None

    def encode(
        self,
        sentences: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str | None = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        *,
        inputs: str | Sequence[str] | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``SentenceTransformer.encode``: a str gives [dim], a list [n, dim] (numpy by default).

        ``inputs=`` is the sentence-transformers 6 name of ``sentences``. ``device`` is ignored
        (the backend was chosen when the embedder was loaded); pools and extra model kwargs are
        not supported.
        """
        if kwargs:
            raise InputError(
                f"encode() got arguments the echo adapter does not use: {sorted(kwargs)}"
            )
        if output_value != "sentence_embedding":
            raise InputError(
                f"output_value={output_value!r} is not supported: echo artifacts output one "
                "pooled sentence embedding per text"
            )
        _check_precision(precision)
        if truncate_dim is not None and (not isinstance(truncate_dim, int) or truncate_dim < 1):
            raise InputError(f"truncate_dim must be a positive int, got {truncate_dim!r}")
        texts, single = _texts_of(sentences, inputs)
        template, variables = self._template_for(prompt_name, prompt, task)
        emb = self._embed(
            texts,
            template,
            variables,
            batch_size=batch_size,
            normalize=normalize_embeddings and truncate_dim is None,
            show_progress=show_progress_bar,
        )
        if truncate_dim is not None:
            emb = emb[:, :truncate_dim]
            emb = l2_normalize(emb) if normalize_embeddings else np.ascontiguousarray(emb)
        if convert_to_tensor:
            out: Any = _torch().from_numpy(emb)
        elif convert_to_numpy:
            out = emb
        else:
            out = list(_torch().from_numpy(emb))
        return out[0] if single else out

    def encode_query(self, sentences: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``encode`` with the query template (unless ``prompt_name``/``prompt`` says otherwise)."""
        kwargs.setdefault("task", QUERY)
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``encode`` with the document template (unless ``prompt_name``/``prompt`` says so)."""
        kwargs.setdefault("task", DOCUMENT)
        return self.encode(sentences, **kwargs)


class MtebEncoder(_EchoAdapter):
    """MTEB 2.x ``EncoderProtocol`` over an echo embedder: ``mteb.evaluate(MtebEncoder(e), tasks)``.

    ``name``/``revision`` identify the run in MTEB's results cache (default: ``echoembed/<artifact
    directory>`` and a hash of the artifact's file checksums); the template choices go into the
    metadata's ``experiment_kwargs``, so two configurations never share cached results.
    """

    def __init__(
        self,
        embedder: Any,
        config: AdapterConfig | None = None,
        *,
        name: str | None = None,
        revision: str | None = None,
    ):
        super().__init__(embedder, config)
        if name is not None and (not isinstance(name, str) or "/" not in name):
            raise InputError(f"name must look like 'organization/model', got {name!r}")
        self.name = name or self._default_name()
        self.revision = revision or self._default_revision()
        self._meta: ModelMeta | None = None

    def _default_name(self) -> str:
        root = getattr(self.embedder, "root", None)
        loaded = getattr(self.embedder, "loaded", None)
        if root is not None:
            label = str(getattr(root, "name", root))
        elif loaded is not None:
            label = f"{PurePath(str(loaded.source.name)).name}-reference"
        else:
            label = type(self.embedder).__name__
        label = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "model"
        return f"echoembed/{label}"

    def _default_revision(self) -> str:
        manifest = getattr(self.embedder, "manifest", None)
        files = getattr(manifest, "files", None)
        if not files:
            return "no_revision_available"
        blob = json.dumps(sorted(files.items())).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def experiment_kwargs(self) -> dict[str, str]:
        """The template choices, as short labels (goes into MTEB's cache key)."""
        c = self.config
        out = {
            "query": _short(c.query),
            "document": _short(c.document),
            "symmetric": _short(c.symmetric),
            "task_prompts": str(c.use_task_prompts),
            "query_instruction": _short(c.query_instruction),
            "normalize": str(c.normalize),
        }
        if c.instructions:
            blob = json.dumps(sorted(c.instructions.items())).encode()
            out["instructions"] = hashlib.sha256(blob).hexdigest()[:8]
        if c.encode_kwargs:
            out["encode_kwargs"] = _short(json.dumps(dict(c.encode_kwargs), sort_keys=True))
        return out

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """MTEB's ``ModelMeta`` for this embedder and configuration (needs ``mteb``)."""
        if self._meta is None:
            try:
                from mteb.models.model_meta import ModelMeta, ScoringFunction
            except ImportError as e:
                raise MissingDependencyError(
                    "mteb is needed for MtebEncoder.mteb_model_meta: pip install 'mteb>=2,<3'"
                ) from e
            manifest = getattr(self.embedder, "manifest", None)
            meta = ModelMeta.create_empty(
                {
                    "name": self.name,
                    "revision": self.revision,
                    "embed_dim": self.get_embedding_dimension(),
                    "max_tokens": getattr(manifest, "context_length", None),
                    "framework": ["ONNX"] if manifest is not None else ["PyTorch"],
                    "similarity_fn_name": ScoringFunction.COSINE,
                    "use_instructions": True,
                    "modalities": ["text"],
                    "experiment_kwargs": self.experiment_kwargs(),
                }
            )
            self._meta = ModelMeta.model_validate(meta.model_dump())
        return self._meta

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine matrix [n1, n2] as a torch tensor (what MTEB's evaluators expect)."""
        return cosine_similarity(embeddings1, embeddings2, as_torch=True)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        """Cosine of each row pair [n] as a torch tensor."""
        return cosine_similarity(embeddings1, embeddings2, pairwise=True, as_torch=True)

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any = None,
        hf_split: str = "",
        hf_subset: str = "",
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """MTEB 2.x ``EncoderProtocol.encode``: float32 [n, dim], rows in DataLoader order.

        ``inputs`` yields batches with a ``"text"`` list (a ``torch.utils.data.DataLoader`` in
        MTEB; any iterable of such dicts works). ``kwargs`` are MTEB's encode_kwargs:
        ``batch_size``, ``show_progress_bar``, ``precision`` (float32 only); others are ignored.
        """
        kind = _prompt_type_name(prompt_type)
        _check_precision(kwargs.get("precision"))
        texts: list[Any] = []
        for b, batch in enumerate(inputs):
            if not isinstance(batch, Mapping) or "text" not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise InputError(
                    f"batch {b} has no 'text' entry ({keys}): the echo adapters embed text only"
                )
            column = batch["text"]
            if isinstance(column, str) or not isinstance(column, Iterable):
                raise InputError(f"batch {b}: 'text' must be a list of str, got {type(column)}")
            texts.extend(column)
        task_name = getattr(task_metadata, "name", None)
        task_prompt = getattr(task_metadata, "prompt", None)
        template, variables = self._route(kind, task_name, task_prompt)
        if not texts:
            dim = self.get_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        return self._embed(
            texts,
            template,
            variables,
            batch_size=int(kwargs.get("batch_size", 32)),
            normalize=self.config.normalize,
            show_progress=kwargs.get("show_progress_bar"),
        )
