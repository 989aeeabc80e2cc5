"""Batch encoding: masks, padding, bad input, long input."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.echo import EchoEncoder, EncodedRow, EncoderConfig, Template, validate_texts
from echoembed.errors import InputError, TemplateError

TEMPLATE = "%%bos%%Say:{!%%text%%}\n{%%text%%}{%%eos%%}"


@pytest.fixture()
def make(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer

    def make(**cfg):
        return EchoEncoder(tok, special, EncoderConfig(Template(TEMPLATE), **cfg))

    return make


def test_right_padding_and_dtypes(make, smollm2_tokenizer):
    tok = smollm2_tokenizer[0]
    enc = make()
    b = enc.encode(["Hello world", "The cat sat on the mat."])
    for arr in (b.input_ids, b.attention_mask, b.pool_mask):
        assert arr.dtype == np.int64 and arr.shape == b.input_ids.shape
    short = 1 + 2 + 2 + 1 + 2 + 1
    assert b.attention_mask[0].tolist() == [1] * short + [0] * (b.input_ids.shape[1] - short)
    assert b.pool_mask[0, short:].sum() == 0
    assert (b.input_ids[0, short:] == enc.pad_id).all()
    assert enc.pad_id == tok.token_to_id("<|im_end|>")
    assert b.lengths.tolist() == [short, b.input_ids.shape[1]]
    assert not b.truncated.any()


def test_take_trims_to_longest_row(make):
    b = make().encode(["The cat sat on the mat.", "Hello world"])
    sub = b.take([1])
    assert sub.input_ids.shape == (1, int(b.attention_mask[1].sum()))
    assert sub.feed()["pool_mask"].tolist() == [b.pool_mask[1, : sub.input_ids.shape[1]].tolist()]


@pytest.mark.parametrize(
    "texts, fragment",
    [
        ([""], r"texts\[0\] is empty"),
        (["ok", "   \n\t"], r"texts\[1\] is empty or whitespace-only"),
        (["ok", 3], r"texts\[1\] is int, not str"),
        ([None], r"texts\[0\] is NoneType"),
        (42, "must be a list of strings"),
        (["ok", "bad \ud800"], r"texts\[1\] cannot be encoded as UTF-8: character 4"),
        (["\udcff"], r"texts\[0\] .*lone surrogate.*errors='replace'"),
    ],
)
def test_bad_texts_raise_input_error(texts, fragment):
    with pytest.raises(InputError, match=fragment):
        validate_texts(texts)


def test_lone_surrogate_is_an_input_error_not_a_type_error(make):
    enc = make()
    texts = ["fine", "also fine", "still fine", "bad \ud800 text"]
    with pytest.raises(InputError, match=r"texts\[3\] cannot be encoded as UTF-8") as info:
        enc.encode(texts)
    assert "lone surrogate" in str(info.value) and "'\\ud800'" in str(info.value)
    with pytest.raises(InputError, match=r"texts\[3\]"):
        enc.encode_ids(texts)
    # a surrogate pair written as one code point is ordinary text
    assert enc.encode(["emoji \U0001f642"]).input_ids.shape[0] == 1


def test_nul_and_control_characters_are_text(make, smollm2_tokenizer):
    """NUL and other control characters are valid UTF-8: the byte-level tokenizer gives them
    their own byte tokens and decodes them back, so they are embedded, not rejected."""
    tok = smollm2_tokenizer[0]
    enc = make()
    for text in ["a\x00b", "\x00", "tab\x1bescape", "zero\u200bwidth"]:
        [row] = enc.encode_ids([text])
        pieces = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(pieces) == text
        pooled = [i for i, f in zip(row.ids, row.pool_flags, strict=True) if f][:-1]  # no EOS
        assert pooled == pieces


def test_surrogate_in_a_variable_is_a_template_error(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    tpl = Template("{!%%prompt%%: %%text%%}{%%text%%}", defaults={"prompt": "Say"})
    enc = EchoEncoder(tok, special, EncoderConfig(tpl))
    with pytest.raises(TemplateError, match=r"%%prompt%%: character 1 .*lone surrogate"):
        enc.encode(["fine"], variables={"prompt": "S\ud800"})


def test_encoded_row_is_a_named_tuple(make):
    enc = make()
    rows = enc.encode_ids(["Hello world", "The cat sat on the mat."])
    assert all(isinstance(r, EncodedRow) for r in rows)
    r = rows[0]
    assert len(r.ids) == len(r.pool_flags) == 9 and r.truncated is False
    assert set(r.pool_flags) == {0, 1}
    ids, flags, truncated = r  # still a tuple for callers that unpack
    assert (ids, flags, truncated) == (r.ids, r.pool_flags, r.truncated)
    padded, plain = enc.pad(rows), enc.pad([tuple(x) for x in rows])
    for name in ("input_ids", "attention_mask", "pool_mask", "truncated"):
        np.testing.assert_array_equal(getattr(padded, name), getattr(plain, name))


def test_single_string_is_one_text():
    assert validate_texts("hello") == ["hello"]


def test_empty_list_is_an_error(make):
    with pytest.raises(InputError, match="nothing to encode"):
        make().encode([])


def test_long_text_truncates_both_copies_to_fit_context(make, smollm2_tokenizer):
    tok = smollm2_tokenizer[0]
    text = " ".join(["word"] * 200)  # ~200 tokens per copy
    enc = make(context_length=64)
    b = enc.encode([text, "Hello world"])
    assert b.truncated.tolist() == [True, False]
    ids = b.input_ids[0].tolist()
    assert len(ids) <= 64 and b.lengths[0] <= 64
    assert ids[0] == 1 and ids[-1] == 2, "BOS and EOS survive truncation"
    fixed = 1 + 2 + 1 + 1  # bos, Say:, newline, eos
    cap = (64 - fixed) // 2
    full = tok.encode(text, add_special_tokens=False).ids
    assert ids[3 : 3 + cap] == full[:cap], "first copy keeps the leading tokens"
    second = [i for i, m in zip(ids, b.pool_mask[0].tolist(), strict=True) if m][:-1]
    assert second == full[:cap], "second copy keeps the same leading tokens"


def test_long_text_errors_when_asked(make):
    with pytest.raises(InputError, match="over the model's context of 64"):
        make(context_length=64, overflow="error").encode([" ".join(["word"] * 200)])


def test_bad_config_values(make):
    with pytest.raises(InputError, match="max_length"):
        make(max_length=0)
    with pytest.raises(InputError, match="overflow"):
        make(overflow="drop")
