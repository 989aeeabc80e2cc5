"""Where the time goes: FLOPs per text, achieved GFLOP/s (GOP/s), the fraction of this CPU's
measured peak, and ONNX Runtime's per-op profile, for each artifact, side by side in one run.

    python benchmarks/profile_runtime.py ARTIFACT [ARTIFACT ...] [--names LABEL ...] [--texts 128]
        [--batch-size 32] [--threads 2] [--repeats 3] [--out profile.json]

One run measures, with the same ONNX Runtime settings as ``OrtRunner`` (ORT_ENABLE_ALL, intra-op
threads T, inter-op 1, CPU provider):

1. the CPU (``lscpu`` model name; avx512_vnni / avx_vnni / avx512_bf16 / avx2 flags);
2. the peaks: one-node fp32 ``MatMul`` and ``MatMulInteger`` (uint8 activations x int8 weights,
   as ONNX Runtime's dynamic quantization writes them; and uint8 x uint8) graphs at the model's
   GEMM shapes for batch 32 x 88 tokens, timed in three rounds (before the profiling, before
   and after the throughput runs; N runs each after a warm-up): the best run of the best shape;
3. per artifact, in a profiling session: a warm-up pass over the texts, then ``--profile-passes``
   profiled ones (the fastest kept): every kernel's duration and its input/output shapes (so
   the executed FLOPs of matmuls and attention come from the shapes that really ran, padding
   included), grouped by op type; the profile files go to a temporary directory, then away;
4. throughput: ``Embedder.encode`` on the same STS-B test sentences, a warm-up pass each, then
   every artifact timed round-robin (``compare_throughput``), median of the repeats.

FLOPs counted: 2*M*K*N for every matmul-like kernel (MatMul, FusedMatMul, Gemm, MatMulInteger,
DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMulNBits) and 4*B*S*T*D for fused attention
(QK^T and AV over the full S x T score matrix, as the unfused graph's MatMuls also compute it);
elementwise work is not counted. The weight GEMMs' FLOPs per token are also read from the ONNX
graph (2*K*N per constant-weight matmul) as a check on the profile's count. "Useful" FLOPs are
what the texts need without padding: weight GEMMs x real tokens + attention at each text's own
length. The fraction of peak is ideal time / measured time, where ideal time runs the integer
ops at the int8 peak and the float ones at the fp32 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echoembed.validation.roofline import PROBE_SHAPES, probe_model

FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "avx2")
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "MatMulNBits"})
INT8_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"})
ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})
# Ops whose weight input is followed back to an initializer by the static count.
PASS_THROUGH = frozenset({"DequantizeLinear", "Cast", "Identity", "Transpose"})


# ---------------------------------------------------------------------------------------------
# Machine


def machine(threads: int) -> dict[str, Any]:
    """This CPU as ``lscpu`` names it, the flags that decide the int8 kernels, ORT's version."""
    import onnxruntime as ort

    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = set(info.get("Flags", "").split())
    if not flags:  # no lscpu: the runtime's own reader of /proc/cpuinfo
        from echoembed.runtime.cpu import cpu_flags

        flags = set(cpu_flags() or ())
    return {
        "cpu_model": info.get("Model name"),
        "cpus": os.cpu_count(),
        "flags": {f: f in flags for f in FLAGS},
        "onnxruntime": ort.__version__,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
    }


def session_options(threads: int, profile_prefix: str | None = None):
    """``OrtRunner``'s options (ORT_ENABLE_ALL, T intra-op threads, 1 inter-op), optionally
    profiling into files that start with ``profile_prefix``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


# ---------------------------------------------------------------------------------------------
# Peak probe


def time_runs(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class PeakProbe:
    """The probe graphs, timed in rounds spread over the run (so that a burst of other load on a
    shared machine does not set the peak); each (kind, shape) keeps every timed run."""

    def __init__(self, threads: int, kinds: Sequence[str], runs: int):
        self.threads, self.kinds, self.runs = threads, list(kinds), runs
        self.times: dict[tuple[str, tuple[int, int, int]], list[float]] = defaultdict(list)
        self.round_best: list[dict[str, float]] = []

    def round(self) -> None:
        """One round: every kind at every shape, 3 warm-up runs, then ``runs`` timed ones."""
        import onnxruntime as ort

        best: dict[str, float] = {}
        for kind in self.kinds:
            for shape in PROBE_SHAPES:
                blob, feed = probe_model(*shape, kind)
                sess = ort.InferenceSession(
                    blob, session_options(self.threads), providers=["CPUExecutionProvider"]
                )
                times = time_runs(lambda s=sess, f=feed: s.run(None, f), warmup=3, runs=self.runs)
                self.times[(kind, shape)].extend(times)
                rate = 2.0 * float(np.prod(shape)) / min(times) / 1e9
                best[kind] = max(best.get(kind, 0.0), rate)
                del sess
        self.round_best.append(best)

    def rows(self) -> list[dict[str, Any]]:
        """Per (kind, shape): G(FL)OP/s of the best and the median run over all rounds."""
        out = []
        for (kind, shape), times in self.times.items():
            ops = 2.0 * float(np.prod(shape))
            out.append(
                {
                    "kind": kind,
                    "shape": list(shape),
                    "runs": len(times),
                    "best_gops": ops / min(times) / 1e9,
                    "median_gops": ops / float(np.median(times)) / 1e9,
                }
            )
        return out


def peaks_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each kind's peak: its best shape's best run, in G(FL)OP/s."""
    peaks: dict[str, float] = {}
    for r in rows:
        peaks[r["kind"]] = max(peaks.get(r["kind"], 0.0), r["best_gops"])
    return peaks


# ---------------------------------------------------------------------------------------------
# FLOPs: the static count from the graph, the executed count from the profile's shapes


def graph_weight_flops(model_path: Path) -> dict[str, Any]:
    """FLOPs per token of the constant-weight matmuls (2*K*N each) and the attention nodes the
    exported graph holds, read from the ONNX file (weights followed back through
    DequantizeLinear / Cast / Transpose to an initializer or Constant)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    const: dict[str, list[int]] = {i.name: list(i.dims) for i in g.initializer}
    per_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    attention: list[dict[str, Any]] = []
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            const[node.output[0]] = list(attrs["value"].dims)
            continue
        if node.op_type in PASS_THROUGH and node.input and node.input[0] in const:
            dims = const[node.input[0]]
            if node.op_type == "Transpose":
                perm = attrs.get("perm", list(range(len(dims)))[::-1])
                dims = [dims[p] for p in perm]
            const[node.output[0]] = dims
            continue
        if node.op_type in ATTENTION_OPS:
            attention.append(
                {
                    "op": node.op_type,
                    **{
                        k: attrs[k]
                        for k in ("num_heads", "kv_num_heads", "do_rotary")
                        if k in attrs
                    },
                }
            )
            continue
        kn = _weight_kn(node.op_type, node.input, attrs, const)
        if kn is not None:
            per_op[node.op_type] += 2.0 * kn[0] * kn[1]
            counts[node.op_type] += 1
    return {
        "flops_per_token": float(sum(per_op.values())),
        "by_op": dict(per_op),
        "weight_matmuls": dict(counts),
        "attention_nodes": len(attention),
        "attention_attrs": attention[0] if attention else None,
        "nodes": len(g.node),
    }


def _weight_kn(op: str, inputs, attrs: dict, const: dict) -> tuple[int, int] | None:
    """[K, N] of a matmul-like node whose weight is constant, else None."""
    if op == "MatMulNBits":
        return int(attrs["K"]), int(attrs["N"])
    if op not in MATMUL_OPS | INT8_OPS or len(inputs) < 2 or inputs[1] not in const:
        return None
    dims = const[inputs[1]]
    if len(dims) != 2:
        return None
    k, n = dims
    if attrs.get("transB", 0):
        k, n = n, k
    return k, n


def _shapes(entries) -> list[tuple[str, list[int]]]:
    """The profile's ``input_type_shape`` / ``output_type_shape``: [(dtype, shape)]."""
    out = []
    for e in entries or ():
        for dtype, shape in e.items():
            out.append((dtype, [int(d) for d in shape]))
    return out


def kernel_flops(op: str, args: dict[str, Any]) -> tuple[float, str, str] | None:
    """(FLOPs, "weights" | "attention", "float" | "int8") of one executed kernel from the shapes
    the profiler recorded, or None for ops that are not counted."""
    ins, outs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
    if not ins or not outs:
        return None
    a, y = ins[0][1], outs[0][1]
    if op in ATTENTION_OPS:
        if len(y) != 3:
            return None
        b, s, d = y
        # GroupQueryAttention's present_key is [B, kv_heads, T, head_size]: T keys per query.
        t = outs[1][1][2] if op == "GroupQueryAttention" and len(outs) > 1 else s
        return 4.0 * b * s * t * d, "attention", "float"
    if op not in MATMUL_OPS | INT8_OPS or len(a) < 1 or len(y) < 1:
        return None
    if op == "MatMulNBits":
        k = a[-1]
    else:  # A is [..., M, K] or (transposed) [..., K, M]; equal when M == K
        k = a[-1] if len(a) < 2 or len(y) < 2 or a[-2] == y[-2] else a[-2]
    flops = 2.0 * float(np.prod(y)) * k
    # echoembed quantizes linear layers only, so an integer GEMM is a weight GEMM; its second
    # recorded input need not be B (a prepacked B is not listed; MatMulIntegerToFloat's a_scale
    # is [B, S, 1] with per-token scales)
    batched = (
        op not in INT8_OPS and len(ins) > 1 and len(a) >= 3 and len(ins[1][1]) >= 3
        and op != "MatMulNBits"
    )  # fmt: skip
    return flops, ("attention" if batched else "weights"), ("int8" if op in INT8_OPS else "float")


# ---------------------------------------------------------------------------------------------
# Profiling pass


class _ProfiledRunner:
    """A runner over a profiling session that remembers each batch's shape and lengths."""

    def __init__(self, session):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_name = session.get_outputs()[0].name
        self.batches: list[tuple[int, int, list[int]]] = []

    def encode(self, batch) -> np.ndarray:
        b, s = batch.input_ids.shape
        self.batches.append((int(b), int(s), [int(x) for x in batch.lengths]))
        feed = {k: v for k, v in batch.feed().items() if k in self.input_names}
        return self.session.run([self.output_name], feed)[0]


def profile_pass(
    artifact: Path, texts: Sequence[str], threads: int, batch_size: int, passes: int, tmp: Path
) -> dict[str, Any]:
    """A warm-up pass over ``texts``, then ``passes`` profiled ones; per-op times and executed
    FLOPs of the fastest profiled pass (least ORT run time; the profile file is read, then
    deleted)."""
    import onnxruntime as ort

    from echoembed.echo.batching import embed_texts
    from echoembed.runtime import Embedder

    emb = Embedder.load(artifact, session=False)
    sess = ort.InferenceSession(
        str(artifact / emb.manifest.model_file),
        session_options(threads, str(tmp / f"ort_{artifact.name}")),
        providers=["CPUExecutionProvider"],
    )
    runner = _ProfiledRunner(sess)
    encoder = emb.encoder()

    def one_pass() -> float:
        runner.batches.clear()
        t0 = time.perf_counter()
        embed_texts(runner, encoder, list(texts), batch_size=batch_size, show_progress=False)
        return time.perf_counter() - t0

    one_pass()  # warm-up: every batch shape once (arena growth, prepacking, caches)
    per_pass = len(runner.batches)
    walls = [one_pass() for _ in range(passes)]
    prof_path = Path(sess.end_profiling())
    events = json.loads(prof_path.read_text())
    prof_path.unlink()
    del sess
    parsed = [parse_profile(events, per_pass * (1 + i), per_pass) for i in range(passes)]
    best = min(range(passes), key=lambda i: parsed[i]["run_us"])
    return {
        "batches": runner.batches,
        "wall_s": walls[best],
        "pass_run_s": [x["run_us"] * 1e-6 for x in parsed],
        **parsed[best],
    }


def parse_profile(events: list[dict[str, Any]], skip_runs: int, n_runs: int) -> dict[str, Any]:
    """Kernel time and FLOPs per op type over ``n_runs`` ``model_run``s after the first
    ``skip_runs`` (the session runs one node at a time: its kernels lie inside its runs)."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )[skip_runs : skip_runs + n_runs]
    if len(runs) != n_runs:
        raise RuntimeError(
            f"the ORT profile holds {len(runs)} of the {n_runs} model_runs expected after the "
            f"first {skip_runs}"
        )
    start, end = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    op_us: dict[str, float] = defaultdict(float)
    op_n: dict[str, int] = defaultdict(int)
    flops: dict[str, float] = defaultdict(float)  # "weights/float", "attention/float", ...
    gemm_us: dict[str, float] = defaultdict(float)  # kernel time of the counted kernels
    weight_dtypes: set[str] = set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not start <= e["ts"] <= end:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        op_us[op] += e["dur"]
        op_n[op] += 1
        counted = kernel_flops(op, args)
        if counted is not None:
            f, part, prec = counted
            flops[f"{part}/{prec}"] += f
            gemm_us[f"{part}/{prec}"] += e["dur"]
            if prec == "int8":
                ins = _shapes(args.get("input_type_shape"))
                weight_dtypes.update(d for d, _ in ins[1:2])
    return {
        "runs": len(runs),
        "run_us": float(sum(e["dur"] for e in runs)),
        "node_us": float(sum(op_us.values())),
        "op_us": dict(op_us),
        "op_count": dict(op_n),
        "flops": dict(flops),
        "counted_us": dict(gemm_us),
        "int8_weight_dtypes": sorted(weight_dtypes),
    }


# ---------------------------------------------------------------------------------------------
# Putting it together


def summarize(
    name: str,
    graph: dict[str, Any],
    prof: dict[str, Any],
    seconds: float,
    n_texts: int,
    peaks: dict[str, float],
    int8_peak_kind: str,
    top: int,
) -> dict[str, Any]:
    """Per-variant numbers: FLOPs per token / text / padded batch, achieved rate, peak fraction,
    op shares."""
    batches = prof["batches"]
    lengths = [x for _, _, ls in batches for x in ls]
    real = sum(lengths)
    padded = sum(b * s for b, s, _ in batches)
    fl = prof["flops"]
    w_float, w_int8 = fl.get("weights/float", 0.0), fl.get("weights/int8", 0.0)
    attn = fl.get("attention/float", 0.0) + fl.get("attention/int8", 0.0)
    executed = w_float + w_int8 + attn
    attn_coef = attn / max(1, sum(b * s * s for b, s, _ in batches))  # FLOPs per B*S*T
    weights_per_token = graph["flops_per_token"]
    useful = weights_per_token * real + attn_coef * sum(x * x for x in lengths)
    float_ops, int8_ops = w_float + attn, w_int8
    ideal = float_ops / (peaks["fp32"] * 1e9) + int8_ops / (peaks[int8_peak_kind] * 1e9)
    run_us, node_us = prof["run_us"], prof["node_us"]
    shares = sorted(prof["op_us"].items(), key=lambda kv: -kv[1])
    kernels = {}
    for part, us in prof["counted_us"].items():
        peak = peaks[int8_peak_kind] if part.endswith("int8") else peaks["fp32"]
        rate = fl[part] / (us * 1e-6) / 1e9 if us else 0.0
        kernels[part] = {"gops": rate, "peak_fraction": rate / peak, "share": us / run_us}
    return {
        "name": name,
        "texts": n_texts,
        "batches": len(batches),
        "mean_prompt_tokens": real / n_texts,
        "padding_fraction": 1.0 - real / padded,
        "graph_nodes": graph["nodes"],
        "attention_nodes": graph["attention_nodes"],
        "weight_flops_per_token_graph": weights_per_token,
        "weight_flops_per_token_profile": (w_float + w_int8) / padded,
        "attention_flops_per_token_key": attn_coef,
        "useful_flops_per_real_token": useful / real,
        "useful_flops_per_text": useful / n_texts,
        "executed_flops_per_text": executed / n_texts,
        "executed_flops_per_padded_batch": executed / len(batches),
        "executed_flops": {"weights_float": w_float, "weights_int8": w_int8, "attention": attn},
        "median_seconds": seconds,
        "texts_per_second": n_texts / seconds,
        "achieved_gops": executed / seconds / 1e9,
        "useful_gops": useful / seconds / 1e9,
        "peak_fraction": ideal / seconds,
        "int8_peak_kind": int8_peak_kind if int8_ops else None,
        "kernels": kernels,
        "batch_shapes": [[b, s] for b, s, _ in batches],
        "profile_wall_s": prof["wall_s"],
        "profile_pass_run_s": prof["pass_run_s"],
        "outside_ort_share": 1.0 - run_us * 1e-6 / prof["wall_s"],
        "outside_nodes_share": 1.0 - node_us / run_us,
        "op_shares": {op: us / run_us for op, us in shares},
        "top_ops": [op for op, _ in shares[:top]],
        "op_count_per_run": {op: prof["op_count"][op] / prof["runs"] for op, _ in shares},
    }


def int8_kind(prof: dict[str, Any]) -> str:
    """Which integer probe an artifact's kernels match, from the weight dtypes the profile saw:
    u8u8 where every integer GEMM had uint8 weights, else u8s8."""
    dtypes = set(prof["int8_weight_dtypes"])
    return "u8u8" if dtypes == {"uint8"} else "u8s8"


def _g(x: float) -> str:
    return f"{x / 1e9:.1f}"


def print_report(result: dict[str, Any]) -> None:
    mach, peaks = result["machine"], result["peaks"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in mach["flags"].items())
    print(
        f"CPU: {mach['cpu_model']} ({mach['cpus']} CPUs; {flags}); onnxruntime "
        f"{mach['onnxruntime']}; {mach['intra_op_threads']} intra-op threads, 1 inter-op"
    )
    print("\n| probe | [M, K, N] | best G(FL)OP/s | median |")
    print("|---|---|---|---|")
    for r in result["probe"]:
        print(f"| {r['kind']} | {r['shape']} | {r['best_gops']:.1f} | {r['median_gops']:.1f} |")
    print("\npeaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + " G(FL)OP/s")
    rounds = "; ".join(
        ", ".join(f"{k} {v:.0f}" for k, v in best.items()) for best in result["probe_round_best"]
    )
    print(f"best of each probe round: {rounds}")
    over = [
        f"{v['name']} {part}"
        for v in result["variants"]
        for part, k in v["kernels"].items()
        if k["peak_fraction"] > 1.0
    ]
    if over:
        print(
            f"WARNING: kernels faster than the probe's peak ({', '.join(over)}): the probe was "
            "disturbed by other load; rerun on a quiet machine"
        )
    print(
        "\n| variant | graph nodes (GQA) | texts/s | GFLOP/text useful / executed | GFLOP per "
        "padded batch | achieved G(FL)OP/s | fraction of peak | matmul kernels: G(FL)OP/s "
        "(of peak) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in result["variants"]:
        kern = "; ".join(
            f"{part.replace('/', ' ')} {k['gops']:.0f} ({k['peak_fraction']:.0%})"
            for part, k in sorted(v["kernels"].items())
        )
        print(
            f"| {v['name']} | {v['graph_nodes']} ({v['attention_nodes']}) | "
            f"{v['texts_per_second']:.1f} | {_g(v['useful_flops_per_text'])} / "
            f"{_g(v['executed_flops_per_text'])} | {_g(v['executed_flops_per_padded_batch'])} | "
            f"{v['achieved_gops']:.1f} | {v['peak_fraction']:.0%} | {kern} |"
        )
    print("\n| variant | time share of ORT runs, top ops | outside nodes | outside ORT |")
    print("|---|---|---|---|")
    for v in result["variants"]:
        ops = ", ".join(f"{op} {v['op_shares'][op]:.0%}" for op in v["top_ops"])
        print(
            f"| {v['name']} | {ops} | {v['outside_nodes_share']:.1%} | "
            f"{v['outside_ort_share']:.1%} |"
        )
    v0 = result["variants"][0]
    print(
        f"\ntexts: {v0['texts']} STS-B test sentences, mean echo prompt "
        f"{v0['mean_prompt_tokens']:.1f} tokens, {v0['batches']} batches, padding "
        f"{v0['padding_fraction']:.1%} ([batch, sequence]: "
        + ", ".join(f"{b}x{t}" for b, t in v0["batch_shapes"])
        + "); weight-GEMM FLOPs per token: "
        + ", ".join(
            f"{v['name']} graph {v['weight_flops_per_token_graph'] / 1e6:.1f}M / profile "
            f"{v['weight_flops_per_token_profile'] / 1e6:.1f}M"
            for v in result["variants"]
        )
        + f"; useful FLOPs per real token {v0['useful_flops_per_real_token'] / 1e6:.1f}M "
        f"(attention: {v0['attention_flops_per_token_key']:.0f} FLOPs per token per key)"
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary sibling, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--names", nargs="+", help="labels for the artifacts (default: dir names)")
    ap.add_argument("--sts", default="../shared/data/stsb/test.tsv")
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-runs", type=int, default=20)
    ap.add_argument("--profile-passes", type=int, default=2, help="profiled passes (fastest kept)")
    ap.add_argument(
        "--probe-kinds",
        nargs="+",
        default=["fp32", "u8s8", "u8u8"],
        choices=["fp32", "u8s8", "u8u8"],
        help="fp32 is always probed",
    )
    ap.add_argument("--top", type=int, default=6, help="op types shown per variant")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    names = args.names or [p.name for p in args.artifacts]
    if len(names) != len(args.artifacts):
        ap.error("--names needs one label per artifact")

    from echoembed.runtime import Embedder
    from echoembed.validation import compare_throughput, read_sts

    texts = read_sts(args.sts).unique_sentences()[: args.texts]
    mach = machine(args.threads)
    kinds = ["fp32"] + [k for k in dict.fromkeys(args.probe_kinds) if k != "fp32"]
    probe = PeakProbe(args.threads, kinds, args.probe_runs)
    probe.round()
    graphs = [
        graph_weight_flops(p / Embedder.load(p, session=False).manifest.model_file)
        for p in args.artifacts
    ]

    tmp = Path(tempfile.mkdtemp(prefix="echoembed-profile-"))
    try:
        profiles = [
            profile_pass(p, texts, args.threads, args.batch_size, args.profile_passes, tmp)
            for p in args.artifacts
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    embedders = {
        n: Embedder.load(p, threads=args.threads)
        for n, p in zip(names, args.artifacts, strict=True)
    }
    encode = {
        n: (lambda t, e=e: e.encode(t, batch_size=args.batch_size, show_progress=False))
        for n, e in embedders.items()
    }
    for fn in encode.values():  # a full pass each first: every batch shape warm
        fn(texts)
    probe.round()
    timed = compare_throughput(encode, texts, repeats=args.repeats)
    probe.round()
    probe_rows = probe.rows()
    peaks = peaks_by_kind(probe_rows)
    variants = []
    for n, g, prof in zip(names, graphs, profiles, strict=True):
        kind = int8_kind(prof)
        if kind not in peaks:
            kind = next((k for k in ("u8s8", "u8u8") if k in peaks), "fp32")
        variants.append(
            summarize(n, g, prof, timed[n].median_seconds, len(texts), peaks, kind, args.top)
        )
    result = {
        "machine": mach,
        "settings": {
            "sts": str(args.sts),
            "texts": len(texts),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "probe_runs": args.probe_runs,
            "profile_passes": args.profile_passes,
        },
        "probe": probe_rows,
        "probe_round_best": probe.round_best,
        "peaks": peaks,
        "variants": variants,
        "artifacts": {n: str(p) for n, p in zip(names, args.artifacts, strict=True)},
        "timings_s": {n: list(timed[n].seconds) for n in names},
    }
    print_report(result)
    if args.out:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
