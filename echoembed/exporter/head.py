"""The echo pooling head, traced into the graph: base model + pooling (+ L2 normalization).

Mirrors ``echoembed.echo.pool`` exactly (tested against it). Last-token pooling takes
max(position * mask) and gathers, never ArgMax over int64 (ONNX Runtime rejects that). The L2
norm is written as sqrt(sum(x * x)), not ``Tensor.norm``: that exports as ``ReduceL2``, which
ONNX Runtime's symbolic shape inference has no handler for, so ``quant_pre_process`` and the
``onnxruntime.transformers`` optimizer failed on every exported graph (``NoneType has no len()``
at the final Div).
"""

from __future__ import annotations

from echoembed.echo import Pooling
from echoembed.errors import require

torch = require("torch", "export")


class EchoEmbeddingModel(torch.nn.Module):
    """(input_ids, attention_mask, pool_mask) -> embedding [batch, hidden] float32."""

    def __init__(self, base: torch.nn.Module, pooling: Pooling, normalize: bool = True):
        super().__init__()
        self.base = base
        self.pooling = Pooling.parse(pooling)
        self.normalize = normalize

    def forward(self, input_ids, attention_mask, pool_mask):
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, pool_mask)

    def pool(self, hidden, pool_mask):
        """Pooling (+ normalization) of ``hidden`` over ``pool_mask``, as ``echo.pool``."""
        hidden = hidden.to(torch.float32)
        mask = pool_mask.to(torch.float32)
        count = mask.sum(dim=1, keepdim=True)
        if self.pooling is Pooling.MEAN:
            pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1.0)
        else:
            positions = torch.arange(hidden.shape[1], device=hidden.device, dtype=torch.int64)
            last = (positions.unsqueeze(0) * (pool_mask > 0).to(torch.int64)).amax(dim=1)
            index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[2])
            pooled = torch.gather(hidden, 1, index).squeeze(1)
            pooled = pooled * (count > 0).to(pooled.dtype)
        if self.normalize:
            norm = torch.sqrt((pooled * pooled).sum(dim=1, keepdim=True)).clamp(min=1e-12)
            pooled = pooled / norm
        return pooled


@torch.inference_mode()
def prefix_cache(base: torch.nn.Module, prefix_ids: tuple[int, ...]) -> list[tuple]:
    """Per layer (keys, values) [1, kv_heads, P, head_dim] of the prefix, as the model's own
    cache holds them (keys after rotary at positions 0..P-1)."""
    out = base(input_ids=torch.tensor([list(prefix_ids)]), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise TypeError(f"{type(base).__name__} returned no layered key/value cache")
    return [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in cache.layers]


class PrefixEchoModel(EchoEmbeddingModel):
    """(remainder input_ids, attention_mask, pool_mask) -> embedding, with the prefix's keys and
    values baked in as buffers (shared-prefix reuse).

    The inputs are each prompt without its P constant leading ids, right-padded as before.
    Each call builds a fresh ``DynamicCache`` from the buffers expanded to the batch (a cache
    object kept across calls would grow: ``update()`` appends), attends over [B, P + S] (ones
    for the prefix) and numbers positions P..P+S-1. Measured wrong variants (SmolLM2, min
    cosine vs the whole prompt): a reused cache 0.48, a [B, S] mask 0.84, positions from 0 0.95.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        pooling: Pooling,
        normalize: bool,
        cache: list[tuple],
    ):
        super().__init__(base, pooling, normalize)
        self.num_layers = len(cache)
        self.prefix_length = int(cache[0][0].shape[2])
        for i, (k, v) in enumerate(cache):
            self.register_buffer(f"prefix_key_{i}", k.contiguous())
            self.register_buffer(f"prefix_value_{i}", v.contiguous())

    def forward(self, input_ids, attention_mask, pool_mask):
        from transformers import DynamicCache

        b, s = input_ids.shape
        data = []
        for i in range(self.num_layers):
            k = getattr(self, f"prefix_key_{i}")
            v = getattr(self, f"prefix_value_{i}")
            data.append((k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)))
        cache = DynamicCache(ddp_cache_data=data)
        ones = torch.ones(b, self.prefix_length, dtype=attention_mask.dtype,
                          device=attention_mask.device)  # fmt: skip
        mask = torch.cat([ones, attention_mask], dim=1)
        positions = torch.arange(s, device=input_ids.device, dtype=torch.int64)
        positions = (positions + self.prefix_length).unsqueeze(0).expand(b, -1)
        hidden = self.base(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        return self.pool(hidden, pool_mask)
