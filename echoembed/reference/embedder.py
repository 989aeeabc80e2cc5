"""The full-precision PyTorch reference embedder (fp32, eval, no_grad, no LM head)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from echoembed.echo import (
    EchoEncoder,
    EncodedBatch,
    EncoderConfig,
    Pooling,
    Template,
    embed_texts,
    get_template,
    pool,
)
from echoembed.errors import require
from echoembed.reference.sources import DEFAULT_MODEL, LoadedModel, load_model, resolve_source


class TorchRunner:
    """Runner over a PyTorch base model: forward pass, then ``echo.pool`` in numpy."""

    def __init__(self, model, pooling: Pooling | str = Pooling.MEAN):
        self.model = model
        self.pooling = Pooling.parse(pooling)

    def hidden_states(self, batch: EncodedBatch) -> np.ndarray:
        torch = require("torch", "export")
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(batch.input_ids),
                attention_mask=torch.from_numpy(batch.attention_mask),
            )
        return out.last_hidden_state.float().numpy()

    def encode(self, batch: EncodedBatch) -> np.ndarray:
        return pool(self.hidden_states(batch), batch.pool_mask, self.pooling)


class ReferenceEmbedder:
    """Echo embeddings from the PyTorch model, the accuracy reference for every artifact."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._encoders: dict[tuple, EchoEncoder] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, source: str | os.PathLike[str] = DEFAULT_MODEL, threads: int | None = None
    ) -> "ReferenceEmbedder":
        """Load ``smollm2``, a Hugging Face directory, or a ``.gguf`` file."""
        return cls(load_model(resolve_source(source), threads=threads))

    @property
    def hidden_size(self) -> int:
        return self.loaded.hidden_size

    def encoder(
        self, template: Template | str = "echo", max_length: int | None = None
    ) -> EchoEncoder:
        """The (cached) encoder binding ``template`` to this model's tokenizer."""
        tpl = get_template(template)
        key = (tpl.source, tuple(sorted(tpl.defaults.items())), max_length)
        with self._lock:
            enc = self._encoders.get(key)
            if enc is None:
                cfg = EncoderConfig(
                    tpl, max_length=max_length, context_length=self.loaded.context_length
                )
                enc = EchoEncoder(self.loaded.tokenizer, self.loaded.special, cfg)
                self._encoders[key] = enc
        return enc

    def runner(self, pooling: Pooling | str = Pooling.MEAN) -> TorchRunner:
        return TorchRunner(self.loaded.model, pooling)

    def encode(
        self,
        texts: Sequence[str] | str,
        template: Template | str = "echo",
        *,
        pooling: Pooling | str = Pooling.MEAN,
        batch_size: int = 16,
        normalize: bool = True,
        max_length: int | None = None,
        variables: Mapping[str, str] | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """Embed texts -> float32 [n, hidden] (L2-normalized unless ``normalize=False``)."""
        return embed_texts(
            self.runner(pooling),
            self.encoder(template, max_length),
            texts,
            batch_size=batch_size,
            normalize=normalize,
            variables=variables,
            show_progress=show_progress,
        )
