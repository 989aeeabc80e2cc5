"""PromptPlan: what the manifest records per template, checked against EchoEncoder; manifests
(format 3) carry the plans, older formats load without them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from echoembed.artifact import FORMAT_VERSION, FusionInfo, Manifest
from echoembed.echo import (
    PRESETS,
    EchoEncoder,
    EncoderConfig,
    PlanPiece,
    PromptPlan,
    Template,
    template_plans,
    water_fill,
)
from echoembed.echo.template import SPECIAL_VARIABLES, substitute, substitute_around_text
from echoembed.errors import ArtifactError, TemplateError
from echoembed.validation import read_sts
from tests.helpers import STSB_TEST

DATA = Path(__file__).parent / "data"
LONG = " ".join(["The committee discussed the proposal at considerable length."] * 12)
LIMITS = [(None, None), (None, 8192), (6, None), (16, 40), (None, 40), (None, 25)]


@pytest.fixture(scope="module")
def texts():
    return read_sts(STSB_TEST, limit=25).unique_sentences()[:40] + [LONG, "x", "a %%text%% b"]


def _consume(plan: PromptPlan, tokenizer, text: str) -> tuple[list[int], list[int], bool]:
    """An independent consumer of a plan, written from echo/plan.py's docstring (what
    examples/cpp does)."""
    pieces = []
    for p in plan.pieces:
        if p.ids is not None:
            ids = list(p.ids)
        else:
            ids = tokenizer.encode(text.join(p.parts), add_special_tokens=False).ids
            ids = ids if plan.max_length is None else ids[: plan.max_length]
        pieces.append(ids)
    truncated = False
    total = sum(map(len, pieces))
    if plan.context_length is not None and total > plan.context_length:
        capped = [i for i, p in enumerate(plan.pieces) if p.capped]
        budget = plan.context_length - sum(len(x) for i, x in enumerate(pieces) if i not in capped)
        cap = max(
            c
            for c in range(1, max(len(pieces[i]) for i in capped) + 1)
            if sum(min(len(pieces[i]), c) for i in capped) <= budget
        )
        pieces = [x[:cap] if i in capped else x for i, x in enumerate(pieces)]
        truncated = True
    ids = [t for x in pieces for t in x]
    flags = [int(p.pooled) for p, x in zip(plan.pieces, pieces, strict=True) for _ in x]
    return ids, flags, truncated


@pytest.mark.parametrize("limits", LIMITS, ids=str)
@pytest.mark.parametrize("name", list(PRESETS))
def test_plan_reproduces_the_encoder(smollm2_tokenizer, texts, name, limits):
    tok, special, _ = smollm2_tokenizer
    tpl = PRESETS[name].template()
    enc = EchoEncoder(tok, special, EncoderConfig(tpl, *limits))
    plan = enc.plan()
    assert plan == enc.plan() and plan.template == name
    assert (plan.max_length, plan.context_length, plan.pad_id) == (*limits, enc.pad_id)
    rows = enc.encode_ids(texts)
    for text, row in zip(texts, rows, strict=True):
        assert _consume(plan, tok, text) == (row.ids, row.pool_flags, row.truncated)
    if limits[1] == 25:
        assert rows[-3].truncated, "the long text overflows the context"
    values = {**tpl.defaults, **special.as_variables()}
    for piece, src in zip(plan.pieces, tpl.pieces, strict=True):
        assert piece.pooled == src.pooled
        assert piece.capped == bool(src.segment and src.variables - SPECIAL_VARIABLES)
        if piece.has_text:
            assert piece.source_for("T") == substitute(src.source, {**values, "text": "T"})
        else:
            want = tok.encode(substitute(src.source, values), add_special_tokens=False).ids
            assert list(piece.ids) == (want if limits[0] is None else want[: limits[0]])


def test_query_prompt_is_fixed_ids_but_capped_and_overridable(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    enc = EchoEncoder(tok, special, EncoderConfig(PRESETS["query"].template()))
    prompt = enc.plan().pieces[1]  # {!%%prompt%%,}
    assert prompt.ids is not None and prompt.capped and not prompt.pooled
    other = enc.plan({"prompt": "Find it"}).pieces[1]
    assert other.ids == tuple(tok.encode("Find it,", add_special_tokens=False).ids)
    row = enc.encode_ids(["Hi there"], {"prompt": "Find it"})[0]
    assert _consume(enc.plan({"prompt": "Find it"}), tok, "Hi there") == tuple(row)


def test_text_split_is_one_pass():
    values = {"p": "%%text%% inside a value", "bos": "<s>"}
    parts = substitute_around_text("%%bos%%{%%p%%}: %%text%% and %%text%%!", values)
    assert parts == ("<s>{%%text%% inside a value}: ", " and ", "!")
    for t in ("", "x", "%%text%%"):
        assert t.join(parts) == substitute(
            "%%bos%%{%%p%%}: %%text%% and %%text%%!", {**values, "text": t}
        )
    with pytest.raises(TemplateError, match="no value for variable %%q%%"):
        substitute_around_text("{%%q%% %%text%%}", {})


def test_water_fill():
    assert water_fill([10, 10], 12) == 6
    assert water_fill([3, 10], 12) == 9
    assert water_fill([5, 5], 100) == 5
    assert water_fill([4, 4], 2) == 1


def test_plan_rejects_malformed_pieces():
    with pytest.raises(ValueError, match="either fixed ids or text parts"):
        PlanPiece(pooled=True, capped=True, ids=(1,), parts=("", ""))
    with pytest.raises(ValueError, match="always capped"):
        PlanPiece(pooled=True, capped=False, parts=("", ""))
    with pytest.raises(ValueError, match="two or more"):
        PlanPiece(pooled=True, capped=True, parts=("only",))
    text = PlanPiece(pooled=False, capped=True, parts=("", ""))
    with pytest.raises(ValueError, match="pools nothing"):
        PromptPlan("t", (text,), None, None, 0)


def test_templates_the_tokenizer_cannot_encode_get_no_plan(smollm2_tokenizer):
    tok, special, _ = smollm2_tokenizer
    no_bos = dataclasses.replace(special, bos=None)
    tpls = [p.template() for p in PRESETS.values()] + [Template("{%%text%%}", name="bare")]
    plans = template_plans(tok, no_bos, tpls, None, 100)
    assert [p.template for p in plans] == ["bare"]  # every preset uses %%bos%%


# -- manifests ---------------------------------------------------------------------------------


def _format1() -> dict:
    return json.loads((DATA / "manifest-format1-int8-dynamic.json").read_text(encoding="utf-8"))


def _plans(smollm2_tokenizer) -> tuple[PromptPlan, ...]:
    tok, special, _ = smollm2_tokenizer
    return template_plans(tok, special, [p.template() for p in PRESETS.values()], None, 8192)


def test_format4_round_trips_plans_and_fusion(smollm2_tokenizer):
    assert FORMAT_VERSION == 5  # 5 added the shared prefix (tests/test_prefix.py)
    fusion = FusionInfo(True, True, "", "onnxscript", {"GroupQueryAttention": 30}, 2186, 426,
                        6e-7, True)  # fmt: skip
    m = dataclasses.replace(
        Manifest.from_dict(_format1()), prompt_plans=_plans(smollm2_tokenizer), fusion=fusion
    )
    data = json.loads(m.to_json())
    assert data["format_version"] == 5 and len(data["prompt_plans"]) == 4
    assert data["fusion"]["ops"] == {"GroupQueryAttention": 30}
    again = Manifest.from_dict(data)
    assert again == dataclasses.replace(m, format_version=5) and again.prefix is None
    three = Manifest.from_dict(dict({k: v for k, v in data.items() if k != "fusion"},
                                    format_version=3))  # fmt: skip
    assert three.format_version == 3 and three.fusion is None  # written before the fused stage
    assert again.plan("query") == m.prompt_plans[2] and again.plan("nope") is None
    assert isinstance(again.plan("echo").pieces[0].ids, tuple)


def test_format2_loads_without_plans_and_format3_must_carry_them(smollm2_tokenizer):
    m = dataclasses.replace(Manifest.from_dict(_format1()), prompt_plans=_plans(smollm2_tokenizer))
    data = json.loads(m.to_json())
    old = {k: v for k, v in data.items() if k != "prompt_plans"}
    read = Manifest.from_dict(dict(old, format_version=2))
    assert read.format_version == 2 and read.prompt_plans == ()
    assert json.loads(read.to_json())["prompt_plans"] == []
    with pytest.raises(ArtifactError, match="malformed manifest.*prompt_plans"):
        Manifest.from_dict(old)  # format 3 without the field
    bad = json.loads(json.dumps(data))
    bad["prompt_plans"][0]["pieces"][0]["parts"] = ["", ""]  # both ids and parts
    with pytest.raises(ArtifactError, match="malformed manifest.*either fixed ids or text"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["prompt_plans"][0]["pad_id"] = "2"
    with pytest.raises(ArtifactError, match="malformed manifest.*pad_id"):
        Manifest.from_dict(bad)


def test_exported_artifact_records_the_runtime_plans(smollm2_artifact):
    from echoembed.runtime import Embedder

    m = smollm2_artifact.manifest
    assert [p.template for p in m.prompt_plans] == [t.name for t in m.templates]
    emb = Embedder.load(smollm2_artifact.path)
    assert emb.manifest.prompt_plans == m.prompt_plans
    for p in m.prompt_plans:
        assert p == emb.encoder(p.template).plan()
