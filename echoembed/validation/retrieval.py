"""Retrieval data in the BEIR layout (corpus.jsonl, queries.jsonl, qrels.tsv) and its evaluation.

The full SciFact corpus (5,183 abstracts, ~270 tokens each, doubled by echo) takes about 50
minutes in fp32 on 2 CPU cores. ``RetrievalConfig(distractors=N)`` gives the routine subset:
every document judged for the chosen queries plus ``N`` other documents drawn with a seeded RNG
from the rest of the corpus (ids sorted first, so the draw depends only on the seed and the data).
Scores on a subset are higher than on the full corpus (fewer distractors to rank above the
relevant ones): compare artifacts with each other on the same subset, and quote the full-corpus
number (``distractors=None``) when comparing with published results.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echoembed.errors import InputError
from echoembed.validation.metrics import ndcg_at_k, recall_at_k

DEFAULT_DISTRACTORS = 500


@dataclass(frozen=True)
class RetrievalConfig:
    """Which part of a BEIR-style data set to evaluate on."""

    queries: int | None = None  # first N queries (file order); None: all
    distractors: int | None = DEFAULT_DISTRACTORS  # None: the full corpus
    seed: int = 0
    max_length: int | None = 512  # tokens per copy of a text (documents are long)
    ndcg_k: int = 10
    recall_k: int = 100

    def describe(self) -> str:
        corpus = "full corpus" if self.distractors is None else (
            f"judged docs + {self.distractors} seeded distractors (seed {self.seed})"
        )  # fmt: skip
        queries = "all queries" if self.queries is None else f"first {self.queries} queries"
        return f"{queries}, {corpus}, max {self.max_length} tokens per copy"


@dataclass(frozen=True)
class RetrievalData:
    """Documents (id -> 'title text'), queries (id -> text) and graded judgments."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]
    corpus_size: int  # documents in the full corpus this was drawn from

    @property
    def is_full(self) -> bool:
        return len(self.corpus) == self.corpus_size


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise InputError(f"{path}:{lineno}: expected an object with an '_id' field")
            rows.append(row)
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, float]]:
    qrels: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise InputError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score'")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise InputError(f"{path}:{lineno}: expected 3 tab-separated fields")
            try:
                score = float(row[2])
            except ValueError:
                raise InputError(f"{path}:{lineno}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def read_retrieval(
    directory: str | os.PathLike[str], config: RetrievalConfig | None = None
) -> RetrievalData:
    """Read corpus.jsonl, queries.jsonl and qrels.tsv (BEIR test split) and take the subset."""
    config = config or RetrievalConfig()
    root = Path(directory)
    paths = {n: root / n for n in ("corpus.jsonl", "queries.jsonl", "qrels.tsv")}
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        raise InputError(
            f"{root}: missing {', '.join(missing)}; expected a BEIR-style directory such as "
            "../shared/data/scifact (corpus.jsonl, queries.jsonl, qrels.tsv)"
        )
    if config.queries is not None and config.queries < 1:
        raise InputError(f"queries must be >= 1, got {config.queries}")
    if config.distractors is not None and config.distractors < 0:
        raise InputError(f"distractors must be >= 0 (or None for all), got {config.distractors}")
    corpus = {
        str(r["_id"]): f"{r.get('title') or ''} {r.get('text') or ''}".strip()
        for r in _read_jsonl(paths["corpus.jsonl"])
    }
    all_queries = {
        str(r["_id"]): str(r.get("text") or "") for r in _read_jsonl(paths["queries.jsonl"])
    }
    qrels_all = _read_qrels(paths["qrels.tsv"])
    qids = [q for q in all_queries if q in qrels_all]
    if not qids:
        raise InputError(f"{root}: no query in queries.jsonl has a judgment in qrels.tsv")
    if config.queries is not None:
        qids = qids[: config.queries]
    qrels = {q: qrels_all[q] for q in qids}
    judged = {d for q in qids for d in qrels[q]}
    unknown = sorted(judged - corpus.keys())
    if unknown:
        raise InputError(f"{root}: qrels name documents not in the corpus, e.g. {unknown[:3]}")
    if config.distractors is None:
        keep = set(corpus)
    else:
        rest = sorted(set(corpus) - judged)
        rng = np.random.default_rng(config.seed)
        n = min(config.distractors, len(rest))
        keep = judged | {rest[i] for i in rng.choice(len(rest), size=n, replace=False)}
    sub = {d: t for d, t in corpus.items() if d in keep}  # corpus order
    empty = [d for d, t in sub.items() if not t]
    if empty:
        raise InputError(f"{root}: documents with no title or text: {empty[:3]}")
    return RetrievalData(
        name=root.name,
        corpus=sub,
        queries={q: all_queries[q] for q in qids},
        qrels=qrels,
        corpus_size=len(corpus),
    )


@dataclass(frozen=True)
class RetrievalScores:
    ndcg: float  # mean nDCG@k, x100
    recall: float  # mean recall@k, x100
    queries: int
    documents: int


def rank(
    query_emb: np.ndarray, doc_emb: np.ndarray, doc_ids: Sequence[str], k: int
) -> list[list[str]]:
    """Top-k document ids per query by dot product (unit vectors: cosine), ties by corpus order."""
    scores = np.asarray(query_emb, dtype=np.float32) @ np.asarray(doc_emb, dtype=np.float32).T
    k = min(k, scores.shape[1])
    out = []
    for row in scores:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([doc_ids[i] for i in top])
    return out


def evaluate_retrieval(
    data: RetrievalData,
    embed_queries: Callable[[Sequence[str]], np.ndarray],
    embed_documents: Callable[[Sequence[str]], np.ndarray],
    config: RetrievalConfig | None = None,
) -> RetrievalScores:
    """nDCG@k and recall@k (x100, averaged over queries) of dense retrieval on ``data``."""
    config = config or RetrievalConfig()
    doc_ids = list(data.corpus)
    qids = list(data.queries)
    d = embed_documents([data.corpus[i] for i in doc_ids])
    q = embed_queries([data.queries[i] for i in qids])
    ranked = rank(q, d, doc_ids, max(config.ndcg_k, config.recall_k))
    pairs = list(zip(qids, ranked, strict=True))
    ndcg = [ndcg_at_k(r, data.qrels[qid], config.ndcg_k) for qid, r in pairs]
    rec = [recall_at_k(r, data.qrels[qid], config.recall_k) for qid, r in pairs]
    return RetrievalScores(
        ndcg=100.0 * float(np.mean(ndcg)),
        recall=100.0 * float(np.mean(rec)),
        queries=len(qids),
        documents=len(doc_ids),
    )
