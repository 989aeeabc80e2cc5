"""The prompt plan: a template bound to a tokenizer and length limits, as plain data.

A ``PromptPlan`` is what any consumer (``EchoEncoder`` itself, the C++ example, a service with
its own runtime) needs to assemble a prompt without parsing templates: per piece, either its
fixed token ids or the strings to tokenize with the text inserted, whether it is pooled, and
whether it shares the context cap. Artifacts record one plan per shipped template in their
manifest (format 3). ``EchoEncoder.plan`` builds it; ``EchoEncoder`` encodes through it, so the
Python encoding and the manifest cannot drift.

Assembling a prompt from a plan (what ``EchoEncoder.encode_ids`` does):

1. per piece: ``ids`` as recorded, or ``tokenize(text.join(parts))`` (no special tokens), cut to
   ``max_length`` tokens when it is set;
2. when the total exceeds ``context_length``: with ``overflow == "error"`` fail; else cut every
   ``capped`` piece to the largest shared cap ``c`` with
   ``sum(min(len(p), c) for capped p) <= context_length - len(uncapped pieces)``
   (``water_fill``); fail when that budget is below the number of capped pieces;
3. concatenate; a token is pooled when its piece is ``pooled``; right-pad batches with
   ``pad_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OVERFLOW_MODES = ("truncate", "error")


@dataclass(frozen=True)
class PlanPiece:
    """One template piece: fixed ``ids``, or ``parts`` to join with the text and tokenize.

    ``parts`` is the piece's source with every other variable substituted, split at each
    ``%%text%%`` (so ``text.join(parts)`` is the string to tokenize; ``("", "")`` for a bare
    ``{%%text%%}``). ``capped``: the piece carries a variable (the text, or a user variable
    such as the query prompt) and is cut to the shared cap when the prompt overflows.
    """

    pooled: bool
    capped: bool
    ids: tuple[int, ...] | None = None
    parts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.ids is None) == (self.parts is None):
            raise ValueError("a plan piece has either fixed ids or text parts, not both")
        if self.parts is not None:
            object.__setattr__(self, "parts", tuple(self.parts))
            if len(self.parts) < 2 or not all(isinstance(p, str) for p in self.parts):
                raise ValueError(f"text parts must be two or more strings, got {self.parts!r}")
            if not self.capped:
                raise ValueError("a piece that carries the text is always capped")
        else:
            object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))  # type: ignore[union-attr]

    @property
    def has_text(self) -> bool:
        return self.parts is not None

    def source_for(self, text: str) -> str:
        """The string to tokenize for ``text`` (text pieces only)."""
        if self.parts is None:
            raise ValueError("a fixed piece has no text to insert")
        return text.join(self.parts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanPiece:
        ids, parts = d.get("ids"), d.get("parts")
        return cls(
            pooled=_bool(d["pooled"], "pooled"),
            capped=_bool(d["capped"], "capped"),
            ids=None if ids is None else tuple(_int(i, "ids") for i in ids),
            parts=None if parts is None else tuple(parts),
        )


@dataclass(frozen=True)
class PromptPlan:
    """A template's pieces as ids and text slots, with the limits that apply to them."""

    template: str  # the template's name
    pieces: tuple[PlanPiece, ...]
    max_length: int | None  # tokens per piece (fixed pieces are already cut)
    context_length: int | None  # tokens per prompt
    pad_id: int
    overflow: str = "truncate"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", tuple(self.pieces))
        if not any(p.pooled for p in self.pieces):
            raise ValueError(f"plan {self.template!r} pools nothing")
        if not any(p.has_text for p in self.pieces):
            raise ValueError(f"plan {self.template!r} never inserts the text")
        for name in ("max_length", "context_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"plan {self.template!r}: {name} must be >= 1, got {value!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"plan {self.template!r}: unknown overflow {self.overflow!r}")

    @property
    def capped_pieces(self) -> list[int]:
        """Indices of the pieces cut to the shared cap on overflow."""
        return [i for i, p in enumerate(self.pieces) if p.capped]

    @property
    def text_pieces(self) -> list[int]:
        return [i for i, p in enumerate(self.pieces) if p.has_text]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptPlan:
        """From the manifest's JSON form (raises KeyError/TypeError/ValueError when malformed)."""
        return cls(
            template=str(d["template"]),
            pieces=tuple(PlanPiece.from_dict(p) for p in d["pieces"]),
            max_length=None if d["max_length"] is None else _int(d["max_length"], "max_length"),
            context_length=(
                None if d["context_length"] is None else _int(d["context_length"], "context")
            ),
            pad_id=_int(d["pad_id"], "pad_id"),
            overflow=str(d.get("overflow", "truncate")),
        )


def water_fill(lengths: list[int], budget: int) -> int:
    """Largest cap c >= 1 with sum(min(l, c)) <= budget."""
    lo, hi = 1, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be true or false, got {value!r}")
    return value
