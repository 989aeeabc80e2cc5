"""Triton serving of an echo artifact: cold start, requests/s and latency at batch 1.

    python benchmarks/bench_triton.py [ARTIFACT] [--clients 8] [--requests 50] [--starts 3]

Writes a model repository (``--encoder python``: echoembed.runtime in Triton's Python backend)
to a temporary directory, then measures on the pytriton wheel's tritonserver:

- cold start: process start -> ``/v2/health/ready`` (``--starts`` times; the first run may also
  read the model from disk);
- ``--clients`` concurrent clients, each sending ``--requests`` single-sentence requests (STS-B
  test sentences) to ``echo_embedder`` one after another, over HTTP and then gRPC: requests/s
  over the whole run and p50/p95 latency per request, plus the mean dynamic batch the encoder
  ran;
- beside it, the in-process ``Embedder.encode`` at batch 1 on one thread of requests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from echoembed.deploy import ServeConfig, TritonRepoConfig, TritonServer, write_triton_repo
from echoembed.runtime import Embedder
from echoembed.validation import read_sts
from echoembed.validation.report import machine_info


def _inputs(mod, text: str) -> list:
    t = mod.InferInput("text", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=object))
    return [t]


def _load(server: TritonServer, protocol: str, texts: list[str], clients: int, requests: int):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    mod = th if protocol == "http" else tg
    url = server.http_url if protocol == "http" else server.grpc_url
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        c = mod.InferenceServerClient(url)
        mine = []
        barrier.wait()
        for j in range(requests):
            text = texts[(k * requests + j) % len(texts)]
            t0 = time.perf_counter()
            try:
                c.infer("echo_embedder", _inputs(mod, text)).as_numpy("embedding")
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors.append(str(e)[:200])
            mine.append(time.perf_counter() - t0)
        c.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "errors": errors,
    }


def _batch_stats(server: TritonServer) -> tuple[int, int]:
    import tritonclient.http as th

    c = th.InferenceServerClient(server.http_url)
    s = c.get_inference_statistics("echo_encoder")["model_stats"][0]
    c.close()
    return int(s["inference_count"]), int(s["execution_count"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact", nargs="?", default="artifacts/smollm2-echo")
    ap.add_argument("--sts", default="../shared/data/stsb/test.tsv")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client and protocol")
    ap.add_argument("--starts", type=int, default=3, help="cold starts measured")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    args = ap.parse_args()

    texts = read_sts(args.sts).unique_sentences()
    info = machine_info()
    print(f"machine: {info.cpu_model}, {info.cpu_count} cores; Python {info.python}; "
          f"onnxruntime {info.onnxruntime}; artifact {args.artifact}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        repo = write_triton_repo(
            TritonRepoConfig(
                Path(args.artifact),
                Path(tmp) / "repo",
                max_batch=args.max_batch,
                max_queue_delay_us=args.max_queue_delay_us,
            )
        )
        config = ServeConfig(repo, start_timeout_s=300)
        starts, stops = [], []
        for _ in range(args.starts):
            server = TritonServer(config)
            t0 = time.perf_counter()
            server.start()
            starts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            server.stop()
            stops.append(time.perf_counter() - t0)
        print(f"cold start (process -> ready), s: {', '.join(f'{s:.2f}' for s in starts)} "
              f"(median {statistics.median(starts):.2f}); stop: median "
              f"{statistics.median(stops):.2f} s")  # fmt: skip

        rows = []
        with TritonServer(config) as server:
            _load(server, "http", texts, 2, 5)  # warm-up
            for protocol in ("http", "grpc"):
                before = _batch_stats(server)
                r = _load(server, protocol, texts, args.clients, args.requests)
                after = _batch_stats(server)
                inf, exe = after[0] - before[0], after[1] - before[1]
                rows.append((protocol, r, inf / max(exe, 1)))
        emb = Embedder.load(args.artifact)
        sample = texts[: args.requests * 2]
        emb.encode(sample[:4], batch_size=1, show_progress=False)
        lat = []
        for t in sample:
            t0 = time.perf_counter()
            emb.encode([t], batch_size=1, show_progress=False)
            lat.append(time.perf_counter() - t0)
        local = len(sample) / sum(lat)
        local_ms = np.percentile(np.array(lat) * 1000, [50, 95])

    print(f"\n{args.clients} clients x {args.requests} requests of 1 sentence each, per protocol")
    print("| path | requests/s | p50 ms | p95 ms | mean encoder batch | errors |")
    print("|---|---|---|---|---|---|")
    for protocol, r, batch in rows:
        print(f"| Triton {protocol} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
              f"{batch:.2f} | {len(r['errors'])} |")  # fmt: skip
    print(f"| in-process Embedder, 1 caller, batch 1 | {local:.1f} | {local_ms[0]:.1f} | "
          f"{local_ms[1]:.1f} | 1 | 0 |")  # fmt: skip
    failed = [e for _, r, _ in rows for e in r["errors"]]
    if failed:
        print(f"first error: {failed[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
