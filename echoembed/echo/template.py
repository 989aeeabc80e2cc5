"""The echo template language (compatible with the official echo-embeddings repo).

Syntax
------
- literal text is encoded but never pooled;
- ``{...}`` is a *segment*: its tokens are pooled;
- ``{!...}`` is a segment that is encoded but not pooled;
- ``%%name%%`` is a variable. ``%%text%%`` is the input text; ``%%bos%%`` / ``%%eos%%`` are the
  model's own BOS/EOS token strings; other names need a default (``defaults=``) or a value at
  encode time. As in the official repo, user variables are substituted inside segments only;
  ``%%bos%%``/``%%eos%%`` may also stand in literal text.

Each piece (literal or segment) is tokenized on its own without special tokens, and the ids are
concatenated, so ``{%%eos%%}`` in its own braces survives per-piece truncation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from echoembed.errors import TemplateError

VARIABLE_RE = re.compile(r"%%([A-Za-z_][A-Za-z0-9_]*)%%")
TEXT_VARIABLE = "text"
SPECIAL_VARIABLES = frozenset({"bos", "eos"})


@dataclass(frozen=True)
class Piece:
    """One contiguous part of a template: a literal or a (pooled or unpooled) segment."""

    source: str
    segment: bool
    pooled: bool

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(VARIABLE_RE.findall(self.source))


def lone_surrogate_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``,
    which tokenizers rejects with a bare TypeError), or None when the whole text encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


SURROGATE_HINT = (
    "a lone surrogate, which no tokenizer can encode (it usually comes from bytes decoded with "
    "errors='surrogateescape' or from half of a UTF-16 pair); decode the source as UTF-8 "
    "(errors='replace' if it is damaged)"
)


def _where(source: str, pos: int) -> str:
    line = source.count("\n", 0, pos) + 1
    col = pos - (source.rfind("\n", 0, pos) + 1) + 1
    snippet = source[max(0, pos - 15) : pos + 15].replace("\n", "\\n")
    return f"line {line}, column {col} (near {snippet!r})"


def parse_pieces(source: str) -> tuple[Piece, ...]:
    """Split a template string into pieces; raise TemplateError on malformed braces."""
    if not isinstance(source, str):
        raise TemplateError(f"a template must be a string, got {type(source).__name__}")
    pieces: list[Piece] = []
    buf: list[str] = []
    open_at: int | None = None
    for i, ch in enumerate(source):
        if ch == "{":
            if open_at is not None:
                raise TemplateError(
                    f"nested '{{' at {_where(source, i)}: segments cannot contain segments; "
                    f"close the segment opened at {_where(source, open_at)} first"
                )
            if buf:
                pieces.append(Piece("".join(buf), segment=False, pooled=False))
                buf = []
            open_at = i
        elif ch == "}":
            if open_at is None:
                raise TemplateError(
                    f"unbalanced '}}' at {_where(source, i)}: there is no '{{' to close; "
                    "remove it or add the opening brace"
                )
            body = "".join(buf)
            pooled = not body.startswith("!")
            body = body if pooled else body[1:]
            if not body:
                raise TemplateError(
                    f"empty segment at {_where(source, open_at)}: put text or a variable such as "
                    "%%text%% between the braces"
                )
            pieces.append(Piece(body, segment=True, pooled=pooled))
            buf = []
            open_at = None
        else:
            buf.append(ch)
    if open_at is not None:
        raise TemplateError(f"unclosed '{{' at {_where(source, open_at)}: add the matching '}}'")
    if buf:
        pieces.append(Piece("".join(buf), segment=False, pooled=False))
    return tuple(pieces)


@dataclass(frozen=True)
class Template:
    """A parsed, validated echo template.

    ``defaults`` gives values for extra variables (e.g. the ``query`` preset's ``prompt``).
    """

    source: str
    name: str = "custom"
    defaults: Mapping[str, str] = field(default_factory=dict)
    pieces: tuple[Piece, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        pieces = parse_pieces(self.source)
        object.__setattr__(self, "pieces", pieces)
        label = f"template {self.name!r}"
        bad = lone_surrogate_at(self.source)
        if bad is not None:
            raise TemplateError(
                f"{label}: character {bad} ({self.source[bad]!r}, {_where(self.source, bad)}) is "
                f"{SURROGATE_HINT}"
            )
        for var, value in self.defaults.items():
            _check_value(var, value)
        if not any(p.pooled for p in pieces):
            raise TemplateError(
                f"{label} has no pooled segment: wrap the part to embed in braces, "
                "e.g. 'Rewritten sentence: {%%text%%}' ('{!...}' segments are not pooled)"
            )
        known = {TEXT_VARIABLE, *SPECIAL_VARIABLES, *self.defaults}
        for p in pieces:
            for var in p.variables:
                if var not in known:
                    raise TemplateError(
                        f"{label} uses unknown variable %%{var}%%; known variables are "
                        f"{sorted(known)}. Fix the spelling or give it a default "
                        f"(Template(..., defaults={{{var!r}: '...'}}))"
                    )
                if not p.segment and var not in SPECIAL_VARIABLES:
                    raise TemplateError(
                        f"{label} has %%{var}%% outside braces; variables are substituted inside "
                        f"segments only (official semantics): write {{!%%{var}%%}} to encode it "
                        f"without pooling, or {{%%{var}%%}} to pool it"
                    )
        if TEXT_VARIABLE not in self.variables:
            raise TemplateError(
                f"{label} never uses %%text%%, so every input would embed the same; "
                "add a segment such as {%%text%%}"
            )
        for var in self.defaults:
            if var in SPECIAL_VARIABLES or var == TEXT_VARIABLE:
                raise TemplateError(
                    f"{label}: %%{var}%% is filled in by echoembed and cannot have a default"
                )

    @property
    def variables(self) -> frozenset[str]:
        out: set[str] = set()
        for p in self.pieces:
            out |= p.variables
        return frozenset(out)

    def resolve_variables(self, overrides: Mapping[str, str] | None) -> dict[str, str]:
        """Merge defaults with per-call overrides; reject unknown names."""
        values = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in self.defaults:
                raise TemplateError(
                    f"template {self.name!r} has no variable %%{key}%% to set; settable "
                    f"variables: {sorted(self.defaults) or 'none'}"
                )
            _check_value(key, value)
            values[key] = value
        return values


def _check_value(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TemplateError(f"variable %%{name}%% must be a string, got {type(value).__name__}")
    bad = lone_surrogate_at(value)
    if bad is not None:
        raise TemplateError(
            f"variable %%{name}%%: character {bad} ({value[bad]!r}) is {SURROGATE_HINT}"
        )


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace every ``%%name%%`` in one pass (a value is never re-scanned)."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise TemplateError(
                f"no value for variable %%{name}%%: pass it in variables= or give the template "
                "a default"
            )
        return values[name]

    return VARIABLE_RE.sub(repl, text)


def substitute_around_text(text: str, values: Mapping[str, str]) -> tuple[str, ...]:
    """``substitute`` leaving every ``%%text%%`` as a split point, in the same single pass:
    ``t.join(parts) == substitute(text, {**values, "text": t})`` for every ``t``."""
    parts: list[str] = []
    buf: list[str] = []
    pos = 0
    for m in VARIABLE_RE.finditer(text):
        buf.append(text[pos : m.start()])
        pos = m.end()
        name = m.group(1)
        if name == TEXT_VARIABLE:
            parts.append("".join(buf))
            buf = []
        elif name in values:
            buf.append(values[name])
        else:
            substitute(m.group(0), values)  # raises the usual TemplateError
    buf.append(text[pos:])
    parts.append("".join(buf))
    return tuple(parts)
