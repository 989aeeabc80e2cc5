"""Template language: parsing, errors, and golden ids on the real SmolLM2 tokenizer.

Expected ids follow the rules (each piece tokenized alone, no special tokens, concatenated),
using ids checked by hand against the tokenizer: 'Hello world' -> [19556, 905],
'<|im_start|>' -> 1, '<|im_end|>' -> 2, '\\n' -> 198, 'Say:' -> [36218, 42].
"""

from __future__ import annotations

import pytest

from echoembed.echo import (
    PRESETS,
    EchoEncoder,
    EncoderConfig,
    SpecialTokens,
    Template,
    get_template,
    parse_pieces,
)
from echoembed.errors import TemplateError, UserError

HELLO = [19556, 905]
BOS, EOS, NL, SAY = 1, 2, 198, [36218, 42]


def encoder(tok, special, source, **cfg):
    return EchoEncoder(
        tok, special, EncoderConfig(Template(source, defaults=cfg.pop("defaults", {})), **cfg)
    )


def test_parse_pieces():
    pieces = parse_pieces("A {!%%text%%} B {%%text%%}{x}")
    assert [(p.source, p.segment, p.pooled) for p in pieces] == [
        ("A ", False, False),
        ("%%text%%", True, False),
        (" B ", False, False),
        ("%%text%%", True, True),
        ("x", True, True),
    ]


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("Say: {%%text%%", "unclosed"),
        ("Say: %%text%%}", "unbalanced"),
        ("Say: {a {%%text%%}}", "nested"),
        ("Say: {}{%%text%%}", "empty segment"),
        ("Say: {!%%text%%}", "no pooled segment"),
        ("Say: {%%txt%%}", "unknown variable %%txt%%"),
        ("Say: %%text%% {%%text%%}", "outside braces"),
        ("Say: {hello}", "never uses %%text%%"),
    ],
)
def test_template_errors_are_typed_and_actionable(source, fragment):
    with pytest.raises(TemplateError, match=fragment):
        Template(source)


@pytest.mark.parametrize(
    "source, defaults, fragment",
    [
        ("{%%text%%} \ud800", {}, r"character 11 \('\\ud800', line 1, column 12"),
        ("{!%%p%%}{%%text%%}", {"p": "x\udc80"}, r"%%p%%: character 1 .*lone surrogate"),
        ("{!%%p%%}{%%text%%}", {"p": 3}, r"%%p%% must be a string, got int"),
    ],
)
def test_unencodable_template_parts_are_template_errors(source, defaults, fragment):
    with pytest.raises(TemplateError, match=fragment):
        Template(source, defaults=defaults)


def test_unencodable_variable_override_is_a_template_error():
    tpl = Template("{!%%p%%}{%%text%%}", defaults={"p": "x"})
    with pytest.raises(TemplateError, match=r"%%p%%: character 0 .*errors='replace'"):
        tpl.resolve_variables({"p": "\ud800"})
    assert tpl.resolve_variables({"p": "\x00ok"}) == {"p": "\x00ok"}


def test_template_error_says_where():
    with pytest.raises(TemplateError, match=r"line 2, column 5"):
        Template("ok\nabc }{%%text%%}")


def test_template_error_is_a_user_error():
    assert issubclass(TemplateError, UserError)


def test_unknown_preset_lists_presets():
    with pytest.raises(TemplateError, match="presets are"):
        get_template("echoo")


def test_literal_and_segments_golden(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    enc = encoder(tok, special, "%%bos%%Say:{!%%text%%}\n{%%text%%}{%%eos%%}")
    b = enc.encode(["Hello world"])
    assert b.input_ids[0].tolist() == [BOS, *SAY, *HELLO, NL, *HELLO, EOS]
    assert b.pool_mask[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert b.attention_mask[0].tolist() == [1] * 9


def test_pieces_are_tokenized_separately(smollm2_tokenizer):
    # ' Hello world' alone is [38699, 905]; split as literal ' ' + segment, the text keeps its
    # own tokenization, exactly as the official repo does.
    tok, special, _ = smollm2_tokenizer
    space = tok.encode(" ", add_special_tokens=False).ids
    b = encoder(tok, special, " {%%text%%}").encode(["Hello world"])
    assert b.input_ids[0].tolist() == [*space, *HELLO]
    b2 = encoder(tok, special, "{ %%text%%}").encode(["Hello world"])
    assert b2.input_ids[0].tolist() == [38699, 905]


def test_variables_defaults_and_overrides(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    enc = encoder(tok, special, "{!%%p%%}{%%text%%}", defaults={"p": "Say:"})
    assert enc.encode(["Hello world"]).input_ids[0].tolist() == [*SAY, *HELLO]
    over = enc.encode(["Hello world"], variables={"p": "Hello world"})
    assert over.input_ids[0].tolist() == HELLO + HELLO
    with pytest.raises(TemplateError, match="no variable %%q%%"):
        enc.encode(["x"], variables={"q": "y"})


def test_text_is_not_rescanned_for_variables(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    enc = encoder(tok, special, "{%%text%%}")
    ids = enc.encode(["%%eos%%"]).input_ids[0].tolist()
    assert EOS not in ids
    assert ids == tok.encode("%%eos%%", add_special_tokens=False).ids


def test_per_piece_max_length(smollm2_tokenizer):
    # max_length truncates every piece on its own, literal pieces included (official semantics),
    # which is why EOS lives in its own braces.
    tok, special, _ = smollm2_tokenizer
    long = "The cat sat on the mat."  # [504, 2644, 2643, 335, 260, 1171, 30]
    enc = encoder(tok, special, "Say:{!%%text%%}{%%text%%}{%%eos%%}", max_length=3)
    b = enc.encode([long])
    assert b.input_ids[0].tolist() == [*SAY, 504, 2644, 2643, 504, 2644, 2643, EOS]
    assert b.pool_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    enc1 = encoder(tok, special, "Say:{%%text%%}", max_length=1)
    assert enc1.encode([long]).input_ids[0].tolist() == [SAY[0], 504]


def test_missing_special_token_is_a_template_error(smollm2_tokenizer):
    tok, _, _ = smollm2_tokenizer
    with pytest.raises(TemplateError, match="no bos token"):
        encoder(tok, SpecialTokens(bos=None, eos="<|im_end|>"), "%%bos%%{%%text%%}")


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack)))


def test_presets_are_valid_and_pool_the_second_copy(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    assert set(PRESETS) == {"echo", "classical", "query", "document"}
    text = "The cat sat on the mat."
    for name in ("echo", "query", "document"):
        enc = EchoEncoder(tok, special, EncoderConfig(get_template(name)))
        b = enc.encode([text])
        ids, pm = b.input_ids[0].tolist(), b.pool_mask[0].tolist()
        pooled = [i for i, m in zip(ids, pm, strict=True) if m]
        if name in ("query", "document"):
            assert pooled[-1] == EOS, "retrieval presets pool the EOS token"
            pooled = pooled[:-1]
        assert tok.decode(pooled).strip() == text
        # the pooled span is the *second* copy: the same ids occur earlier, unpooled
        first_end = pm.index(1)
        assert _contains(ids[:first_end], pooled)
        assert all(pm[first_end : first_end + len(pooled)])
    classical = EchoEncoder(tok, special, EncoderConfig(get_template("classical"))).encode([text])
    pooled = classical.input_ids[0][classical.pool_mask[0] == 1].tolist()
    assert tok.decode(pooled).strip() == text
    assert not _contains(classical.input_ids[0][classical.pool_mask[0] == 0].tolist(), pooled)
