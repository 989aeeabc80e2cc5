"""Batch encoding: masks, padding, bad input, long input."""

from __future__ import annotations

import numpy as np
import pytest

from echoembed.echo import EchoEncoder, EncoderConfig, Template, validate_texts
from echoembed.errors import InputError

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
    ],
)
def test_bad_texts_raise_input_error(texts, fragment):
    with pytest.raises(InputError, match=fragment):
        validate_texts(texts)


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
