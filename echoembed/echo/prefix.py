"""Shared-prefix reuse: the constant leading tokens of a template, and the check that strips them.

An artifact exported with prefix reuse (``ExportConfig(prefix_reuse=True)``) has the keys and
values of its template's constant leading tokens (echo on SmolLM2: ``<|im_start|>Rewrite the
sentence:``, 7 ids) baked into the graph, computed once at export time. Its graph inputs are the
*remainder* of each prompt: every runner of such an artifact takes the whole ``EncodedBatch`` as
usual, checks that every row starts with the baked ids (``strip_prefix``) and feeds the rest.

The prefix is the plan's leading pieces with fixed ids that are neither capped (a capped piece
can be cut on overflow, or carries a user variable) nor pooled (a pooled token inside the prefix
would have no hidden state in the remainder graph: last-token pooling would read garbage). The
tokenizer never merges across it: ``EchoEncoder`` tokenizes every piece on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from echoembed.echo.encode import EncodedBatch
from echoembed.echo.plan import PromptPlan
from echoembed.errors import InputError


def leading_fixed_ids(plan: PromptPlan) -> tuple[int, ...]:
    """The ids every prompt of ``plan`` starts with: its leading fixed, uncapped, unpooled
    pieces (may be empty)."""
    out: list[int] = []
    for piece in plan.pieces:
        if piece.ids is None or piece.capped or piece.pooled:
            break
        out.extend(piece.ids)
    return tuple(out)


def check_plan_prefix(
    plan: PromptPlan, baked: Sequence[int], baked_template: str, baked_text: str, decode
) -> None:
    """``InputError`` unless every prompt of ``plan`` starts with the ``baked`` ids.

    ``decode(ids) -> str`` names the template's own leading text in the message. A template other
    than the baked one is accepted when its constant leading ids begin with the baked ones (the
    prefix's keys and values depend on those tokens only)."""
    baked = tuple(int(i) for i in baked)
    lead = leading_fixed_ids(plan)
    if lead[: len(baked)] == baked:
        return
    raise InputError(
        f"template {plan.template!r} starts with {decode(lead)!r} "
        f"({len(lead)} constant tokens), but this artifact has the prefix of template "
        f"{baked_template!r} baked in ({baked_text!r}, {len(baked)} tokens): use template "
        f"{baked_template!r} (or one starting with the same text), or re-export without "
        "--prefix-reuse to serve any template"
    )


def strip_prefix(batch: EncodedBatch, baked: Sequence[int]) -> EncodedBatch:
    """The remainder batch a prefix graph takes: ``batch`` without its first ``len(baked)``
    columns, after checking that every row starts with ``baked``, attends to it and pools none
    of it (``InputError`` naming the first bad row otherwise)."""
    p = len(baked)
    if p == 0:
        return batch
    ids = batch.input_ids
    if ids.shape[1] <= p:
        raise InputError(
            f"the batch is {ids.shape[1]} tokens wide, but this artifact's graph starts after a "
            f"baked prefix of {p} tokens: encode the texts with the artifact's template"
        )
    want = np.asarray(baked, dtype=ids.dtype)[None, :]
    bad = ~(ids[:, :p] == want).all(axis=1)
    bad |= ~(batch.attention_mask[:, :p] == 1).all(axis=1)
    bad |= batch.pool_mask[:, :p].any(axis=1)
    bad |= batch.attention_mask[:, p:].sum(axis=1) == 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"row {row} of the batch does not start with the {p} prefix ids baked into this "
            f"artifact ({list(baked)}; the row starts {ids[row, :p].tolist()}), or pools/masks "
            "them: encode the texts with the artifact's template (Embedder.encoder())"
        )
    return EncodedBatch(
        np.ascontiguousarray(ids[:, p:]),
        np.ascontiguousarray(batch.attention_mask[:, p:]),
        np.ascontiguousarray(batch.pool_mask[:, p:]),
        batch.truncated,
    )
