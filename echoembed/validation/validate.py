"""``echoembed validate``: an artifact against the PyTorch reference, side by side, on real data.

For each task given (STS, BEIR-style retrieval, classification) the artifact and the reference
embed the same texts with the same templates; the report holds the per-text agreement, each task
metric for both plus the artifact with the classical template, latency at batch 1 and
throughput at batch 32, and the budget verdict. Reference embeddings are cached on disk (keyed
by model file, template, pooling, length limit and texts), so validating several artifacts
pays for the reference once.

Each task is one scorer over a shared ``_Context``; a scorer returns its ``_TaskResult`` (task
scores, artifact-vs-reference cosines, texts for the latency runs) and mutates nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from echoembed.artifact.writer import atomic_save_npy, atomic_write
from echoembed.errors import InputError
from echoembed.validation.classification import (
    ClassificationConfig,
    classification_accuracy,
    read_classification,
    train_per_label,
)
from echoembed.validation.metrics import paired_cosine
from echoembed.validation.report import (
    Agreement,
    Budget,
    Latency,
    MachineInfo,
    TaskScore,
    ValidationReport,
    format_report,
    machine_info,
)
from echoembed.validation.retrieval import (
    DEFAULT_DISTRACTORS,
    RetrievalConfig,
    evaluate_retrieval,
    read_retrieval,
)
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import compare_throughput

if TYPE_CHECKING:
    from echoembed.echo.template import Template
    from echoembed.runtime import Embedder

__all__ = [
    "EmbeddingCache",
    "LatencyConfig",
    "MachineInfo",
    "ValidateConfig",
    "ValidationResult",
    "check_budget",
    "classification_options",
    "machine_info",
    "measure_latency",
    "new_run_dir",
    "quick_distractors",
    "retrieval_options",
    "validate",
]

Progress = Callable[[str], None]
Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class LatencyConfig:
    batch1_texts: int = 32  # single-text calls timed (after a warm-up), for p50/p95
    throughput_texts: int = 128
    batch_size: int = 32
    repeats: int = 3


@dataclass(frozen=True)
class ValidateConfig:
    """What to validate against and on which data. Paths of None skip that task.

    Retrieval distractors: ``distractors`` (an int, or "all" for the full corpus) when given;
    else ``retrieval_options.distractors`` when it is not the default 500; else 500, or
    ``quick_distractors(limit)`` with ``limit`` (see ``retrieval_options``).
    """

    reference: str | None = "auto"  # auto: the artifact's bundled source; None: no reference
    sts: Path | None = None
    retrieval: Path | None = None
    classification: Path | None = None
    limit: int | None = None  # quick look: STS pairs, queries (+ fewer distractors), texts
    distractors: int | Literal["all"] | None = None  # None: 500, or scaled with ``limit``
    retrieval_options: RetrievalConfig = field(default_factory=RetrievalConfig)
    classification_options: ClassificationConfig = field(default_factory=ClassificationConfig)
    classical: bool = True  # also score the artifact with the classical template
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)
    max_drop: float | None = None  # points on any task metric; exceeded -> report fails
    batch_size: int = 32
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    runs_dir: Path | None = Path("runs")  # a timestamped directory per run; None: write nothing
    cache_dir: Path | None = Path("runs/cache")  # reference embeddings; None: no cache


@dataclass(frozen=True)
class ValidationResult:
    report: ValidationReport
    run_dir: Path | None


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_dir(runs_dir: Path, kind: str, name: str) -> Path:
    """``runs/<kind>-<name>-<YYYYmmdd-HHMMSS>`` (a suffix when two runs start the same second)."""
    base = runs_dir / f"{kind}-{name}-{_stamp()}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


class EmbeddingCache:
    """Embeddings on disk, keyed by a JSON identity plus the texts; atomic writes."""

    def __init__(self, root: Path | None):
        self.root = root

    def get(self, identity: dict, texts: Sequence[str], compute: Embed) -> np.ndarray:
        if self.root is None:
            return compute(texts)
        h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        for t in texts:
            h.update(t.encode("utf-8") + b"\0")
        path = self.root / f"{h.hexdigest()[:32]}.npy"
        if path.is_file():
            try:
                arr = np.load(path)
                if arr.shape[0] == len(texts):
                    return arr
            except (OSError, ValueError):
                pass  # unreadable: recompute and overwrite
        arr = compute(texts)
        atomic_save_npy(path, arr)
        return arr


# --- subsets ---------------------------------------------------------------------------------


def quick_distractors(limit: int | None) -> int:
    """Distractors when none were asked for: 500, or ``min(500, limit)`` under ``--limit`` (about
    as many distractors as judged documents, so the document pass scales with the queries)."""
    if limit is None:
        return DEFAULT_DISTRACTORS
    return min(DEFAULT_DISTRACTORS, limit)


def retrieval_options(config: ValidateConfig) -> RetrievalConfig:
    """The retrieval subset ``config`` asks for: the first ``limit`` queries, and distractors
    as the ``ValidateConfig`` docstring says (an explicit count is never scaled)."""
    opts = config.retrieval_options
    given: int | Literal["all"] | None = config.distractors
    in_opts = opts.distractors != DEFAULT_DISTRACTORS  # set there, not left at the default
    as_opts = "all" if opts.distractors is None else opts.distractors
    if given is not None and in_opts and given != as_opts:
        raise InputError(
            f"distractors given twice ({given!r} and retrieval_options.distractors="
            f"{opts.distractors!r}): set one"
        )
    if given is None and in_opts:
        given = as_opts
    if isinstance(given, str) and given != "all":
        raise InputError(f"distractors must be a count or 'all', got {given!r}")
    if given is None:
        distractors: int | None = quick_distractors(config.limit)
    else:
        distractors = None if given == "all" else given
    queries = opts.queries if config.limit is None else config.limit
    return dataclasses.replace(opts, queries=queries, distractors=distractors)


def classification_options(config: ValidateConfig) -> ClassificationConfig:
    """``config.classification_options`` with ``limit`` applied (about that many texts)."""
    opts = config.classification_options
    return opts if config.limit is None else dataclasses.replace(opts, limit=config.limit)


# --- the two sides ---------------------------------------------------------------------------


def _reference_spec(spec: str | None, manifest) -> str | None:
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        return spec
    if manifest.source.kind == "bundled" or Path(manifest.source.name).exists():
        return manifest.source.name
    raise InputError(
        f"the artifact was exported from {manifest.source.name!r} ({manifest.source.kind}), which "
        "is not here: pass --reference PATH (the same model), or --reference none"
    )


class _Side:
    """One runner's embed function per (template, max_length), with an optional cache."""

    def __init__(
        self, encode: Callable, cache: EmbeddingCache, identity: dict | None, model=None
    ):
        self.encode = encode
        self.cache = cache
        self.identity = identity
        self.model = model  # the reference embedder, for the latency runs

    def embed(self, template, max_length: int | None = None, batch_size: int = 32) -> Embed:
        def run(texts: Sequence[str]) -> np.ndarray:
            return self.encode(list(texts), template, max_length, batch_size)

        if self.identity is None:
            return run
        key = dict(
            self.identity,
            template=[template.source, sorted(template.defaults.items())],
            max_length=max_length,
        )
        return lambda texts: self.cache.get(key, texts, run)


def _artifact_side(emb: Embedder) -> _Side:
    def encode(texts, template, max_length, batch_size):
        return emb.encode(
            texts, template, batch_size=batch_size, max_length=max_length, show_progress=True
        )

    return _Side(encode, EmbeddingCache(None), None)


def _load_reference(spec: str, embedder: Embedder, config: ValidateConfig) -> _Side:
    from echoembed.reference import ReferenceEmbedder
    from echoembed.reference.sources import resolve_source

    source = resolve_source(spec)
    st = source.path.stat()
    ref = ReferenceEmbedder.load(spec, threads=config.threads)
    pooling = embedder.pooling
    identity = {
        "reference": [source.kind, source.name, str(source.path), st.st_size, st.st_mtime_ns],
        "pooling": pooling,
        "normalize": True,
    }

    def encode(texts, template, max_length, batch_size):
        return ref.encode(
            texts,
            template,
            pooling=pooling,
            batch_size=batch_size,
            max_length=max_length,
            show_progress=True,
        )

    return _Side(encode, EmbeddingCache(config.cache_dir), identity, model=ref)


@dataclass(frozen=True)
class _Embedded:
    """The same texts embedded by the artifact and (when there is one) the reference."""

    artifact: np.ndarray
    reference: np.ndarray | None

    def cosines(self) -> tuple[np.ndarray, ...]:
        """Per-text agreement, artifact vs reference (none without a reference)."""
        if self.reference is None:
            return ()
        return (paired_cosine(self.artifact, self.reference),)


@dataclass(frozen=True)
class _Context:
    """Everything a task scorer reads: the config, the artifact, the reference and templates."""

    config: ValidateConfig
    embedder: Embedder
    artifact: _Side
    reference: _Side | None
    reference_spec: str | None
    default: Template  # the artifact's own template (echo)
    classical: Template
    say: Progress

    def both(
        self,
        texts: Sequence[str],
        template: Template,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> _Embedded:
        bs = self.config.batch_size if batch_size is None else batch_size
        a = self.artifact.embed(template, max_length, bs)(texts)
        if self.reference is None:
            return _Embedded(a, None)
        return _Embedded(a, self.reference.embed(template, max_length, bs)(texts))

    def classical_embed(self, max_length: int | None = None, batch_size: int | None = None):
        """The artifact with the classical template, or None when ``--no-classical``."""
        if not self.config.classical:
            return None
        bs = self.config.batch_size if batch_size is None else batch_size
        return self.artifact.embed(self.classical, max_length, bs)


@dataclass(frozen=True)
class _TaskResult:
    """What one scorer returns: its metrics, agreement cosines and texts for the latency runs."""

    scores: tuple[TaskScore, ...]
    cosines: tuple[np.ndarray, ...]
    latency_texts: tuple[str, ...]


# --- the task scorers ------------------------------------------------------------------------


def _score_sts(ctx: _Context) -> _TaskResult:
    config = ctx.config
    path = Path(config.sts)
    data = read_sts(path, limit=config.limit)
    sentences = data.unique_sentences()
    ctx.say(f"STS: {len(data)} pairs, {len(sentences)} sentences ({path})")
    index = {s: i for i, s in enumerate(sentences)}

    def rho(e: np.ndarray | None) -> float | None:
        if e is None:
            return None
        return sts_spearman(data, lambda s, e=e: e[[index[x] for x in s]])

    emb = ctx.both(sentences, ctx.default)
    classical = ctx.classical_embed()
    score = TaskScore(
        "sts",
        path.parent.name + "/" + path.stem,
        "spearman",
        ctx.default.name,
        len(data),
        rho(emb.artifact),
        rho(emb.reference),
        None if classical is None else rho(classical(sentences)),
        "all pairs" if config.limit is None else f"first {config.limit} pairs",
    )  # fmt: skip
    return _TaskResult((score,), emb.cosines(), tuple(sentences))


def _score_retrieval(ctx: _Context) -> _TaskResult:
    path = Path(ctx.config.retrieval)
    opts = retrieval_options(ctx.config)
    data = read_retrieval(path, opts)
    ctx.say(
        f"retrieval: {len(data.queries)} queries over {len(data.corpus)} of "
        f"{data.corpus_size} documents ({opts.describe()})"
    )
    qt, dt = ctx.embedder.template("query"), ctx.embedder.template("document")
    bs = ctx.config.batch_size
    doc_bs = max(1, min(bs, 8))  # long documents: bound the attention memory
    docs = ctx.both(list(data.corpus.values()), dt, opts.max_length, doc_bs)
    queries = ctx.both(list(data.queries.values()), qt, opts.max_length, bs)
    sides = {"artifact": (queries.artifact, docs.artifact)}
    if queries.reference is not None and docs.reference is not None:
        sides["reference"] = (queries.reference, docs.reference)
    scored = {
        name: evaluate_retrieval(data, lambda _t, q=q: q, lambda _t, d=d: d, opts)
        for name, (q, d) in sides.items()
    }
    cq, cd = ctx.classical_embed(opts.max_length, bs), ctx.classical_embed(opts.max_length, doc_bs)
    if cq is not None and cd is not None:
        scored["classical"] = evaluate_retrieval(data, cq, cd, opts)
    metrics = ((f"ndcg@{opts.ndcg_k}", "ndcg"), (f"recall@{opts.recall_k}", "recall"))
    scores = []
    for metric, attr in metrics:
        vals = {k: getattr(v, attr) for k, v in scored.items()}
        scores.append(
            TaskScore(
                "retrieval", path.name, metric, f"{qt.name}/{dt.name}", len(data.queries),
                vals["artifact"], vals.get("reference"), vals.get("classical"), opts.describe(),
            )  # fmt: skip
        )
    return _TaskResult(
        tuple(scores), docs.cosines() + queries.cosines(), tuple(data.queries.values())
    )


def _score_classification(ctx: _Context) -> _TaskResult:
    path = Path(ctx.config.classification)
    opts = classification_options(ctx.config)
    data = read_classification(path, opts)
    n_train = train_per_label(data.labels, opts)
    n_labels = len(set(data.labels))
    ctx.say(f"classification: {len(data)} texts, {n_labels} labels ({opts.describe(n_train)})")
    texts = list(data.texts)
    emb = ctx.both(texts, ctx.default)

    def acc(e: np.ndarray | None) -> float | None:
        return None if e is None else classification_accuracy(e, data.labels, opts)

    classical = ctx.classical_embed()
    subset = ("all texts" if opts.limit is None else f"{len(data)} texts") + (
        f"; {opts.describe(n_train)}"
    )
    score = TaskScore(
        "classification",
        path.parent.name,
        "accuracy",
        ctx.default.name,
        len(data) - n_train * n_labels,
        acc(emb.artifact),
        acc(emb.reference),
        None if classical is None else acc(classical(texts)),
        subset,
    )  # fmt: skip
    return _TaskResult((score,), emb.cosines(), tuple(texts))


# in report order; the first task given also gives the latency texts
_SCORERS: tuple[tuple[str, Callable[[_Context], _TaskResult]], ...] = (
    ("sts", _score_sts),
    ("retrieval", _score_retrieval),
    ("classification", _score_classification),
)


# --- latency, agreement, budget --------------------------------------------------------------


def _percentile_ms(seconds: list[float], q: float) -> float:
    return 1000.0 * float(np.percentile(seconds, q))


def measure_latency(
    runners: dict[str, Embed], texts: Sequence[str], config: LatencyConfig
) -> list[Latency]:
    """Batch-1 latency (each text alone, runners interleaved) and batch throughput."""
    one = list(texts[: config.batch1_texts])
    for fn in runners.values():  # warm-up
        fn(one[:1])
    seconds: dict[str, list[float]] = {n: [] for n in runners}
    for t in one:
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn([t])
            seconds[name].append(time.perf_counter() - t0)
    many = list(texts[: config.throughput_texts])
    speed = compare_throughput(runners, many, repeats=config.repeats)
    return [
        Latency(
            runner=name,
            batch1_p50_ms=_percentile_ms(seconds[name], 50),
            batch1_p95_ms=_percentile_ms(seconds[name], 95),
            batch1_texts=len(one),
            texts_per_s=speed[name].texts_per_second,
            batch_size=config.batch_size,
            throughput_texts=len(many),
        )
        for name in runners
    ]


def _latency(ctx: _Context, texts: Sequence[str]) -> list[Latency]:
    """Artifact and reference, default template, interleaved (nothing when switched off)."""
    lc = ctx.config.latency
    if lc is None or not texts:
        return []
    ctx.say("latency: batch 1 and batch throughput, artifact and reference interleaved")
    emb = ctx.embedder
    runners: dict[str, Embed] = {"artifact": lambda t: emb.encode(t, batch_size=lc.batch_size)}
    if ctx.reference is not None:
        model, default = ctx.reference.model, ctx.default
        runners["reference"] = lambda t: model.encode(
            t, default, pooling=emb.pooling, batch_size=lc.batch_size
        )
    return measure_latency(runners, texts, lc)


def _agreement(cosines: Sequence[np.ndarray]) -> Agreement | None:
    if not cosines:
        return None
    c = np.concatenate(cosines)
    return Agreement(len(c), float(c.mean()), float(c.min()), float(np.percentile(c, 1)))


def check_budget(scores: Sequence[TaskScore], max_drop: float) -> Budget:
    """The largest drop (reference - artifact, points) over every metric, against ``max_drop``."""
    drops = [(s.drop, f"{s.task} {s.metric}") for s in scores if s.drop is not None]
    if not drops:
        raise InputError("the budget needs task scores for both the artifact and the reference")
    worst, what = max(drops)
    return Budget(max_drop, worst, what, worst <= max_drop)


# --- the command -----------------------------------------------------------------------------


def _check_config(config: ValidateConfig) -> None:
    if not (config.sts or config.retrieval or config.classification):
        raise InputError(
            "nothing to validate on: give --sts, --retrieval and/or --classification (e.g. "
            "--sts ../shared/data/stsb/test.tsv)"
        )
    if config.max_drop is not None and config.reference in (None, "none"):
        raise InputError("--max-drop compares with the reference: drop --reference none")
    if config.max_drop is not None and config.max_drop < 0:
        raise InputError(f"--max-drop is a budget in points, >= 0; got {config.max_drop}")
    if config.limit is not None and config.limit < 2:
        raise InputError(f"--limit must be >= 2, got {config.limit}")
    if config.retrieval:
        retrieval_options(config)  # conflicting distractors fail before any model loads


def _open(root: Path, config: ValidateConfig, say: Progress) -> _Context:
    """Load the artifact and (unless ``--reference none``) the PyTorch reference."""
    from echoembed.runtime import Embedder

    emb = Embedder.load(root, providers=config.providers, threads=config.threads)
    ref_spec = _reference_spec(config.reference, emb.manifest)
    ref = None
    if ref_spec is not None:
        say(f"loading the reference {ref_spec} (PyTorch fp32)")
        ref = _load_reference(ref_spec, emb, config)
    return _Context(
        config, emb, _artifact_side(emb), ref, ref_spec,
        emb.template(None), emb.template("classical"), say,
    )  # fmt: skip


def _report(
    ctx: _Context, root: Path, results: Sequence[_TaskResult], t_start: float
) -> ValidationReport:
    """Latency (on the first task's texts), agreement, budget, and the report of the run."""
    scores = tuple(s for r in results for s in r.scores)
    latency_texts = next((r.latency_texts for r in results if r.latency_texts), ())
    latency = _latency(ctx, latency_texts)
    max_drop = ctx.config.max_drop
    manifest = ctx.embedder.manifest
    return ValidationReport(
        artifact=str(root),
        precision=manifest.precision,
        model_sha256=manifest.files.get(manifest.model_file, ""),
        reference=ctx.reference_spec,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - t_start,
        machine=machine_info(ctx.embedder.runner.session.get_providers()),
        agreement=_agreement([c for r in results for c in r.cosines]),
        scores=scores,
        latency=tuple(latency),
        budget=None if max_drop is None else check_budget(scores, max_drop),
    )


def _write(report: ValidationReport, runs_dir: Path, root: Path, say: Progress) -> Path:
    run_dir = new_run_dir(runs_dir, "validate", root.resolve().name)
    atomic_write(run_dir / "report.json", report.to_json())
    atomic_write(run_dir / "report.md", format_report(report) + "\n")
    say(f"wrote {run_dir}/report.json and report.md")
    return run_dir


def validate(
    artifact: str | os.PathLike[str],
    config: ValidateConfig | None = None,
    progress: Progress | None = None,
) -> ValidationResult:
    """Validate ``artifact`` (see the module docstring); writes report.json/report.md to a new
    run directory under ``config.runs_dir``."""
    config = config or ValidateConfig()
    say = progress or (lambda _m: None)
    _check_config(config)
    t_start = time.perf_counter()
    root = Path(artifact)
    ctx = _open(root, config, say)
    results = [score(ctx) for task, score in _SCORERS if getattr(config, task)]
    report = _report(ctx, root, results, t_start)
    run_dir = None if config.runs_dir is None else _write(report, Path(config.runs_dir), root, say)
    return ValidationResult(report, run_dir)
