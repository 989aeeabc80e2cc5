"""INT8 kernels of an AVX2-only CPU, emulated: does the artifact's integer math change there?

ONNX Runtime's MLAS picks its integer GEMM kernels from CPUID. Without VNNI its u8 x s8 kernel
(``vpmaddubsw``) saturates int16 pair sums; 7-bit weights and u8 x u8 kernels do not. QEMU user
mode with an AVX2 CPU model runs the same Python and the same ONNX Runtime with those kernels
(accuracy only: emulated time says nothing about a real CPU's speed). Run each step natively and
under the emulator, then compare::

    qemu=(qemu-x86_64 -cpu Haswell-v4)          # Debian: apt-get install qemu-user (7.2)
    python benchmarks/avx2_emulated.py probe native  &&  "${qemu[@]}" .venv/bin/python \\
        benchmarks/avx2_emulated.py probe haswell
    python benchmarks/avx2_emulated.py embed native ART...  &&  "${qemu[@]}" .venv/bin/python \\
        benchmarks/avx2_emulated.py embed haswell ART...
    python benchmarks/avx2_emulated.py compare ART...

``probe``: one ``MatMulInteger`` [32, 576] x [576, 1536] per weight kind (8-bit, 7-bit, uint8),
checked against the exact int32 product and against a numpy model of saturating pair sums.
``embed``: each artifact's embeddings of the first 8 STS-B test sentences (one batch).
Files go to ``runs/avx2-emulated/``. Results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path("runs/avx2-emulated")
STS = Path("../shared/data/stsb/test.tsv")
M, K, N = 32, 576, 1536


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "s8 8-bit": rng.integers(-127, 128, size=(K, N)).astype(np.int8),
        "s8 7-bit": rng.integers(-64, 65, size=(K, N)).astype(np.int8),
        "u8": rng.integers(0, 256, size=(K, N)).astype(np.uint8),
    }


def _activations() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(M, K), dtype=np.uint8)


def probe(tag: str) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a = _activations()
    out = {}
    for name, w in _weights().items():
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])],
            [numpy_helper.from_array(w, "B")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[name] = s.run(None, {"A": a})[0]
    np.savez(OUT / f"probe-{tag}.npz", **out)


def _saturating(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 x s8 as vpmaddubsw computes it: adjacent k-pairs summed and clipped to int16."""
    prod = a.astype(np.int32)[:, :, None] * w.astype(np.int32)[None, :, :]  # [M, K, N]
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1)


def embed(tag: str, artifacts: list[str]) -> None:
    from echoembed.runtime import Embedder
    from echoembed.validation.sts import read_sts

    texts = read_sts(STS).unique_sentences()[:8]
    for art in artifacts:
        emb = Embedder.load(art, threads=2).encode(texts)
        np.save(OUT / f"emb-{Path(art).name}-{tag}.npy", emb)


def compare(artifacts: list[str]) -> None:
    a, ws = _activations(), _weights()
    nat, emu = np.load(OUT / "probe-native.npz"), np.load(OUT / "probe-haswell.npz")
    print("| weights | native exact | emulated exact | emulated = saturating model |")
    print("|---|---|---|---|")
    for name, w in ws.items():
        exact = a.astype(np.int64) @ w.astype(np.int64)
        sat = exact if name == "u8" else _saturating(a, w)
        print(f"| {name} | {(nat[name] == exact).all()} | {(emu[name] == exact).all()} | "
              f"{(emu[name] == sat).all()} |")  # fmt: skip

    def cos(x, y):
        return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)

    print("\n| artifact | min cos native vs emulated | mean | max abs diff |")
    print("|---|---|---|---|")
    for art in artifacts:
        n = np.load(OUT / f"emb-{Path(art).name}-native.npy")
        h = np.load(OUT / f"emb-{Path(art).name}-haswell.npy")
        c = cos(n, h)
        print(f"| {Path(art).name} | {c.min():.5f} | {c.mean():.5f} | {np.abs(n - h).max():.1e} |")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    step, rest = sys.argv[1], sys.argv[2:]
    if step == "probe":
        probe(rest[0])
    elif step == "embed":
        embed(rest[0], rest[1:])
    elif step == "compare":
        compare(rest)
    else:
        raise SystemExit(f"unknown step {step!r}: probe | embed | compare")
