"""RoMA statistics per image: `jaxrobust.kernels.stats.roma_statistics` (device side, vmapped over
images) against SciPy (anderson + boxcox + anderson, yeojohnson + anderson when needed, per image).

Confidences are the highest wrong-label softmax confidences of noisy logits (RoMA-like samples).
Prints milliseconds per image (median of several timed runs), the SciPy / jaxrobust ratio, and the
split of statuses, for float32 and (``--x64``) float64.

    python benchmarks/bench_stats.py [--images 1000] [--samples 10000] [--runs 5] [--scipy-images 50] [--x64]
"""
from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np
import scipy.stats as st
from common import median_time

from jaxrobust.kernels.stats import roma_statistics


def confidences(images: int, samples: int, seed: int = 0) -> np.ndarray:
    """(images, samples) highest wrong-label softmax confidences of noisy 10-class logits."""
    rng = np.random.default_rng(seed)
    out = np.empty((images, samples), np.float32)
    for i in range(images):
        z = rng.normal(0, rng.uniform(0.2, 1.5), (samples, 10)).astype(np.float32)
        z[:, 0] += rng.uniform(2, 6)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        out[i] = p[:, 1:].max(axis=1)
    return np.maximum(out, np.finfo(np.float32).tiny)


def scipy_roma(c: np.ndarray, delta: float):
    """Per-image reference pipeline; returns the status code (0..3)."""
    a0 = st.anderson(c, "norm")
    crit = a0.critical_values[2]
    if a0.statistic <= crit:
        return 0
    y, _ = st.boxcox(c)
    if st.anderson(y, "norm").statistic <= crit:
        st.norm.logsf(st.boxcox(delta, _), y.mean(), y.std(ddof=1))
        return 1
    w, _ = st.yeojohnson(c)
    return 2 if st.anderson(w, "norm").statistic <= crit else 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=200, help="images per device call")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scipy-images", type=int, default=50, help="images timed for SciPy (per-image cost)")
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--x64", action="store_true", help="also time float64")
    args = ap.parse_args()

    conf = confidences(args.images, args.samples)
    print(f"device: {jax.devices()[0].device_kind}; {args.images} images x {args.samples} samples")

    def run_jax(x):
        def go():
            for s in range(0, len(x), args.chunk):
                jax.block_until_ready(roma_statistics(x[s:s + args.chunk], args.delta))
        return go

    rows = []
    dtypes = [("float32", False)] + ([("float64", True)] if args.x64 else [])
    for name, x64 in dtypes:
        with jax.enable_x64(x64):
            x = jax.device_put(conf.astype(np.float64 if x64 else np.float32))
            t = time.perf_counter()
            res = roma_statistics(x[:args.chunk], args.delta)
            jax.block_until_ready(res)
            compile_s = time.perf_counter() - t
            t_jax = median_time(run_jax(x), args.runs) / args.images
            status = np.bincount(np.asarray(roma_statistics(x, args.delta).status), minlength=4)
        rows.append((name, t_jax, compile_s, status))

    sub = conf[:args.scipy_images].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sp = median_time(lambda: [scipy_roma(c, args.delta) for c in sub], max(1, args.runs // 2)) / len(sub)
        sp_status = np.bincount([scipy_roma(c, args.delta) for c in sub], minlength=4)

    print(f"\n{'implementation':<28}{'ms/image':>10}{'scipy/this':>12}   statuses (normal, box-cox, yeo-johnson, fail)")
    print(f"{'scipy (float64, per image)':<28}{1e3 * t_sp:>10.3f}{1.0:>12.1f}   {sp_status.tolist()} of {len(sub)}")
    for name, t_jax, compile_s, status in rows:
        label = f"jaxrobust {name}"
        print(f"{label:<28}{1e3 * t_jax:>10.3f}{t_sp / t_jax:>12.1f}   {status.tolist()}  (compile {compile_s:.1f} s)")
    print(f"\ntarget: <= 5 ms/image device-side; float32 at {1e3 * rows[0][1]:.2f} ms/image")


if __name__ == "__main__":
    main()
