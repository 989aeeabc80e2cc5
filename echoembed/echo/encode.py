"""Texts -> ``EncodedBatch`` (input_ids, attention_mask, pool_mask) through a template.

Input rules (documented in the README):
- every text must be a ``str`` with at least one non-whitespace character that can be encoded as
  UTF-8 (no lone surrogates such as ``"\\ud800"``), else ``InputError`` naming its index; other
  code points (NUL, control characters) are valid text and tokenized as they are;
- ``max_length`` (optional) truncates every piece separately, as the official repo does;
- when a prompt is still longer than ``context_length`` (the model's context), the pieces that
  carry variables (the copies of the text) are truncated to one shared cap so the prompt fits:
  both copies keep the same leading tokens and the fixed parts (instruction, BOS, EOS) stay.
  ``overflow="error"`` raises ``InputError`` instead. Truncated rows are flagged in
  ``EncodedBatch.truncated``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from echoembed.echo.plan import PlanPiece, PromptPlan, water_fill
from echoembed.echo.template import (
    SPECIAL_VARIABLES,
    SURROGATE_HINT,
    TEXT_VARIABLE,
    Template,
    lone_surrogate_at,
    substitute,
    substitute_around_text,
)
from echoembed.errors import InputError, TemplateError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "pool_mask")


@dataclass(frozen=True)
class SpecialTokens:
    """The model's own special-token strings, named in templates as %%bos%% / %%eos%%."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None

    def as_variables(self) -> dict[str, str]:
        return {k: v for k, v in (("bos", self.bos), ("eos", self.eos)) if v is not None}


class EncodedRow(NamedTuple):
    """One text encoded through a template, unpadded (``EchoEncoder.encode_ids``)."""

    ids: list[int]  # token ids of the whole prompt
    pool_flags: list[int]  # 1 where the token is pooled, else 0 (same length as ids)
    truncated: bool  # the prompt was shortened to fit the context


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded int64 model inputs plus the span to pool; the contract of every runner."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pool_mask: np.ndarray
    truncated: np.ndarray  # bool [batch]: the row was shortened to fit

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        if len(shape) != 2 or self.attention_mask.shape != shape or self.pool_mask.shape != shape:
            raise InputError(
                "input_ids, attention_mask and pool_mask must share one [batch, seq] shape; got "
                f"{self.input_ids.shape}, {self.attention_mask.shape}, {self.pool_mask.shape}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)

    def feed(self) -> dict[str, np.ndarray]:
        """The graph inputs by name (int64)."""
        return {n: getattr(self, n) for n in INPUT_NAMES}

    def take(self, rows: Sequence[int] | np.ndarray) -> "EncodedBatch":
        """A sub-batch of the given rows, trimmed to its own longest row."""
        rows = np.asarray(rows, dtype=np.int64)
        width = max(int(self.attention_mask[rows].sum(axis=1).max(initial=1)), 1)
        return EncodedBatch(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.pool_mask[rows, :width],
            self.truncated[rows],
        )


@dataclass(frozen=True)
class EncoderConfig:
    """How texts become ids: the template plus length limits."""

    template: Template
    max_length: int | None = None  # per piece, official semantics
    context_length: int | None = None  # whole prompt; the model's context
    overflow: Literal["truncate", "error"] = "truncate"


def validate_texts(texts: object) -> list[str]:
    """Check user texts: a list of non-empty strings (a single str is wrapped)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        try:
            texts = list(texts)  # type: ignore[call-overload]
        except TypeError:
            raise InputError(
                f"texts must be a list of strings, got {type(texts).__name__}"
            ) from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(
                f"texts[{i}] is {type(t).__name__}, not str: convert it (str(x)) or drop it"
            )
        if not t.strip():
            raise InputError(
                f"texts[{i}] is empty or whitespace-only ({t!r}): an echo embedding of nothing is "
                "undefined; drop such rows before encoding"
            )
        bad = lone_surrogate_at(t)
        if bad is not None:
            raise InputError(
                f"texts[{i}] cannot be encoded as UTF-8: character {bad} ({t[bad]!r}) is "
                f"{SURROGATE_HINT}, or drop the row"
            )
    return list(texts)


class EchoEncoder:
    """Binds a template to a tokenizer and encodes texts to ``EncodedBatch``."""

    def __init__(self, tokenizer: "Tokenizer", special: SpecialTokens, config: EncoderConfig):
        self.tokenizer = tokenizer
        self.special = special
        self.config = config
        if config.max_length is not None and config.max_length < 1:
            raise InputError(f"max_length must be >= 1, got {config.max_length}")
        if config.context_length is not None and config.context_length < 1:
            raise InputError(f"context_length must be >= 1, got {config.context_length}")
        if config.overflow not in ("truncate", "error"):
            raise InputError(f"overflow must be 'truncate' or 'error', got {config.overflow!r}")
        specials = special.as_variables()
        tpl = config.template
        for var in tpl.variables & SPECIAL_VARIABLES:
            if var not in specials:
                raise TemplateError(
                    f"template {tpl.name!r} uses %%{var}%% but this tokenizer defines no {var} "
                    f"token; remove %%{var}%% from the template or write the token literally"
                )
        self._specials = specials
        self.pad_id = self._pad_id()
        self._plan = self.plan()  # the template's defaults; tokenizes the fixed pieces once

    def _tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.config.max_length is not None:
            ids = ids[: self.config.max_length]
        return list(ids)

    def _pad_id(self) -> int:
        for tok in (self.special.pad, self.special.eos):
            if tok is not None:
                tid = self.tokenizer.token_to_id(tok)
                if tid is not None:
                    return int(tid)
        return 0  # any id works: padded positions are masked out

    def plan(self, variables: Mapping[str, str] | None = None) -> PromptPlan:
        """The ``PromptPlan`` of this template, tokenizer and limits (``variables`` override the
        template's defaults): what the manifest records and what ``encode_ids`` follows."""
        tpl = self.config.template
        values = {**tpl.resolve_variables(variables), **self._specials}
        pieces = []
        for p in tpl.pieces:
            if p.segment and TEXT_VARIABLE in p.variables:
                parts = substitute_around_text(p.source, values)
                pieces.append(PlanPiece(p.pooled, capped=True, parts=parts))
            else:  # literal, or a segment of BOS/EOS and user variables only
                capped = p.segment and bool(p.variables - SPECIAL_VARIABLES)
                ids = self._tokenize(substitute(p.source, values))
                pieces.append(PlanPiece(p.pooled, capped=capped, ids=tuple(ids)))
        return PromptPlan(
            template=tpl.name,
            pieces=tuple(pieces),
            max_length=self.config.max_length,
            context_length=self.config.context_length,
            pad_id=self.pad_id,
            overflow=self.config.overflow,
        )

    def encode_ids(
        self, texts: Sequence[str], variables: Mapping[str, str] | None = None
    ) -> list[EncodedRow]:
        """Per text: its ``EncodedRow`` (ids, pool flags, truncated), unpadded."""
        texts = validate_texts(texts)
        plan = self._plan if not variables else self.plan(variables)
        # Tokenize every text-bearing piece for all texts in one batched call.
        text_idx = plan.text_pieces
        strings = [plan.pieces[i].source_for(t) for t in texts for i in text_idx]
        encoded = self.tokenizer.encode_batch(strings, add_special_tokens=False) if strings else []
        limit = plan.max_length
        out = []
        for row in range(len(texts)):
            pieces: list[list[int]] = []
            k = row * len(text_idx)
            for piece in plan.pieces:
                if piece.ids is not None:
                    pieces.append(list(piece.ids))
                else:
                    ids = list(encoded[k].ids)
                    k += 1
                    pieces.append(ids if limit is None else ids[:limit])
            pieces, truncated = _fit(plan, pieces, row)
            ids, flags = [], []
            for p, ids_p in zip(plan.pieces, pieces, strict=True):
                ids.extend(ids_p)
                flags.extend([int(p.pooled)] * len(ids_p))
            out.append(EncodedRow(ids, flags, truncated))
        return out

    def encode(
        self, texts: Sequence[str], variables: Mapping[str, str] | None = None
    ) -> EncodedBatch:
        """Encode and right-pad texts into one batch."""
        return self.pad(self.encode_ids(texts, variables))

    def pad(self, rows: Sequence[EncodedRow]) -> EncodedBatch:
        """Right-pad unpadded rows (``EncodedRow`` or plain 3-tuples) to the longest one."""
        if not rows:
            raise InputError("nothing to encode: texts is empty")
        rows = [EncodedRow(*r) for r in rows]
        width = max(len(r.ids) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        att = np.zeros((len(rows), width), dtype=np.int64)
        pm = np.zeros((len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            n = len(r.ids)
            ids[b, :n] = r.ids
            att[b, :n] = 1
            pm[b, :n] = r.pool_flags
        truncated = np.array([r.truncated for r in rows], dtype=bool)
        if truncated.any():
            log.warning(
                "%d text(s) exceeded the context of %s tokens and were truncated (both copies "
                "keep the same leading tokens)",
                int(truncated.sum()),
                self.config.context_length,
            )
        return EncodedBatch(ids, att, pm, truncated)


def _fit(plan: PromptPlan, pieces: list[list[int]], row: int) -> tuple[list[list[int]], bool]:
    """Cut the capped pieces to one shared cap when the prompt is over the context."""
    limit = plan.context_length
    total = sum(len(p) for p in pieces)
    if limit is None or total <= limit:
        return pieces, False
    if plan.overflow == "error":
        raise InputError(
            f"texts[{row}] makes a prompt of {total} tokens, over the model's context of "
            f"{limit}; shorten it, set max_length (per copy), or use overflow='truncate'"
        )
    capped = plan.capped_pieces
    fixed = sum(len(p) for i, p in enumerate(pieces) if i not in capped)
    budget = limit - fixed
    if budget < len(capped):
        raise InputError(
            f"the template's fixed parts alone take {fixed} of {limit} context tokens; "
            "shorten the template"
        )
    cap = water_fill([len(pieces[i]) for i in capped], budget)
    for i in capped:
        pieces[i] = pieces[i][:cap]
    return pieces, True


def template_plans(
    tokenizer: "Tokenizer",
    special: SpecialTokens,
    templates: Sequence[Template],
    max_length: int | None,
    context_length: int | None,
) -> tuple[PromptPlan, ...]:
    """One plan per template, as an artifact's manifest records them. A template this tokenizer
    cannot encode (``%%bos%%`` without a BOS token) gets no plan; a runtime using it gets the
    same TemplateError the Python encoder raises."""
    plans = []
    for tpl in templates:
        try:
            enc = EchoEncoder(tokenizer, special, EncoderConfig(tpl, max_length, context_length))
        except TemplateError as e:
            log.info("no prompt plan for template %r: %s", tpl.name, e)
            continue
        plans.append(enc.plan())
    return tuple(plans)
