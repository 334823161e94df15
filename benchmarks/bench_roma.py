"""RoMA on MNIST: jaxrobust `roma()` against the straightforward per-image pipeline, same process.

For each network (``--net``; default mnist-net_256x2, 784-256-256-10, and the smaller ERAN
mnist_relu_3_50, 784-50-50-10):

(a) reference, per image: n uniform L∞ perturbations with numpy, one torch (CPU) forward of the batch
    of n through the same network (weights from the ONNX initializers), softmax, highest wrong-label
    confidence, then `scipy.stats.anderson`, `boxcox` + `anderson` (and `yeojohnson` when needed);
(b) jaxrobust `roma()` over all images (per-image share of the wall time; the first run, which
    compiles, is the warm-up);
(c) the device-side statistics alone (`kernels.stats.roma_statistics`) per image;
(d) sampling + forward (`roma.confidences`) in GFLOP/s of the network's forward pass, as % of the
    float32 2048² JAX matmul peak measured right after it; and its two stages alone, in the same steps
    of `roma.samples_per_step` samples: sampling (`map_samples` of a function that reads one
    coordinate) and the forward on one materialized step of samples, repeated;
(e) the bound on the ratio (a) / (b) that the forward pass alone implies: roma() evaluates the network
    on n samples per image, which takes at least n · forward FLOPs / peak, so the ratio cannot exceed
    (a) / (n · FLOPs / peak); printed next to the measured ratio.

Every time is the median of ``--runs`` runs. Prints one table per network and the ratios against the
targets.

    python benchmarks/bench_roma.py [--images 1000] [--samples 10000] [--ref-images 30] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats as st
from common import SHARED, matmul_peak, median_time, torch_mlp
from jax.tree_util import Partial

from jaxrobust.kernels import perturb
from jaxrobust.kernels.stats import roma_statistics
from jaxrobust.onnx_import import load_onnx
from jaxrobust.roma import (
    RomaConfig,
    confidences,
    roma,
    samples_per_step,
    wrong_label_confidence,
)

NETS = [str(SHARED / "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx"),
        str(SHARED / "networks/mnist/eran_ffnn/mnist_relu_3_50.onnx")]
DATA = str(SHARED / "data/mnist.npz")


def reference_image(model, x, label, eps, delta, n, rng):
    """Straightforward RoMA of one image ``x: (784,)``; returns (status 0..3, plr)."""
    import torch

    lo, hi = np.maximum(x - eps, 0), np.minimum(x + eps, 1)
    s = (lo + rng.random((n, x.size), dtype=np.float32) * (hi - lo)).astype(np.float32)
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(s)), dim=1).numpy().astype(np.float64)
    p[:, label] = -np.inf
    c = np.maximum(p.max(axis=1), np.finfo(np.float32).tiny)
    a0 = st.anderson(c, "norm")
    crit = a0.critical_values[2]
    if a0.statistic <= crit:
        return 0, st.norm.cdf(delta, c.mean(), c.std(ddof=1))
    y, lam = st.boxcox(c)
    if st.anderson(y, "norm").statistic <= crit:
        return 1, st.norm.cdf(st.boxcox(delta, lam), y.mean(), y.std(ddof=1))
    w, _ = st.yeojohnson(c)
    return (2 if st.anderson(w, "norm").statistic <= crit else 3), np.nan


def _first_coordinate(s):
    """``(B, c, *shape) -> (B, c)``: a function of the samples that costs next to nothing."""
    return s.reshape(s.shape[:2] + (-1,))[..., 0]


def bench_network(path, x, y, args):
    """Times (a)-(e) for the ONNX MLP at ``path`` on images ``x: (N, 784)``, labels ``y: (N,)``; prints a table."""
    net = load_onnx(path)
    model, flops = torch_mlp(path)
    n, images = args.samples, len(x)
    xn = x.reshape((images,) + tuple(net.input_shape))
    cfg = RomaConfig(eps=args.eps, delta=args.delta, samples=n)

    # (a) reference per image
    k = min(args.ref_images, images)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ref = median_time(lambda: [reference_image(model, x[i], y[i], args.eps, args.delta, n, rng)
                                     for i in range(k)], args.runs) / k
        ref_status = np.bincount([reference_image(model, x[i], y[i], args.eps, args.delta, n, rng)[0]
                                  for i in range(k)], minlength=4)

    # (b) jaxrobust roma() on all images
    last = {}

    def run_roma():
        last["result"] = roma(net, xn, y, cfg)
        return last["result"].plr

    t_roma = median_time(run_roma, args.runs) / images
    status = {s: int((last["result"].status == s).sum()) for s in np.unique(last["result"].status)}

    # (c) device-side statistics alone, on the confidences of the first batch of images
    b = min(images, 256)
    conf = confidences(net, xn[:b], y[:b], cfg)
    t_stats = median_time(lambda: roma_statistics(conf, args.delta), args.runs) / b

    # (d) sampling + forward, and each stage alone, in the steps confidences() takes
    fb = min(args.flop_batch, images)
    xb, yb = jnp.asarray(xn[:fb]), jnp.asarray(y[:fb])
    chunk = samples_per_step(cfg, fb, x.shape[1])
    steps = -(-n // chunk)
    gflop = fb * n * flops / 1e9
    t_conf = median_time(lambda: confidences(net, xb, yb, cfg), args.runs)
    key = jax.random.PRNGKey(cfg.seed)
    t_samp = median_time(lambda: perturb.map_samples(Partial(_first_coordinate), key, xb, args.eps, n, chunk,
                                                     domain=net.domain, reduce="max"), args.runs)
    s_step = perturb.sample(key, xb, args.eps, chunk, domain=net.domain)
    fwd = jax.jit(lambda net, s, y: wrong_label_confidence(net)(s, y))
    t_fwd = median_time(lambda: [fwd(net, s_step, yb) for _ in range(steps)], args.runs)

    # (e) the ratio's bound from the forward pass at the matmul peak, measured next to (d)
    peak = matmul_peak(max(5, args.runs)) / 1e9
    t_bound = n * flops / (peak * 1e9)
    ms = lambda t: f"{1e3 * t:10.2f}"
    pct = lambda t: f"{gflop / t:7.1f} GFLOP/s = {100 * gflop / t / peak:3.0f}% of peak"
    print(f"\n{os.path.basename(path)}: forward {flops / 1e3:.1f} kFLOP/sample, {n * flops / 1e9:.2f} GFLOP/image; "
          f"{fb} images x {chunk} samples per step; float32 2048² matmul peak (JAX, now) {peak:.1f} GFLOP/s")
    print(f"{'stage':<58}{'ms/image':>10}{'ratio':>8}{'bound':>8}")
    print(f"{'(a) reference: numpy sampling + torch forward + scipy':<58}{ms(t_ref)}{1.0:>8.1f}{'':>8}"
          f"   statuses {ref_status.tolist()} of {k}")
    print(f"{'(b) jaxrobust roma() (' + str(images) + ' images)':<58}{ms(t_roma)}{t_ref / t_roma:>8.1f}"
          f"{t_ref / t_bound:>8.1f}   {status}")
    print(f"{'(c) device-side statistics (roma_statistics)':<58}{ms(t_stats)}")
    print(f"{'(d) sampling + forward (confidences)':<58}{ms(t_conf / fb)}{'':>16}   {pct(t_conf)}")
    print(f"{'    sampling alone':<58}{ms(t_samp / fb)}{'':>16}   {t_samp / t_fwd:.2f}x the forward")
    print(f"{'    forward alone, on one materialized step of samples':<58}{ms(t_fwd / fb)}{'':>16}   {pct(t_fwd)}")
    print(f"{'(e) forward at the matmul peak (n · FLOPs / peak)':<58}{ms(t_bound)}{t_ref / t_bound:>8.1f}")
    print(f"targets: roma >= 20x reference -> {t_ref / t_roma:.1f}x (bound from the forward alone: "
          f"{t_ref / t_bound:.1f}x); statistics <= 5 ms/image -> {1e3 * t_stats:.2f}; "
          f"sampling + forward >= 70% of peak -> {100 * gflop / t_conf / peak:.0f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--ref-images", type=int, default=30, help="images timed for the reference (per-image cost)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--flop-batch", type=int, default=8, help="images per call in (d)")
    ap.add_argument("--net", nargs="+", default=NETS, help="ONNX Gemm/Relu MLPs taking MNIST pixels in [0, 1]")
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    d = np.load(args.data)
    x = (d["x_test"][:args.images].reshape(args.images, -1) / 255.0).astype(np.float32)
    y = d["y_test"][:args.images].astype(np.int64)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.images} images x {args.samples} samples, "
          f"eps={args.eps}, delta={args.delta}, runs={args.runs}")
    for path in args.net:
        bench_network(path, x, y, args)
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
