"""`echoembed validate`: data readers, subsets, classifiers, report schema, budget gate, and
end-to-end runs (tiny model on every task; the real model on an STS-B slice)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from echoembed.errors import InputError
from echoembed.validation.classification import (
    ClassificationConfig,
    classification_accuracy,
    read_classification,
    train_per_label,
)
from echoembed.validation.report import (
    Agreement,
    Budget,
    Latency,
    MachineInfo,
    TaskScore,
    ValidationReport,
    format_report,
    read_report,
)
from echoembed.validation.retrieval import (
    DEFAULT_DISTRACTORS,
    RetrievalConfig,
    RetrievalData,
    evaluate_retrieval,
    rank,
    read_retrieval,
)
from echoembed.validation.validate import (
    EmbeddingCache,
    LatencyConfig,
    ValidateConfig,
    check_budget,
    classification_options,
    quick_distractors,
    retrieval_options,
    validate,
)
from tests.helpers import SHARED_DATA, STSB_TEST

SCIFACT = SHARED_DATA / "scifact"
BANKING77 = SHARED_DATA / "banking77" / "test.tsv"


# --- retrieval -------------------------------------------------------------------------------


def test_scifact_subset_keeps_every_judged_doc_plus_seeded_distractors():
    full = read_retrieval(SCIFACT, RetrievalConfig(distractors=None))
    assert full.is_full and full.corpus_size == 5183 and len(full.corpus) == 5183
    assert len(full.queries) == 300 and sum(len(v) for v in full.qrels.values()) == 339
    judged = {d for v in full.qrels.values() for d in v}
    sub = read_retrieval(SCIFACT, RetrievalConfig(distractors=100, seed=0))
    assert judged <= set(sub.corpus)
    assert len(sub.corpus) == len(judged) + 100 and not sub.is_full
    again = read_retrieval(SCIFACT, RetrievalConfig(distractors=100, seed=0))
    other = read_retrieval(SCIFACT, RetrievalConfig(distractors=100, seed=1))
    assert list(again.corpus) == list(sub.corpus)
    assert set(other.corpus) != set(sub.corpus)
    # BEIR convention: title, a space, the abstract
    doc = next(iter(sub.corpus))
    raw = next(
        json.loads(line)
        for line in (SCIFACT / "corpus.jsonl").open(encoding="utf-8")
        if json.loads(line)["_id"] == doc
    )
    assert sub.corpus[doc] == f"{raw['title']} {raw['text']}".strip()


def test_scifact_first_queries_only_bring_their_own_judged_docs():
    sub = read_retrieval(SCIFACT, RetrievalConfig(queries=5, distractors=0))
    assert len(sub.queries) == 5
    assert set(sub.corpus) == {d for v in sub.qrels.values() for d in v}


def test_retrieval_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="missing corpus.jsonl"):
        read_retrieval(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "t", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "q"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(InputError, match="not in the corpus"):
        read_retrieval(tmp_path)
    with pytest.raises(InputError, match="distractors must be >= 0"):
        read_retrieval(tmp_path, RetrievalConfig(distractors=-1))


def test_rank_and_retrieval_scores_on_hand_made_embeddings():
    docs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.8, 0.6, 0]], dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    q = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    assert rank(q, docs, ids, 2) == [["a", "d"], ["c", "a"]]
    data = RetrievalData(
        "toy",
        corpus={i: i for i in ids},
        queries={"q1": "x", "q2": "y"},
        qrels={"q1": {"d": 1}, "q2": {"c": 1, "b": 1}},
        corpus_size=4,
    )
    s = evaluate_retrieval(data, lambda _t: q, lambda _t: docs, RetrievalConfig(recall_k=2))
    # q1 ranks a, d, ...: its relevant doc at rank 2 -> 1/log2(3).
    # q2 ranks c, then the ties a, b, d in corpus order: relevant c at 1 and b at 3.
    ndcg_q1 = 1 / np.log2(3)
    ndcg_q2 = (1.0 + 1 / np.log2(4)) / (1.0 + 1 / np.log2(3))
    assert s.ndcg == pytest.approx(100 * (ndcg_q1 + ndcg_q2) / 2)
    assert s.recall == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert (s.queries, s.documents) == (2, 4)


def test_limit_scales_the_distractors_unless_they_were_given():
    assert quick_distractors(None) == DEFAULT_DISTRACTORS == 500
    assert [quick_distractors(n) for n in (2, 100, 499, 500, 10_000)] == [2, 100, 499, 500, 500]
    base = ValidateConfig(retrieval=SCIFACT)
    assert (retrieval_options(base).queries, retrieval_options(base).distractors) == (None, 500)
    quick = retrieval_options(ValidateConfig(retrieval=SCIFACT, limit=100))
    assert (quick.queries, quick.distractors) == (100, 100)
    assert "first 100 queries, judged docs + 100 seeded distractors" in quick.describe()
    # given explicitly (even the default count): never scaled
    for given, want in ((500, 500), (7, 7), ("all", None)):
        opts = retrieval_options(ValidateConfig(retrieval=SCIFACT, limit=100, distractors=given))
        assert (opts.queries, opts.distractors) == (100, want)
    # the older way to give them, through retrieval_options, counts as given too
    old = ValidateConfig(limit=100, retrieval_options=RetrievalConfig(distractors=40, seed=3))
    assert (retrieval_options(old).distractors, retrieval_options(old).seed) == (40, 3)
    old_all = ValidateConfig(limit=100, retrieval_options=RetrievalConfig(distractors=None))
    assert retrieval_options(old_all).distractors is None
    twice = ValidateConfig(distractors=5, retrieval_options=RetrievalConfig(distractors=40))
    with pytest.raises(InputError, match="distractors given twice"):
        retrieval_options(twice)
    with pytest.raises(InputError, match="a count or 'all'"):
        retrieval_options(ValidateConfig(distractors="most"))  # type: ignore[arg-type]
    assert classification_options(ValidateConfig(limit=100)).limit == 100
    assert classification_options(ValidateConfig()).limit is None


def test_quick_look_subset_sizes_on_scifact():
    """--limit 100: 100 queries, their 101 judged documents and 100 distractors (not 500)."""
    sub = read_retrieval(SCIFACT, retrieval_options(ValidateConfig(limit=100)))
    judged = {d for v in sub.qrels.values() for d in v}
    assert len(sub.queries) == 100 and len(judged) == 101
    assert judged <= set(sub.corpus) and len(sub.corpus) == 101 + 100
    full = read_retrieval(SCIFACT, retrieval_options(ValidateConfig(limit=100, distractors=500)))
    assert len(full.corpus) == 101 + 500


def test_conflicting_distractors_fail_before_any_model_loads(tmp_path):
    config = ValidateConfig(
        retrieval=SCIFACT, distractors=5, retrieval_options=RetrievalConfig(distractors=40)
    )
    with pytest.raises(InputError, match="distractors given twice"):
        validate(tmp_path / "no-artifact-here", config)


# --- classification --------------------------------------------------------------------------


def test_banking77_reader_and_seeded_limit():
    full = read_classification(BANKING77)
    assert len(full) == 3080 and len(set(full.labels)) == 77
    sub = read_classification(BANKING77, ClassificationConfig(limit=770))
    counts = {lab: sub.labels.count(lab) for lab in set(sub.labels)}
    assert set(counts.values()) == {10} and len(counts) == 77
    assert read_classification(BANKING77, ClassificationConfig(limit=770)) == sub
    assert train_per_label(sub.labels, ClassificationConfig()) == 5  # half of 10, not 20
    assert train_per_label(full.labels, ClassificationConfig()) == 20


def test_classification_reader_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_classification(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nx\ta\n")
    with pytest.raises(InputError, match="header 'text<TAB>label'"):
        read_classification(bad)
    one = tmp_path / "one.tsv"
    one.write_text("text\tlabel\nx\ta\ny\ta\n")
    with pytest.raises(InputError, match=">= 2 labels"):
        read_classification(one)


@pytest.mark.parametrize("classifier", ["logreg", "knn"])
def test_classifiers_separate_clusters_and_fail_on_noise(classifier):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    labels = [f"c{i % 4}" for i in range(80)]
    x = np.stack([centers[int(lab[1])] + rng.normal(size=16) * 0.3 for lab in labels])
    cfg = ClassificationConfig(classifier=classifier, train_per_label=5, splits=3)
    assert classification_accuracy(x, labels, cfg) == pytest.approx(100.0)
    noise = rng.normal(size=(80, 16))
    assert classification_accuracy(noise, labels, cfg) < 60.0  # chance is 25


# --- report and budget -----------------------------------------------------------------------


MACHINE = MachineInfo(
    platform="Linux-x86_64", processor="x86_64", cpu_model="AMD EPYC", int8_u8s8_saturates=False,
    cpu_count=2, python="3.11.7", onnxruntime="1.32.0", cpu_id="AuthenticAMD family 25 model 1",
    providers=("CPUExecutionProvider",),
)  # fmt: skip
MACHINE_KEYS = {
    "platform", "processor", "cpu_model", "int8_u8s8_saturates", "cpu_count", "python",
    "onnxruntime", "cpu_id",
}  # fmt: skip


def _report(drop: float = 0.3, budget: Budget | None = None) -> ValidationReport:
    return ValidationReport(
        artifact="artifacts/x",
        precision="int8-dynamic",
        model_sha256="ab" * 32,
        reference="smollm2",
        created="2026-11-25T00:00:00+00:00",
        seconds=1.5,
        machine=MACHINE,
        agreement=Agreement(10, 0.995, 0.98, 0.981),
        scores=(
            TaskScore("sts", "stsb/test", "spearman", "echo", 10, 58.0, 58.0 + drop, 40.0, "all"),
            TaskScore("retrieval", "scifact", "ndcg@10", "q/d", 3, 50.0, None, None, "x"),
        ),
        latency=(Latency("artifact", 10.0, 20.0, 4, 100.0, 32, 8),),
        budget=budget,
    )


def test_report_json_round_trip_and_schema(tmp_path):
    rep = _report(budget=Budget(0.5, 0.3, "sts spearman", True))
    data = json.loads(rep.to_json())
    assert data["schema"] == 1
    assert set(data) == {
        "artifact", "precision", "model_sha256", "reference", "created", "seconds", "machine",
        "agreement", "scores", "latency", "budget", "schema",
    }  # fmt: skip
    assert data["scores"][0]["drop"] == pytest.approx(0.3)
    assert data["scores"][1]["drop"] is None
    path = tmp_path / "report.json"
    path.write_text(rep.to_json())
    assert read_report(path) == rep
    data["schema"] = 99
    with pytest.raises(InputError, match="schema 99"):
        ValidationReport.from_json(json.dumps(data))
    data["schema"] = 1
    del data["agreement"]
    with pytest.raises(InputError, match="not a valid echoembed validation report"):
        ValidationReport.from_json(json.dumps(data))


def test_machine_info_keeps_the_report_keys():
    data = json.loads(_report().to_json())["machine"]
    assert set(data) == MACHINE_KEYS | {"providers"}
    assert data["providers"] == ["CPUExecutionProvider"] and data["cpu_model"] == "AMD EPYC"
    bare = dataclasses.replace(MACHINE, providers=None)
    assert set(bare.to_dict()) == MACHINE_KEYS  # no providers key, as before
    assert MachineInfo.from_dict(bare.to_dict()) == bare
    # reports from before cpu_model, int8_u8s8_saturates and cpu_id existed still read
    new_keys = ("cpu_model", "int8_u8s8_saturates", "cpu_id")
    old = {k: v for k, v in bare.to_dict().items() if k not in new_keys}
    assert MachineInfo.from_dict(old) == dataclasses.replace(
        bare, cpu_model=None, int8_u8s8_saturates=None, cpu_id=None
    )
    with pytest.raises(TypeError):
        MachineInfo.from_dict({**old, "gpu": "none"})
    from echoembed.validation.report import machine_info

    here = machine_info(["CPUExecutionProvider"])
    assert here.providers == ("CPUExecutionProvider",) and here.cpu_count and here.onnxruntime
    assert set(machine_info().to_dict()) == MACHINE_KEYS


def test_budget_takes_the_worst_drop():
    scores = _report(drop=0.7).scores
    b = check_budget(scores, 0.5)
    assert (b.passed, b.worst, b.worst_drop) == (False, "sts spearman", pytest.approx(0.7))
    assert check_budget(scores, 0.71).passed
    text = format_report(_report(drop=0.7, budget=b))
    assert "budget: FAIL" in text and "| sts | stsb/test | spearman | echo | 10 | 58.00 |" in text
    assert "CPU: AMD EPYC (AuthenticAMD family 25 model 1), 2 cores; onnxruntime 1.32.0" in text
    with pytest.raises(InputError, match="needs task scores"):
        check_budget(scores[1:], 0.5)


def test_cli_exit_code_follows_the_budget(monkeypatch, tmp_path, capsys):
    import echoembed.validation.validate as v
    from echoembed.cli.main import main

    for passed, code in ((True, 0), (False, 1)):
        rep = _report(budget=Budget(0.5, 0.3 if passed else 0.7, "sts spearman", passed))
        monkeypatch.setattr(v, "validate", lambda *_a, rep=rep, **_k: v.ValidationResult(rep, None))
        assert main(["validate", "x", "--sts", str(STSB_TEST), "--max-drop", "0.5"]) == code
        assert ("budget: PASS" if passed else "budget: FAIL") in capsys.readouterr().out


def test_bad_validate_input_exits_2(capsys):
    from echoembed.cli.main import main

    assert main(["validate", "nowhere"]) == 2
    assert "nothing to validate on" in capsys.readouterr().err
    assert main(["validate", "nowhere", "--sts", str(STSB_TEST), "--max-drop", "-1"]) == 2
    assert "--max-drop is a budget" in capsys.readouterr().err


def test_embedding_cache_reuses_and_recomputes(tmp_path):
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return np.ones((len(texts), 3), dtype=np.float32)

    cache = EmbeddingCache(tmp_path)
    cache.get({"m": 1}, ["a", "b"], compute)
    cache.get({"m": 1}, ["a", "b"], compute)
    assert len(calls) == 1
    cache.get({"m": 2}, ["a", "b"], compute)  # another identity
    cache.get({"m": 1}, ["a", "c"], compute)  # other texts
    assert len(calls) == 3
    for p in tmp_path.glob("*.npy"):
        p.write_bytes(b"garbage")
    cache.get({"m": 1}, ["a", "b"], compute)  # unreadable -> recomputed
    assert len(calls) == 4
    assert not list(tmp_path.glob(".*tmp*"))


# --- end to end ------------------------------------------------------------------------------


def test_validate_every_task_on_the_tiny_model(tiny_artifact, tiny_llama_dir, tmp_path):
    config = ValidateConfig(
        reference=str(tiny_llama_dir),
        sts=STSB_TEST,
        retrieval=SCIFACT,
        classification=BANKING77,
        limit=6,
        retrieval_options=RetrievalConfig(distractors=10, max_length=64),
        classification_options=ClassificationConfig(splits=2, steps=50),
        latency=LatencyConfig(batch1_texts=3, throughput_texts=6, repeats=1),
        max_drop=5.0,
        runs_dir=tmp_path / "runs",
        cache_dir=tmp_path / "cache",
    )
    result = validate(tiny_artifact.path, config)
    rep = result.report
    got = {(s.task, s.metric) for s in rep.scores}
    assert got == {
        ("sts", "spearman"),
        ("retrieval", "ndcg@10"),
        ("retrieval", "recall@100"),
        ("classification", "accuracy"),
    }
    for s in rep.scores:
        assert s.reference is not None and s.classical is not None
        assert abs(s.drop) < 1e-6 or s.task == "sts"  # fp32 artifact == its reference
    assert rep.agreement is not None and rep.agreement.min > 0.9999
    # STS: 6 pairs; retrieval: 6 queries + their docs + 10; classification: 2 per label
    assert rep.agreement.texts > 12 + 6 + 10 + 154
    assert [x.runner for x in rep.latency] == ["artifact", "reference"]
    assert rep.budget is not None and rep.budget.passed
    assert result.run_dir is not None and result.run_dir.name.startswith("validate-artifact-")
    assert read_report(result.run_dir / "report.json") == rep
    assert rep.machine.providers == ("CPUExecutionProvider",)
    assert not list(result.run_dir.glob(".*tmp*")) and not list((tmp_path / "cache").glob(".*"))
    assert (
        "| retrieval | scifact | ndcg@10 | query/document | 6 |"
        in (result.run_dir / "report.md").read_text()
    )
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 4  # reference: STS, queries, documents, classification
    validate(tiny_artifact.path, config)  # the reference comes from the cache now
    assert sorted((tmp_path / "cache").glob("*.npy")) == cached


def test_validate_real_model_on_an_sts_slice(smollm2_artifact, tmp_path, capsys):
    """The bundled model's fp32 artifact against its PyTorch reference, through the CLI."""
    from echoembed.cli.main import main

    code = main(
        [
            "validate", str(smollm2_artifact.path), "--sts", str(STSB_TEST), "--limit", "24",
            "--max-drop", "0.5", "--no-latency", "--runs-dir", str(tmp_path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (run,) = tmp_path.glob("validate-*")
    rep = read_report(run / "report.json")
    (sts,) = rep.scores
    assert sts.examples == 24 and sts.reference is not None
    assert abs(sts.drop) < 0.5 and rep.budget is not None and rep.budget.passed
    assert rep.agreement is not None and rep.agreement.mean > 0.99999
    # golden: first 24 test pairs, echo template, mean pooling (PyTorch fp32)
    assert sts.reference == pytest.approx(GOLDEN_STS24, abs=0.05)
    assert sts.classical is not None and sts.classical < sts.reference
    assert "| sts | stsb/test | spearman | echo | 24 |" in out


GOLDEN_STS24 = 67.82  # measured with torch 2.13 CPU, transformers 5.24
