"""``echoembed validate``: an artifact against the PyTorch reference, side by side, on real data.

For each task given (STS, BEIR-style retrieval, classification) the artifact and the reference
embed the same texts with the same templates; the report holds the per-text agreement, each task
metric for both plus the artifact with the classical template, latency at batch 1 and
throughput at batch 32, and the budget verdict. Reference embeddings are cached on disk (keyed
by model file, template, pooling, length limit and texts), so validating several artifacts
pays for the reference once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    TaskScore,
    ValidationReport,
    format_report,
)
from echoembed.validation.retrieval import RetrievalConfig, evaluate_retrieval, read_retrieval
from echoembed.validation.sts import read_sts, sts_spearman
from echoembed.validation.timing import compare_throughput

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
    """What to validate against and on which data. Paths of None skip that task."""

    reference: str | None = "auto"  # auto: the artifact's bundled source; None: no reference
    sts: Path | None = None
    retrieval: Path | None = None
    classification: Path | None = None
    limit: int | None = None  # quick look: STS pairs, queries, classification texts
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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
        return arr


def machine_info(providers: Sequence[str] | None = None) -> dict:
    """Where a measurement ran: platform, CPU count, Python, ONNX Runtime (and providers)."""
    import onnxruntime as ort

    from echoembed.runtime.cpu import cpu_model, u8s8_saturates

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "int8_u8s8_saturates": u8s8_saturates(),  # no VNNI: INT8 artifacts need 7-bit weights
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }
    if providers is not None:
        info["providers"] = list(providers)
    return info


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


def _load_reference(spec: str, embedder, config: ValidateConfig) -> _Side:
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


def check_budget(scores: Sequence[TaskScore], max_drop: float) -> Budget:
    """The largest drop (reference - artifact, points) over every metric, against ``max_drop``."""
    drops = [(s.drop, f"{s.task} {s.metric}") for s in scores if s.drop is not None]
    if not drops:
        raise InputError("the budget needs task scores for both the artifact and the reference")
    worst, what = max(drops)
    return Budget(max_drop, worst, what, worst <= max_drop)


def validate(
    artifact: str | os.PathLike[str],
    config: ValidateConfig | None = None,
    progress: Progress | None = None,
) -> ValidationResult:
    """Validate ``artifact`` (see the module docstring); writes report.json/report.md to a new
    run directory under ``config.runs_dir``."""
    from echoembed.runtime import Embedder

    config = config or ValidateConfig()
    say = progress or (lambda _m: None)
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
    t_start = time.perf_counter()
    root = Path(artifact)
    emb = Embedder.load(root, providers=config.providers, threads=config.threads)
    manifest = emb.manifest
    model_sha = manifest.files.get(manifest.model_file, "")
    bs = config.batch_size

    art = _Side(
        lambda texts, tpl, ml, b: emb.encode(
            texts, tpl, batch_size=b, max_length=ml, show_progress=True
        ),
        EmbeddingCache(None),
        None,
    )
    ref_spec = _reference_spec(config.reference, manifest)
    ref: _Side | None = None
    if ref_spec is not None:
        say(f"loading the reference {ref_spec} (PyTorch fp32)")
        ref = _load_reference(ref_spec, emb, config)

    cosines: list[np.ndarray] = []
    scores: list[TaskScore] = []
    latency_texts: list[str] = []
    default = emb.template(None)
    classical = emb.template("classical")

    def both(texts: Sequence[str], tpl, max_length=None, batch_size=bs):
        a = art.embed(tpl, max_length, batch_size)(texts)
        r = None
        if ref is not None:
            r = ref.embed(tpl, max_length, batch_size)(texts)
            cosines.append(paired_cosine(a, r))
        return a, r

    if config.sts:
        data = read_sts(config.sts, limit=config.limit)
        sentences = data.unique_sentences()
        latency_texts = sentences
        say(f"STS: {len(data)} pairs, {len(sentences)} sentences ({config.sts})")
        index = {s: i for i, s in enumerate(sentences)}

        def rho(e: np.ndarray | None) -> float | None:
            if e is None:
                return None
            return sts_spearman(data, lambda s, e=e: e[[index[x] for x in s]])

        a, r = both(sentences, default)
        cl = rho(art.embed(classical)(sentences)) if config.classical else None
        scores.append(
            TaskScore(
                "sts",
                Path(config.sts).parent.name + "/" + Path(config.sts).stem,
                "spearman",
                default.name,
                len(data),
                rho(a),
                rho(r),
                cl,
                "all pairs" if config.limit is None else f"first {config.limit} pairs",
            )  # fmt: skip
        )
    if config.retrieval:
        opts = config.retrieval_options
        if config.limit is not None:
            opts = dataclasses.replace(opts, queries=config.limit)
        data_r = read_retrieval(config.retrieval, opts)
        say(
            f"retrieval: {len(data_r.queries)} queries over {len(data_r.corpus)} of "
            f"{data_r.corpus_size} documents ({opts.describe()})"
        )
        qt, dt = emb.template("query"), emb.template("document")
        doc_bs = max(1, min(bs, 8))  # long documents: bound the attention memory
        out: dict[str, dict[str, np.ndarray | None]] = {"q": {}, "d": {}}

        def run_side(kind: str, texts: Sequence[str], tpl, batch_size: int):
            a, r = both(texts, tpl, opts.max_length, batch_size)
            out[kind]["artifact"], out[kind]["reference"] = a, r
            return a

        scored = {}
        scored["artifact"] = evaluate_retrieval(
            data_r,
            lambda t: run_side("q", t, qt, bs),
            lambda t: run_side("d", t, dt, doc_bs),
            opts,
        )
        if ref is not None:
            scored["reference"] = evaluate_retrieval(
                data_r, lambda _t: out["q"]["reference"], lambda _t: out["d"]["reference"], opts
            )
        if config.classical:
            scored["classical"] = evaluate_retrieval(
                data_r,
                art.embed(classical, opts.max_length, bs),
                art.embed(classical, opts.max_length, doc_bs),
                opts,
            )
        name = Path(config.retrieval).name
        metrics = ((f"ndcg@{opts.ndcg_k}", "ndcg"), (f"recall@{opts.recall_k}", "recall"))
        for metric, attr in metrics:
            vals = {k: getattr(v, attr) for k, v in scored.items()}
            scores.append(
                TaskScore(
                    "retrieval",
                    name,
                    metric,
                    f"{qt.name}/{dt.name}",
                    len(data_r.queries),
                    vals["artifact"],
                    vals.get("reference"),
                    vals.get("classical"),
                    opts.describe(),
                )  # fmt: skip
            )
        latency_texts = latency_texts or list(data_r.queries.values())
    if config.classification:
        opts_c = config.classification_options
        if config.limit is not None:
            opts_c = dataclasses.replace(opts_c, limit=config.limit)
        data_c = read_classification(config.classification, opts_c)
        n_train = train_per_label(data_c.labels, opts_c)
        n_labels = len(set(data_c.labels))
        say(f"classification: {len(data_c)} texts, {n_labels} labels ({opts_c.describe(n_train)})")
        a, r = both(list(data_c.texts), default)

        def acc(e):
            return None if e is None else classification_accuracy(e, data_c.labels, opts_c)

        cl = acc(art.embed(classical)(list(data_c.texts))) if config.classical else None
        subset = ("all texts" if opts_c.limit is None else f"{len(data_c)} texts") + (
            f"; {opts_c.describe(n_train)}"
        )
        scores.append(
            TaskScore(
                "classification",
                Path(config.classification).parent.name,
                "accuracy",
                default.name,
                len(data_c) - n_train * n_labels,
                acc(a),
                acc(r),
                cl,
                subset,
            )  # fmt: skip
        )
        latency_texts = latency_texts or list(data_c.texts)

    agreement = None
    if cosines:
        c = np.concatenate(cosines)
        agreement = Agreement(len(c), float(c.mean()), float(c.min()), float(np.percentile(c, 1)))

    latency: list[Latency] = []
    if config.latency is not None and latency_texts:
        say("latency: batch 1 and batch throughput, artifact and reference interleaved")
        lc = config.latency
        runners = {"artifact": lambda t: emb.encode(t, batch_size=lc.batch_size)}
        if ref is not None:
            model = ref.model
            runners["reference"] = lambda t: model.encode(
                t, default, pooling=emb.pooling, batch_size=lc.batch_size
            )
        latency = measure_latency(runners, latency_texts, lc)

    budget = None if config.max_drop is None else check_budget(scores, config.max_drop)

    report = ValidationReport(
        artifact=str(root),
        precision=manifest.precision,
        model_sha256=model_sha,
        reference=ref_spec,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - t_start,
        machine=machine_info(emb.runner.session.get_providers()),
        agreement=agreement,
        scores=tuple(scores),
        latency=tuple(latency),
        budget=budget,
    )
    run_dir = None
    if config.runs_dir is not None:
        run_dir = new_run_dir(Path(config.runs_dir), "validate", root.resolve().name)
        write_atomic(run_dir / "report.json", report.to_json())
        write_atomic(run_dir / "report.md", format_report(report) + "\n")
        say(f"wrote {run_dir}/report.json and report.md")
    return ValidationResult(report, run_dir)
