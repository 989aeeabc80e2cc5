"""The one GPU check to run where the `device` tool lends a GPU (issue 13, item 6).

    python benchmarks/gpu_check.py [--out DIR] [--iters 20] [--device cuda|cpu]

Model weights do not fit through the device tool's 64 MiB transfer, so this builds SmolLM2-135M's
*architecture* (its config, written below as read from the bundled GGUF) with seeded random
weights on the device, plus the echo mean-pooling head (``echoembed.echo``'s semantics: the mean
over the pooled span). It then reports, each step on its own so one failure does not hide the
rest:

1. the device: ``echoembed.runtime.tensorrt.gpu_device`` (cuda-bindings) beside torch's view;
2. PyTorch eager latency, fp32 and fp16, batch 1 and 32 at sequence 128 (CUDA events, median of
   ``--iters`` after warm-up), and the fp16-vs-fp32 cosine of the pooled embeddings;
3. what TensorRT / ONNX Runtime GPU paths exist there (their versions, or why not) and the
   engine-compatibility decision for a plan built on this GPU, on another compute capability,
   and as ``ampere+``;
4. a JSON report in ``--out`` (default ``$OUT`` when set, else ``runs/``).

``--device cpu`` runs the same script on a tiny model for a smoke test on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
TINY_CONFIG = {**SMOLLM2_CONFIG, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "vocab_size": 1024}  # fmt: skip


def _step(report: dict, name: str, fn) -> None:
    try:
        report[name] = fn()
    except Exception as e:  # report and go on: one failure must not hide the other numbers
        report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
    print(f"== {name}: {json.dumps(report[name], default=str)[:600]}", flush=True)


def _device_info(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "python": platform.python_version()}  # fmt: skip
    if device == "cuda":
        out["torch_device"] = torch.cuda.get_device_name(0)
        out["torch_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        try:
            from echoembed.runtime.tensorrt import gpu_device

            d = gpu_device(0)
            out["cuda_bindings"] = {"name": d.name, "compute_capability": d.compute_capability,
                                    "memory_gib": round(d.memory_bytes / 2**30, 1)}  # fmt: skip
        except Exception as e:
            out["cuda_bindings"] = f"{type(e).__name__}: {e}"
    return out


def _model(config: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    model = LlamaModel(cfg).eval().to(device)
    return model


def _batch(batch: int, seq: int, vocab: int, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    att = torch.ones_like(ids)
    pool = torch.zeros_like(ids)
    pool[:, seq // 2 :] = 1  # the second copy of the text, as in an echo prompt
    return ids.to(device), att.to(device), pool.to(device)


def _pooled(model, ids, att, pool):
    import torch

    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=att).last_hidden_state
        w = pool.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(emb.float(), dim=-1)


def _latency(model, inputs, iters: int, device: str) -> float:
    import torch

    for _ in range(3):
        _pooled(model, *inputs)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _pooled(model, *inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            _pooled(model, *inputs)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _torch_latency(config: dict, device: str, iters: int) -> dict:
    import torch

    model = _model(config, device)
    out: dict = {"seq": 128}
    for batch in (1, 32):
        inputs = _batch(batch, 128, config["vocab_size"], device)
        out[f"fp32_b{batch}_ms"] = round(_latency(model, inputs, iters, device), 3)
    ref = _pooled(model, *_batch(32, 128, config["vocab_size"], device))
    if device == "cuda":
        half = model.half()
        for batch in (1, 32):
            inputs = _batch(batch, 128, config["vocab_size"], device)
            out[f"fp16_b{batch}_ms"] = round(_latency(half, inputs, iters, device), 3)
        got = _pooled(half, *_batch(32, 128, config["vocab_size"], device))
        out["fp16_vs_fp32_min_cosine"] = round(float((got * ref).sum(-1).min()), 6)
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _gpu_paths(device_cc: str | None) -> dict:
    out: dict = {}
    for mod in ("tensorrt", "onnxruntime", "cuda.bindings"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            out[mod] = f"absent ({type(e).__name__}: {e})"
    try:
        import onnxruntime

        out["ort_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    if device_cc:
        from echoembed.artifact.engine import DEFAULT_PROFILE, EngineInfo, check_engine_compatible

        decisions = {}
        other = "7.5" if device_cc != "7.5" else "8.6"
        for label, cc, hw in (("built here", device_cc, "none"), ("built on " + other, other,
                              "none"), ("ampere+ from 8.0", "8.0", "ampere+")):  # fmt: skip
            info = EngineInfo("10.13.0", "build GPU", cc, (DEFAULT_PROFILE,), "fp16",
                              hardware_compatibility=hw)  # fmt: skip
            try:
                check_engine_compatible(info, "10.13.0", device_cc)
                decisions[label] = "runs"
            except Exception as e:
                decisions[label] = f"refused: {str(e)[:160]}"
        out["compatibility"] = decisions
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # echoembed from the checkout
    config = SMOLLM2_CONFIG if args.device == "cuda" else TINY_CONFIG
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device_arg": args.device,
                    "model": "SmolLM2-135M architecture, seeded random weights"
                    if args.device == "cuda" else "tiny Llama (smoke test)"}  # fmt: skip
    _step(report, "device", lambda: _device_info(args.device))
    _step(report, "torch_eager", lambda: _torch_latency(config, args.device, args.iters))
    cc = None
    dev = report.get("device", {})
    if isinstance(dev, dict) and isinstance(dev.get("cuda_bindings"), dict):
        cc = dev["cuda_bindings"]["compute_capability"]
    _step(report, "gpu_paths", lambda: _gpu_paths(cc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
