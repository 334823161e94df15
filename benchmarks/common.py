"""Helpers shared by the benchmark scripts: timing, the matmul peak, the shared-folder default, torch peers."""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def median_time(fn, runs: int) -> float:
    """Median wall seconds of ``fn()`` (results blocked on) over ``runs`` calls after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def paired_times(fa, fb, rounds: int = 5, min_time: float = 0.2) -> tuple[float, float, float]:
    """Seconds per call of ``fa`` and of ``fb`` (each blocks on its results), timed in alternating groups
    of calls so that both see the same load on a shared machine: the medians over ``rounds`` and the
    median of the per-round ratios ``t_b / t_a``."""
    reps = []
    for f in (fa, fb):
        f()
        t = time.perf_counter()
        f()
        reps.append(max(1, int(min_time / max(time.perf_counter() - t, 1e-6))))
    ta, tb = [], []
    for _ in range(rounds):
        for f, n, out in ((fa, reps[0], ta), (fb, reps[1], tb)):
            t = time.perf_counter()
            for _ in range(n):
                f()
            out.append((time.perf_counter() - t) / n)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(np.array(tb) / np.array(ta)))


def matmul_peak(runs: int = 10) -> float:
    """FLOP/s of a float32 2048x2048 JAX matmul, median of ``runs``: the peak the kernels are compared with."""
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2 * 2048 ** 3 / median_time(lambda: mm(a), runs)


def torch_mlp(path):
    """An ONNX Gemm/Relu MLP as a torch ``Sequential`` (same weights) and its forward FLOPs per example."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layers, flops = [torch.nn.Flatten()], 0
    for node in model.graph.node:
        if node.op_type == "Gemm":
            w, b = init[node.input[1]], init[node.input[2]]
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data, lin.bias.data = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
            layers.append(lin)
            flops += 2 * w.size
        elif node.op_type == "Relu":
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval(), flops
