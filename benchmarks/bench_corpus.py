"""Corpus-job throughput: the local engine vs Ray Data with 1 and 2 actors, same artifact, same
texts, one run; plus Ray's fixed costs (cluster start, actor model load, shutdown).

    .venv/bin/python benchmarks/bench_corpus.py [--artifact artifacts/smollm2-echo-int8-dynamic]

Texts: the first 1,700 distinct STS-B test sentences and the 300 SciFact test queries (2,000
short real texts) from ../shared/data, written to a temporary JSONL file. Every job writes to a
fresh temporary OUT_DIR and is verified (every id exactly once). Ray runs on one local cluster
on 127.0.0.1 (3 CPUs on this 2-core machine: the actors' plus one for Ray Data's own tasks);
1 actor gets 2 ONNX Runtime threads, 2 actors get 1 each; the local engine uses ORT's default
(all cores). ``rows/s end-to-end`` is rows over the engine's wall time (for Ray: actor start
and model load included, cluster start excluded); ``rows/s steady`` excludes everything before
the first finished shard: (rows - first shard's rows) / (wall - time to the first shard).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def texts(n_sts: int = 1700) -> list[dict[str, str]]:
    with open(DATA / "stsb" / "test.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    sts = list(dict.fromkeys(s for r in rows for s in r[:2]))[:n_sts]
    out = [{"id": f"sts-{i}", "text": t} for i, t in enumerate(sts)]
    with open(DATA / "scifact" / "queries.jsonl", encoding="utf-8") as f:
        out += [{"id": f"q-{q['_id']}", "text": q["text"]} for q in map(json.loads, f)]
    return out


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(config, label: str, results: list) -> None:
    from echoembed.corpus import embed_corpus, verify_corpus

    s = embed_corpus(config)
    report = verify_corpus(config.out_dir, config.input)
    if not (s.complete and report.ok):
        raise SystemExit(f"{label}: the job did not verify")
    info = s.engine_info
    first = info.get("first_shard_s", 0.0)
    first_rows = config.rows_per_shard
    steady = (s.rows - first_rows) / (s.engine_s - first) if s.engine_s > first else 0.0
    results.append((label, s.rows, s.engine_s, s.rows / s.engine_s, steady, info))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(REPO / "artifacts" / "smollm2-echo-int8-dynamic"))
    p.add_argument("--rows-per-shard", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    from echoembed.artifact import read_manifest
    from echoembed.corpus import CorpusConfig
    from echoembed.corpus.ray_engine import init_local_ray

    rows = texts()
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    src = tmp / "texts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def config(name: str, **kw) -> CorpusConfig:
        return CorpusConfig(args.artifact, src, tmp / name, rows_per_shard=args.rows_per_shard,
                            batch_size=args.batch_size, progress=False, **kw)  # fmt: skip

    results: list = []
    run(config("local"), "local engine (1 process)", results)
    t0 = time.perf_counter()
    ray = init_local_ray(num_cpus=3)
    init_s = time.perf_counter() - t0
    try:
        run(config("ray1", engine="ray", concurrency=1, cpus_per_actor=2), "Ray, 1 actor x 2 "
            "threads", results)  # fmt: skip
        run(config("ray2", engine="ray", concurrency=2, cpus_per_actor=1), "Ray, 2 actors x 1 "
            "thread", results)  # fmt: skip
    finally:
        t1 = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t1

    m = read_manifest(args.artifact)
    print(f"artifact {args.artifact} ({m.precision}); {len(rows)} texts (1,700 STS-B test "
          f"sentences + 300 SciFact queries), {args.rows_per_shard} rows per shard, batch "
          f"{args.batch_size}")  # fmt: skip
    print(f"CPU {cpu_name()}, {os.cpu_count()} cores; "
          f"ray {ray.__version__}, Python {platform.python_version()}")  # fmt: skip
    print(f"{'engine':<28} {'rows':>5} {'wall s':>7} {'rows/s end-to-end':>18} "
          f"{'rows/s steady':>14}  first shard s, actor load s")  # fmt: skip
    for label, n, wall, e2e, steady, info in results:
        loads = info.get("actor_load_s", [info.get("load_s")])
        print(f"{label:<28} {n:>5} {wall:>7.1f} {e2e:>18.1f} {steady:>14.1f}  "
              f"{info.get('first_shard_s', 0):.1f}, {loads}")  # fmt: skip
    print(f"Ray fixed costs: cluster start (ray.init) {init_s:.2f} s, shutdown {shutdown_s:.2f} s;"
          " actor model load in the table (Embedder.load inside each actor)")  # fmt: skip


if __name__ == "__main__":
    main()
