"""The sentence-transformers and MTEB 2.x adapters, driven the way those libraries call them.

MTEB is not a dependency: its encoder protocol is exercised here with a real
``torch.utils.data.DataLoader`` of ``{"text": [...]}`` batches, ``prompt_type`` values that
compare equal to ``mteb.types.PromptType`` (a str enum) and a task-metadata stand-in with the
``name``/``prompt`` fields the adapter reads. One test checks against mteb itself when it is
installed. The tiny artifact has random weights: every check is equality with the direct
``Embedder.encode`` call, never quality.
"""

from __future__ import annotations

import json
from enum import Enum
from types import SimpleNamespace

import numpy as np
import pytest

from echoembed.echo.presets import DEFAULT_QUERY_PROMPT
from echoembed.errors import InputError, MissingDependencyError, TemplateError
from echoembed.runtime import Embedder
from echoembed.validation.adapters import (
    AdapterConfig,
    MtebEncoder,
    SentenceTransformerAdapter,
)
from echoembed.validation.metrics import ndcg_at_k
from tests.helpers import SHARED_DATA, run_blocked

SCIFACT = SHARED_DATA / "scifact"
# mteb 2.x SciFact TaskMetadata.prompt (mteb/tasks/retrieval/eng/sci_fact_retrieval.py)
SCIFACT_PROMPT = "Given a scientific claim, retrieve documents that support or refute the claim"

TEXTS = [
    "what lowers blood pressure?",
    "A man is playing the guitar.",
    "The drug lowered patients' blood pressure in the trial.",
    "Cats sleep most of the day.",
    "Interest rates rose again this quarter.",
]


class PromptType(str, Enum):
    """Like mteb.types.PromptType (a StrEnum: members compare equal to their values)."""

    query = "query"
    document = "document"


def task(name: str = "SomeTask", prompt: object = None) -> SimpleNamespace:
    """The TaskMetadata fields the adapter reads."""
    return SimpleNamespace(name=name, prompt=prompt, type="Retrieval")


def loader(texts: list[str], batch_size: int = 2):
    """What mteb's create_dataloader yields for text: default-collated {"text": [...]} dicts."""
    torch_data = pytest.importorskip("torch.utils.data")
    return torch_data.DataLoader([{"text": t} for t in texts], batch_size=batch_size)


@pytest.fixture(scope="module")
def emb(tiny_artifact) -> Embedder:
    return Embedder.load(tiny_artifact.path)


def mteb_encode(enc: MtebEncoder, texts, prompt_type, metadata=None, **kwargs) -> np.ndarray:
    return enc.encode(
        loader(texts),
        task_metadata=metadata or task(),
        hf_split="test",
        hf_subset="default",
        prompt_type=prompt_type,
        **kwargs,
    )


# -- MTEB encoder protocol ------------------------------------------------------------------------


def test_query_and_document_prompt_types_use_the_echo_retrieval_templates(emb):
    enc = MtebEncoder(emb)
    query = emb.encode(TEXTS, template="query")
    document = emb.encode(TEXTS, template="document")
    for pt in (PromptType.query, "query"):
        got = mteb_encode(enc, TEXTS, pt, batch_size=32, show_progress_bar=False)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), emb.hidden_size)
        np.testing.assert_array_equal(got, query)
    for pt in (PromptType.document, "document"):
        np.testing.assert_array_equal(mteb_encode(enc, TEXTS, pt), document)
    assert not np.allclose(query, document)


def test_symmetric_tasks_get_the_artifacts_default_template(emb):
    # STS, classification and clustering pass prompt_type=None (or no prompt_type at all).
    enc = MtebEncoder(emb)
    default = emb.encode(TEXTS)
    assert emb.manifest.default_template == "echo"
    np.testing.assert_array_equal(default, emb.encode(TEXTS, template="echo"))
    np.testing.assert_array_equal(mteb_encode(enc, TEXTS, None), default)
    got = enc.encode(loader(TEXTS), task_metadata=task(), hf_split="test", hf_subset="default")
    np.testing.assert_array_equal(got, default)
    classical = MtebEncoder(emb, AdapterConfig(symmetric="classical"))
    np.testing.assert_array_equal(
        mteb_encode(classical, TEXTS, None), emb.encode(TEXTS, template="classical")
    )


def test_query_instruction_comes_from_config_then_task_prompt_then_default(emb):
    def direct(prompt: str) -> np.ndarray:
        return emb.encode(TEXTS, template="query", variables={"prompt": prompt})

    scifact = task("SciFact", {"query": SCIFACT_PROMPT})
    enc = MtebEncoder(emb)
    np.testing.assert_array_equal(mteb_encode(enc, TEXTS, "query", scifact), direct(SCIFACT_PROMPT))
    # a plain-string task prompt (as classification tasks carry) also counts for queries
    plain = task("Plain", "Find the intent")
    np.testing.assert_array_equal(
        mteb_encode(enc, TEXTS, "query", plain), direct("Find the intent")
    )
    # documents and symmetric inputs never take an instruction
    np.testing.assert_array_equal(
        mteb_encode(enc, TEXTS, "document", scifact), emb.encode(TEXTS, template="document")
    )
    np.testing.assert_array_equal(mteb_encode(enc, TEXTS, None, plain), emb.encode(TEXTS))

    mine = MtebEncoder(emb, AdapterConfig(instructions={"SciFact": "Find evidence"}))
    np.testing.assert_array_equal(
        mteb_encode(mine, TEXTS, "query", scifact), direct("Find evidence")
    )
    off = MtebEncoder(emb, AdapterConfig(use_task_prompts=False))
    np.testing.assert_array_equal(
        mteb_encode(off, TEXTS, "query", scifact), direct(DEFAULT_QUERY_PROMPT)
    )
    fallback = MtebEncoder(emb, AdapterConfig(query_instruction="Answer it"))
    np.testing.assert_array_equal(mteb_encode(fallback, TEXTS, "query"), direct("Answer it"))
    assert not np.allclose(direct(SCIFACT_PROMPT), direct(DEFAULT_QUERY_PROMPT))


def test_mteb_encode_rejects_what_it_cannot_embed(emb):
    enc = MtebEncoder(emb)
    with pytest.raises(InputError, match="unknown prompt_type 'passage'"):
        mteb_encode(enc, TEXTS, "passage")
    with pytest.raises(InputError, match="precision 'int8' is not supported"):
        mteb_encode(enc, TEXTS, None, precision="int8")
    with pytest.raises(InputError, match=r"batch 0 has no 'text' entry \(\['image'\]\)"):
        enc.encode([{"image": [object()]}], task_metadata=task(), hf_split="", hf_subset="")
    with pytest.raises(InputError, match=r"texts\[1\] is int, not str"):
        enc.encode([{"text": ["fine", 3]}], task_metadata=task(), hf_split="", hf_subset="")
    with pytest.raises(InputError, match=r"texts\[0\] is empty.*blank='zero'"):
        enc.encode([{"text": ["  ", "ok"]}], task_metadata=task(), hf_split="", hf_subset="")
    empty = enc.encode([], task_metadata=task(), hf_split="", hf_subset="")
    assert empty.shape == (0, emb.hidden_size) and empty.dtype == np.float32


def test_blank_texts_can_be_zero_vectors(emb):
    enc = MtebEncoder(emb, AdapterConfig(blank="zero"))
    got = enc.encode(
        [{"text": [TEXTS[0], ""]}, {"text": [TEXTS[1]]}],
        task_metadata=task(),
        hf_split="",
        hf_subset="",
        prompt_type="query",
    )
    np.testing.assert_array_equal(got[[0, 2]], emb.encode(TEXTS[:2], template="query"))
    assert not got[1].any()
    assert float(enc.similarity(got[1], got[0])) == 0.0


def test_model_identity_and_experiment_labels(emb):
    enc = MtebEncoder(emb)
    assert enc.name == f"echoembed/{emb.root.name}"
    assert len(enc.revision) == 12 and enc.revision == MtebEncoder(emb).revision
    labels = enc.experiment_kwargs()
    assert labels["query"] == "query" and labels["symmetric"] == "default"
    custom = MtebEncoder(emb, AdapterConfig(symmetric="%%bos%%Say: {%%text%%}"), name="me/x")
    assert custom.name == "me/x" and custom.experiment_kwargs()["symmetric"].startswith("custom-")
    with pytest.raises(InputError, match="organization/model"):
        MtebEncoder(emb, name="no-slash")


def test_mteb_model_meta_needs_mteb(emb):
    try:
        import mteb  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install 'mteb"):
            MtebEncoder(emb).mteb_model_meta  # noqa: B018
    else:
        assert MtebEncoder(emb).mteb_model_meta.embed_dim == emb.hidden_size


def test_config_errors_surface_when_the_adapter_is_built(emb):
    with pytest.raises(TemplateError, match="unknown template preset 'qurey'"):
        MtebEncoder(emb, AdapterConfig(query="qurey"))
    with pytest.raises(TemplateError, match="no settable %%prompt%% variable"):
        MtebEncoder(emb, AdapterConfig(query="document", instructions={"SciFact": "x"}))
    with pytest.raises(InputError, match="blank must be"):
        AdapterConfig(blank="skip")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="cannot redefine"):
        AdapterConfig(extra_prompts={"passage": "echo"})
    with pytest.raises(InputError, match="cannot set"):
        AdapterConfig(encode_kwargs={"template": "echo"})
    with pytest.raises(InputError, match="no encode"):
        SentenceTransformerAdapter(object())
    cfg = AdapterConfig(instructions={"A": "b"})
    with pytest.raises(TypeError):
        cfg.instructions["A"] = "c"  # type: ignore[index]


# -- sentence-transformers surface ----------------------------------------------------------------


def test_st_encode_flags_match_the_direct_call(emb):
    st = SentenceTransformerAdapter(emb)
    raw = st.encode(TEXTS)  # sentence-transformers default: normalize_embeddings=False
    assert isinstance(raw, np.ndarray) and raw.dtype == np.float32
    np.testing.assert_array_equal(raw, emb.encode(TEXTS, normalize=False))
    unit = st.encode(TEXTS, normalize_embeddings=True, batch_size=2, show_progress_bar=False)
    np.testing.assert_array_equal(unit, emb.encode(TEXTS, batch_size=2))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    one = st.encode(TEXTS[1], normalize_embeddings=True)
    assert one.shape == (emb.hidden_size,)
    np.testing.assert_array_equal(one, emb.encode([TEXTS[1]])[0])
    np.testing.assert_array_equal(st.encode(inputs=TEXTS), raw)  # sentence-transformers 6 name
    np.testing.assert_array_equal(st.encode(np.array(TEXTS)), raw)
    cut = st.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    assert cut.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut * np.linalg.norm(raw[:, :8], axis=1, keepdims=True), raw[:, :8])
    assert st.encode([]).shape == (0, emb.hidden_size)


def test_st_tensor_outputs(emb):
    torch = pytest.importorskip("torch")
    st = SentenceTransformerAdapter(emb)
    ref = st.encode(TEXTS)
    t = st.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (len(TEXTS), emb.hidden_size)
    np.testing.assert_array_equal(t.numpy(), ref)
    rows = st.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(TEXTS)
    np.testing.assert_array_equal(rows[2].numpy(), ref[2])


def test_st_prompts_pick_echo_templates(emb):
    st = SentenceTransformerAdapter(emb)
    kw = dict(normalize_embeddings=True)
    np.testing.assert_array_equal(st.encode_query(TEXTS, **kw), emb.encode(TEXTS, "query"))
    np.testing.assert_array_equal(st.encode_document(TEXTS, **kw), emb.encode(TEXTS, "document"))
    np.testing.assert_array_equal(st.encode(TEXTS, **kw), emb.encode(TEXTS))
    for name, template in [("query", "query"), ("passage", "document"), ("corpus", "document")]:
        np.testing.assert_array_equal(
            st.encode(TEXTS, prompt_name=name, **kw), emb.encode(TEXTS, template)
        )
    np.testing.assert_array_equal(
        st.encode_query(TEXTS, prompt="classical", **kw), emb.encode(TEXTS, "classical")
    )
    tpl = "%%bos%%Say:{!%%text%%}\nAgain:{%%text%%}"
    np.testing.assert_array_equal(st.encode(TEXTS, prompt=tpl, **kw), emb.encode(TEXTS, tpl))
    assert set(st.prompts) == {"query", "document", "passage", "corpus"}
    assert st.prompts["passage"] == emb.template("document").source

    extra = SentenceTransformerAdapter(
        emb, AdapterConfig(extra_prompts={"sts": "classical"}, query_instruction="Find it")
    )
    np.testing.assert_array_equal(
        extra.encode(TEXTS, prompt_name="sts", **kw), emb.encode(TEXTS, "classical")
    )
    np.testing.assert_array_equal(
        extra.encode_query(TEXTS, **kw),
        emb.encode(TEXTS, "query", variables={"prompt": "Find it"}),
    )


def test_st_rejects_bad_input(emb):
    st = SentenceTransformerAdapter(emb)
    with pytest.raises(InputError, match="unknown prompt_name 'qa'.*'passage'"):
        st.encode(TEXTS, prompt_name="qa")
    with pytest.raises(InputError, match="not an echo template.*not a text prefix"):
        st.encode(TEXTS, prompt="query: ")
    with pytest.raises(InputError, match=r"texts\[1\] is NoneType, not str"):
        st.encode(["ok", None])
    with pytest.raises(InputError, match="sentences must be a str or a list of str"):
        st.encode(42)
    with pytest.raises(InputError, match="output_value='token_embeddings' is not supported"):
        st.encode(TEXTS, output_value="token_embeddings")
    with pytest.raises(InputError, match="precision 'binary'"):
        st.encode(TEXTS, precision="binary")
    with pytest.raises(InputError, match=r"does not use: \['pool'\]"):
        st.encode(TEXTS, pool={})
    with pytest.raises(InputError, match="unknown task 'passage'"):
        st.encode(TEXTS, task="passage")


def test_dimension_and_similarity_on_unit_vectors(emb):
    st = SentenceTransformerAdapter(emb)
    assert st.get_embedding_dimension() == st.get_sentence_embedding_dimension() == 32
    assert st.similarity_fn_name == "cosine"
    q = st.encode_query(TEXTS[:2], normalize_embeddings=True)
    d = st.encode_document(TEXTS, normalize_embeddings=True)
    sim = st.similarity(q, d)
    assert isinstance(sim, np.ndarray) and sim.shape == (2, len(TEXTS))
    np.testing.assert_allclose(sim, q @ d.T, atol=1e-6)
    np.testing.assert_allclose(st.similarity_pairwise(q, d[:2]), (q * d[:2]).sum(1), atol=1e-6)
    # raw (unnormalized) embeddings give the same cosines
    raw_sim = st.similarity(st.encode_query(TEXTS[:2]), st.encode_document(TEXTS))
    np.testing.assert_allclose(raw_sim, sim, atol=1e-6)
    assert st.similarity(q[0], d[0]).shape == (1, 1)
    with pytest.raises(InputError, match="embedding sizes differ"):
        st.similarity(q, d[:, :8])
    with pytest.raises(InputError, match="as many rows"):
        st.similarity_pairwise(q, d)


def test_similarity_speaks_torch_where_callers_do(emb):
    torch = pytest.importorskip("torch")
    st = SentenceTransformerAdapter(emb)
    q = st.encode_query(TEXTS[:2], convert_to_tensor=True)
    d = st.encode_document(TEXTS, convert_to_tensor=True)
    scores = st.similarity(q, d)  # what InformationRetrievalEvaluator does next: torch.topk
    assert isinstance(scores, torch.Tensor)
    top = torch.topk(scores, 3, dim=1)
    assert top.indices.shape == (2, 3)
    # MTEB's evaluators expect torch tensors back (the summarization one calls float() on them)
    enc = MtebEncoder(emb)
    qn, dn = q.numpy(), d.numpy()
    m = enc.similarity(qn, dn)
    assert isinstance(m, torch.Tensor)
    np.testing.assert_allclose(m.numpy(), st.similarity(qn, dn), atol=1e-6)
    assert isinstance(float(enc.similarity(qn[0], dn[0])), float)
    assert enc.similarity_pairwise(qn, dn[:2]).shape == (2,)


def test_the_reference_embedder_fits_too(emb, tiny_llama_dir):
    from echoembed.reference import ReferenceEmbedder

    ref = ReferenceEmbedder.load(tiny_llama_dir)
    enc = MtebEncoder(ref)
    assert enc.name == f"echoembed/{tiny_llama_dir.name}-reference"
    for pt, template in [(None, "echo"), ("query", "query"), ("document", "document")]:
        got = mteb_encode(enc, TEXTS, pt)
        np.testing.assert_array_equal(got, ref.encode(TEXTS, template))
        np.testing.assert_allclose(got, mteb_encode(MtebEncoder(emb), TEXTS, pt), atol=1e-5)
    last = SentenceTransformerAdapter(ref, AdapterConfig(encode_kwargs={"pooling": "last"}))
    np.testing.assert_array_equal(
        last.encode_query(TEXTS, normalize_embeddings=True),
        ref.encode(TEXTS, "query", pooling="last"),
    )
    assert last.get_embedding_dimension() == 32


def test_adapters_work_without_torch(tiny_artifact):
    r = run_blocked(
        f"""
        import numpy as np
        from echoembed.runtime import Embedder
        from echoembed.validation.adapters import MtebEncoder, SentenceTransformerAdapter
        emb = Embedder.load({str(tiny_artifact.path)!r})
        batches = [{{"text": ["a cat", "a dog"]}}, {{"text": ["a bird"]}}]
        got = MtebEncoder(emb).encode(batches, task_metadata=None, hf_split="", hf_subset="",
                                      prompt_type="query")
        assert np.array_equal(got, emb.encode(["a cat", "a dog", "a bird"], "query"))
        st = SentenceTransformerAdapter(emb)
        q = st.encode_query(["a cat"])
        print(st.similarity(q, st.encode_document(["a dog"])).shape)
        assert "torch" not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 1)"


# -- local real data ------------------------------------------------------------------------------


def read_jsonl(path, keep=None, limit=None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if keep is None or row["_id"] in keep or (limit is not None and len(out) < limit):
                out[row["_id"]] = row
    return out


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="shared/data/scifact is not present")
def test_scifact_retrieval_through_the_adapter_equals_the_direct_path(emb):
    """Eight SciFact claims against their judged abstracts plus distractors, ranked through
    MtebEncoder exactly as MTEB's retrieval task would call it, vs the direct Embedder calls."""
    qrels: dict[str, dict[str, float]] = {}
    with open(SCIFACT / "qrels.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[did] = float(score)
    qids = list(qrels)[:8]
    queries = read_jsonl(SCIFACT / "queries.jsonl", keep=set(qids))
    judged = {d for q in qids for d in qrels[q]}
    corpus = read_jsonl(SCIFACT / "corpus.jsonl", keep=judged, limit=len(judged) + 24)
    assert judged <= set(corpus) and len(queries) == len(qids)
    doc_ids = list(corpus)
    # mteb's _corpus_to_dict: (title + " " + text).strip()
    docs = [(corpus[d]["title"] + " " + corpus[d]["text"]).strip() for d in doc_ids]
    claims = [queries[q]["text"] for q in qids]

    cfg = AdapterConfig(encode_kwargs={"max_length": 128})
    enc = MtebEncoder(emb, cfg)
    meta = task("SciFact", {"query": SCIFACT_PROMPT})
    q_emb = mteb_encode(enc, claims, PromptType.query, meta, batch_size=8)
    d_emb = mteb_encode(enc, docs, PromptType.document, meta, batch_size=8)
    q_direct = emb.encode(claims, "query", variables={"prompt": SCIFACT_PROMPT}, max_length=128)
    d_direct = emb.encode(docs, "document", max_length=128, batch_size=8)
    np.testing.assert_array_equal(q_emb, q_direct)
    np.testing.assert_array_equal(d_emb, d_direct)

    def ndcg(scores: np.ndarray) -> float:
        ranked = [[doc_ids[j] for j in np.argsort(-row, kind="stable")] for row in scores]
        return float(
            np.mean([ndcg_at_k(r, qrels[q], 10) for r, q in zip(ranked, qids, strict=True)])
        )

    via_adapter = ndcg(enc.similarity(q_emb, d_emb).numpy())
    assert via_adapter == ndcg(q_direct @ d_direct.T)
    assert 0.0 <= via_adapter <= 1.0


# -- mteb itself, when installed (not a dependency: skipped in CI) --------------------------------


def test_conforms_to_mtebs_own_protocol(emb):
    mteb = pytest.importorskip("mteb", reason="mteb is not installed (optional; pip install mteb)")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.sts import MockSTSTask
    from mteb.models import EncoderProtocol

    enc = MtebEncoder(emb)
    assert isinstance(enc, EncoderProtocol)
    meta = enc.mteb_model_meta
    assert meta.name == enc.name and meta.embed_dim == emb.hidden_size
    assert mteb.types.PromptType.query == "query"
    scifact = mteb.get_task("SciFact").metadata
    q = enc.encode(
        loader(TEXTS), task_metadata=scifact, hf_split="test", hf_subset="default",
        prompt_type=mteb.types.PromptType.query,
    )  # fmt: skip
    np.testing.assert_array_equal(
        q, emb.encode(TEXTS, "query", variables={"prompt": scifact.prompt["query"]})
    )
    result = mteb.evaluate(
        enc, [MockSTSTask(), MockRetrievalTask()], cache=None, show_progress_bar=False
    )
    assert not result.exceptions
    assert sorted(r.task_name for r in result.task_results) == ["MockRetrievalTask", "MockSTSTask"]
