"""ONNX Runtime's CPU attention kernels at SmolLM2's echo shapes, side by side in one run.

    python benchmarks/attention_kernels.py [--batch 32] [--seq 44] [--repeats 6] [--out a.json]

The fused graph (``exporter.fusion``) runs attention as one ``GroupQueryAttention`` node per layer
(rotary inside, per-row ``seqlens_k``). This times one layer's attention, on the same random
query/key/value, in three forms ONNX Runtime can run on the CPU:

1. ``GroupQueryAttention`` (com.microsoft) with ``do_rotary=1`` and a cos/sin cache, as exported;
2. ``RotaryEmbedding`` (com.microsoft) on q and k, then the standard ONNX ``Attention`` (opset 23)
   with ``q_num_heads``/``kv_num_heads`` and ``is_causal=1`` (no mask: with right padding, causal
   attention is exact at every real token);
3. the decomposed form of an unfused export's core: ``MatMul(q, k^T) * scale + causal mask ->
   Softmax -> MatMul(p, v)`` on [B, H, S, D] (k/v already repeated to H heads, rotary excluded,
   so it is a lower bound for that route).

Forms 1 and 2 are checked against each other (max abs diff of the outputs) before timing.
Every form is timed round-robin (the order flips each repeat), ``--runs`` runs per turn after two
warm-ups; median ms per call of the repeats; also at batch 1. Prints the CPU (``cpu_id``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from echoembed.runtime.cpu import cpu_id, cpu_model

HEADS, KV_HEADS, HEAD, THETA, MAX_POS = 9, 3, 64, 100000.0, 512  # SmolLM2-135M


def _session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _caches() -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / THETA ** (np.arange(0, HEAD, 2) / HEAD)
    angles = np.arange(MAX_POS)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build(b: int, s: int) -> dict[str, tuple[object, dict[str, np.ndarray]]]:
    """{form: (ONNX model, feed)} for batch ``b`` and sequence ``s``."""
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, s, HEADS * HEAD), np.float32)
    k = rng.standard_normal((b, s, KV_HEADS * HEAD), np.float32)
    v = rng.standard_normal((b, s, KV_HEADS * HEAD), np.float32)
    cos, sin = _caches()
    caches = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")]
    qkv = [helper.make_tensor_value_info("q", f, [b, s, HEADS * HEAD]),
           helper.make_tensor_value_info("k", f, [b, s, KV_HEADS * HEAD]),
           helper.make_tensor_value_info("v", f, [b, s, KV_HEADS * HEAD])]  # fmt: skip
    out = [helper.make_tensor_value_info("o", f, None)]
    ms = helper.make_opsetid("com.microsoft", 1)
    feed = {"q": q, "k": k, "v": v}

    lengths = [numpy_helper.from_array(np.full(b, s - 1, np.int32), "seqlens_k"),
               numpy_helper.from_array(np.array(s, np.int32), "total")]  # fmt: skip
    gqa = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total", "cos", "sin"],
        ["o", "present_k", "present_v"], domain="com.microsoft",
        num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1,
    )  # fmt: skip
    g1 = helper.make_graph([gqa], "gqa", qkv, out, caches + lengths)
    m1 = helper.make_model(g1, opset_imports=[helper.make_opsetid("", 18), ms])

    start = [numpy_helper.from_array(np.array([0], np.int64), "start")]
    nodes = [
        helper.make_node("RotaryEmbedding", ["q", "start", "cos", "sin"], ["qr"],
                         domain="com.microsoft", num_heads=HEADS),
        helper.make_node("RotaryEmbedding", ["k", "start", "cos", "sin"], ["kr"],
                         domain="com.microsoft", num_heads=KV_HEADS),
        helper.make_node("Attention", ["qr", "kr", "v"], ["o"],
                         q_num_heads=HEADS, kv_num_heads=KV_HEADS, is_causal=1),
    ]  # fmt: skip
    g2 = helper.make_graph(nodes, "rope_attention23", qkv, out, caches + start)
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 23), ms])
    m2.ir_version = 11

    q4 = q.reshape(b, s, HEADS, HEAD).transpose(0, 2, 1, 3).copy()
    rep = HEADS // KV_HEADS
    k4 = np.repeat(k.reshape(b, s, KV_HEADS, HEAD).transpose(0, 2, 1, 3), rep, axis=1)
    v4 = np.repeat(v.reshape(b, s, KV_HEADS, HEAD).transpose(0, 2, 1, 3), rep, axis=1).copy()
    mask = np.triu(np.full((s, s), -1e9, np.float32), 1)[None, None]
    dec = [helper.make_node("MatMul", ["q4", "kt"], ["scores"]),
           helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
           helper.make_node("Add", ["scaled", "mask"], ["masked"]),
           helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
           helper.make_node("MatMul", ["p", "v4"], ["o"])]  # fmt: skip
    ins3 = [helper.make_tensor_value_info("q4", f, [b, HEADS, s, HEAD]),
            helper.make_tensor_value_info("kt", f, [b, HEADS, HEAD, s]),
            helper.make_tensor_value_info("v4", f, [b, HEADS, s, HEAD])]  # fmt: skip
    consts = [numpy_helper.from_array(np.array(HEAD**-0.5, np.float32), "scale"),
              numpy_helper.from_array(mask, "mask")]  # fmt: skip
    g3 = helper.make_graph(dec, "decomposed", ins3, out, consts)
    m3 = helper.make_model(g3, opset_imports=[helper.make_opsetid("", 18)])
    feed3 = {"q4": q4, "kt": k4.transpose(0, 1, 3, 2).copy(), "v4": v4}
    return {
        "GroupQueryAttention (rotary inside)": (m1, feed),
        "RotaryEmbedding x2 + ONNX Attention-23": (m2, feed),
        "MatMul + Softmax + MatMul (no rotary)": (m3, feed3),
    }


def measure(b: int, s: int, threads: int, repeats: int, runs: int) -> dict:
    forms = build(b, s)
    sessions = {name: (_session(m, threads), feed) for name, (m, feed) in forms.items()}
    names = list(sessions)
    gqa, onnx_attn = names[0], names[1]
    a = sessions[gqa][0].run(["o"], sessions[gqa][1])[0]
    c = sessions[onnx_attn][0].run(["o"], sessions[onnx_attn][1])[0]
    diff = float(np.abs(a - c).max())
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            sess, feed = sessions[n]
            for _ in range(2):
                sess.run(None, feed)
            t0 = time.perf_counter()
            for _ in range(runs):
                sess.run(None, feed)
            ms[n].append((time.perf_counter() - t0) / runs * 1e3)
    flops = 4.0 * b * HEADS * s * s * HEAD
    rows = []
    for n, v in ms.items():
        med = float(np.median(v))
        rows.append({"form": n, "ms": med, "runs_ms": v, "gflops": flops / (med * 1e-3) / 1e9})
    return {"batch": b, "seq": s, "max_abs_diff_gqa_vs_attention23": diff, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=44, help="tokens (SmolLM2 echo STS-B: ~30-90)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    cpu = f"{cpu_model() or platform.processor()} ({cpu_id() or 'unknown'})"
    print(f"CPU: {cpu}; onnxruntime {ort.__version__}; {args.threads} threads")
    results = [measure(b, args.seq, args.threads, args.repeats, args.runs)
               for b in sorted({args.batch, 1})]  # fmt: skip
    for res in results:
        base = res["rows"][0]["ms"]
        diff = res["max_abs_diff_gqa_vs_attention23"]
        print(f"\nbatch {res['batch']} x {res['seq']} tokens, one layer "
              f"(GQA vs Attention-23 max abs diff {diff:.1e})")  # fmt: skip
        print("| form | ms (median) | GFLOP/s | vs GroupQueryAttention |\n|---|---|---|---|")
        for row in res["rows"]:
            print(f"| {row['form']} | {row['ms']:.2f} | {row['gflops']:.1f} | "
                  f"{base / row['ms']:.2f}x |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"cpu": cpu, "onnxruntime": ort.__version__, "threads": args.threads,
                       "results": results}, fh, indent=1)  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
