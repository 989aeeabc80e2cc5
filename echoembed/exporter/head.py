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
