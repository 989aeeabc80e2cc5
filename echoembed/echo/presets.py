"""Template presets. The wording of ``echo`` and ``classical`` was chosen by measurement on
STS-B dev (see README, "Choosing the templates", and benchmarks/choose_templates.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from echoembed.echo.template import Template
from echoembed.errors import TemplateError

DEFAULT_QUERY_PROMPT = "Retrieve passages that answer the question"

# Candidates measured on STS-B dev (mean pooling, bundled SmolLM2-135M-Instruct).
ECHO_CANDIDATES: dict[str, str] = {
    "rewrite": "%%bos%%Rewrite the sentence: {!%%text%%}\nRewritten sentence: {%%text%%}",
    "repeat": "%%bos%%Repeat the sentence: {!%%text%%}\nRepeated sentence: {%%text%%}",
    "rephrase": "%%bos%%Rephrase the sentence: {!%%text%%}\nRephrased sentence: {%%text%%}",
    "rewrite-nobos": "Rewrite the sentence: {!%%text%%}\nRewritten sentence: {%%text%%}",
    "rewrite-space": "%%bos%%Rewrite the sentence:{! %%text%%}\nRewritten sentence:{ %%text%%}",
}
CLASSICAL_CANDIDATES: dict[str, str] = {
    "plain": "{%%text%%}",
    "bos": "%%bos%%{%%text%%}",
    "sentence": "%%bos%%Sentence: {%%text%%}",
}
CHOSEN_ECHO = "rewrite-space"
CHOSEN_CLASSICAL = "sentence"


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    description: str
    defaults: Mapping[str, str] = field(default_factory=dict)

    def template(self) -> Template:
        return Template(self.source, name=self.name, defaults=self.defaults)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "echo",
            ECHO_CANDIDATES[CHOSEN_ECHO],
            "instruction + text, then the text again; pooled on the second copy",
        ),
        Preset(
            "classical",
            CLASSICAL_CANDIDATES[CHOSEN_CLASSICAL],
            "the text once, pooled (the classical baseline)",
        ),
        Preset(
            "query",
            "%%bos%%Instruct:{!%%prompt%%,}\nQuery:{!%%text%%}\nQuery again:{%%text%%}{%%eos%%}",
            "official retrieval query template: second copy and EOS pooled",
            {"prompt": DEFAULT_QUERY_PROMPT},
        ),
        Preset(
            "document",
            "%%bos%%Document:{!%%text%%}\nDocument again:{%%text%%}{%%eos%%}",
            "official retrieval document template: second copy and EOS pooled",
        ),
    )
}


def get_template(spec: "Template | str") -> Template:
    """A preset by name, a Template as is, or a template string containing braces."""
    if isinstance(spec, Template):
        return spec
    if not isinstance(spec, str):
        raise TemplateError(
            f"template must be a preset name or a string, got {type(spec).__name__}"
        )
    if spec in PRESETS:
        return PRESETS[spec].template()
    if "{" in spec or "}" in spec:
        return Template(spec)
    raise TemplateError(
        f"unknown template preset {spec!r}; presets are {sorted(PRESETS)}, or pass a template "
        "string such as 'Rewrite: {!%%text%%}\\nAgain: {%%text%%}'"
    )
