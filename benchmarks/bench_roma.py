"""RoMA on MNIST: jaxrobust `roma()` against the straightforward per-image pipeline, same process.

(a) reference, per image: n uniform L∞ perturbations with numpy, one torch (CPU) forward of the batch
    of n through the same network (weights from the ONNX initializers), softmax, highest wrong-label
    confidence, then `scipy.stats.anderson`, `boxcox` + `anderson` (and `yeojohnson` when needed);
(b) jaxrobust `roma()` over all images (per-image share of the wall time, compile excluded);
(c) the device-side statistics alone (`kernels.stats.roma_statistics`) per image;
(d) sampling + forward (`roma.confidences`) in GFLOP/s of the network's forward pass, as % of the
    float32 2048² JAX matmul peak measured in this run; also sampling alone (hash and threefry) and
    the forward alone on materialized samples.

Every time is the median of ``--runs`` runs. Prints a table and the ratios against the targets.

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

from jaxrobust.kernels import perturb
from jaxrobust.kernels.stats import roma_statistics
from jaxrobust.onnx_import import load_onnx
from jaxrobust.roma import RomaConfig, confidences, roma, wrong_label_confidence

from common import SHARED, matmul_peak, median_time, torch_mlp

NET = str(SHARED / "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx")
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--ref-images", type=int, default=30, help="images timed for the reference (per-image cost)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--flop-batch", type=int, default=8, help="images per call in (d)")
    ap.add_argument("--net", default=NET)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    net = load_onnx(args.net)
    d = np.load(args.data)
    x = (d["x_test"][:args.images].reshape(args.images, -1) / 255.0).astype(np.float32)
    y = d["y_test"][:args.images].astype(np.int64)
    xn = x.reshape((args.images,) + tuple(net.input_shape))
    cfg = RomaConfig(eps=args.eps, delta=args.delta, samples=args.samples)
    n = args.samples
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.images} images x {n} samples, "
          f"eps={args.eps}, delta={args.delta}, runs={args.runs}")

    peak = matmul_peak(max(5, args.runs)) / 1e9

    # (a) reference per image
    model, flops = torch_mlp(args.net)
    k = min(args.ref_images, args.images)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ref = median_time(lambda: [reference_image(model, x[i], y[i], args.eps, args.delta, n, rng)
                                     for i in range(k)], args.runs) / k
        ref_status = np.bincount([reference_image(model, x[i], y[i], args.eps, args.delta, n, rng)[0]
                                  for i in range(k)], minlength=4)

    # (b) jaxrobust roma() on all images (first call compiles every batch shape)
    res = roma(net, xn, y, cfg)
    t_roma = median_time(lambda: roma(net, xn, y, cfg).plr, args.runs) / args.images
    status = {s: int((res.status == s).sum()) for s in np.unique(res.status)}

    # (c) device-side statistics alone, on the confidences of the first batch of images
    b = min(args.images, 256)
    conf = confidences(net, xn[:b], y[:b], cfg)
    t_stats = median_time(lambda: roma_statistics(conf, args.delta), args.runs) / b

    # (d) sampling + forward throughput against the matmul peak
    fb = min(args.flop_batch, args.images)
    xb, yb = jnp.asarray(xn[:fb]), jnp.asarray(y[:fb])
    gflop = fb * n * flops / 1e9
    t_conf = median_time(lambda: confidences(net, xb, yb, cfg), args.runs)
    samp = {r: median_time(lambda r=r: perturb.sample(jax.random.PRNGKey(0), xb, args.eps, n, domain=net.domain,
                                                       rng=r), args.runs) for r in perturb.RNGS}
    s_mat = perturb.sample(jax.random.PRNGKey(0), xb, args.eps, n, domain=net.domain)
    fwd = jax.jit(wrong_label_confidence(net))
    t_fwd = median_time(lambda: fwd(s_mat, yb), args.runs)

    ms = lambda t: f"{1e3 * t:10.2f}"
    print(f"\nfloat32 2048² matmul peak (JAX, this run): {peak:.1f} GFLOP/s; forward {flops / 1e3:.1f} kFLOP/sample")
    print(f"\n{'stage':<58}{'ms/image':>10}{'ratio':>10}")
    print(f"{'(a) reference: numpy sampling + torch forward + scipy':<58}{ms(t_ref)}{1.0:>10.1f}"
          f"   statuses {ref_status.tolist()} of {k}")
    print(f"{'(b) jaxrobust roma() (' + str(args.images) + ' images)':<58}{ms(t_roma)}{t_ref / t_roma:>10.1f}"
          f"   {status}")
    print(f"{'(c) device-side statistics (roma_statistics)':<58}{ms(t_stats)}")
    print(f"{'(d) sampling + forward (confidences)':<58}{ms(t_conf / fb)}"
          f"   {gflop / t_conf:.1f} GFLOP/s = {100 * gflop / t_conf / peak:.0f}% of peak")
    print(f"{'    forward alone on materialized samples':<58}{ms(t_fwd / fb)}"
          f"   {gflop / t_fwd:.1f} GFLOP/s = {100 * gflop / t_fwd / peak:.0f}% of peak")
    for r, t in samp.items():
        print(f"{'    sampling alone, rng=' + r:<58}{ms(t / fb)}   {t / t_fwd:.2f}x the forward")
    print(f"\ntargets: roma >= 20x reference -> {t_ref / t_roma:.1f}x; statistics <= 5 ms/image -> "
          f"{1e3 * t_stats:.2f}; sampling + forward >= 70% of peak -> {100 * gflop / t_conf / peak:.0f}%")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
