"""Rare confident misclassifications on a real network: AMLS against RoMA's fitted tail and plain Monte Carlo.

Event: RoMA's ``c > δ`` (``c`` the highest softmax probability among the wrong labels) under RoMA's uniform
L∞ perturbation clipped to [0, 1]. Steps:

1. throughput of plain Monte Carlo here (samples/s on a short run) and the time 10^8 samples take;
2. a pilot AMLS run (its own seed) over the first ``--images`` MNIST test images picks up to ``--inputs``
   correctly classified ones whose estimate lies in [10^-6, 10^-3], nearest to 10^-5 first;
3. on those: Monte Carlo with ``--mc-samples`` samples (batched, its 95 % Clopper–Pearson interval); RoMA
   (`roma.roma`) at each ``--roma-samples``: its reported ``log10_tail`` (the bound 1/n where the fitted tail lies
   below it) and the fitted Box-Cox normal tail itself; AMLS in each ``--amls`` configuration, ``--reps`` runs per
   input (seeds), the first one reported with its interval, all of them summarised (mean, sd, how many inside
   the Monte Carlo interval). Per input and estimator: estimate, interval, forward passes, wall time.

Target: AMLS inside the 95 % interval of 10^8-sample Monte Carlo at p ≈ 1e-5 with at most 1/100 of its
forward passes. ``--json`` writes the table for the notebook.

``--mc-known IMAGE:HITS,...`` skips steps 1, 2 and the Monte Carlo run of step 3 and takes its hit counts (of
``--mc-samples`` samples, from an earlier run with the same network, eps and delta) and its inputs, to sweep
AMLS configurations quickly: ``--mc-known 66:1111,121:1693,73:1402,14:2372`` are the README's 10^8-sample counts;
``--roma-samples ''`` skips RoMA; ``--seed`` then changes only the AMLS seeds. ``--ids`` names the images instead of
the pilot; ``--mc-rng threefry`` draws Monte Carlo's samples with threefry instead of the hash generator AMLS uses
(an independent reference, ~7x slower: 10^8 samples of one input take ~15 min here).

The summary gives each configuration's bias against Monte Carlo in units of its standard error, and the share of
runs an unbiased estimator with that sd would put inside the Monte Carlo interval (MC's interval has an error of
its own, so even a perfect estimator with sd comparable to it lands outside in some runs).

    python benchmarks/bench_amls.py [--net PATH] [--eps 0.2] [--delta 0.5] [--mc-samples 100000000] [--reps 8]

    python benchmarks/bench_amls.py --mc-known 66:1111,121:1693,73:1402,14:2372 --roma-samples '' \
        --amls '40000,0.2,3;35000,0.3,3' --reps 8 --seed 1

    python benchmarks/bench_amls.py --ids 66 --mc-rng threefry --seed 5 --roma-samples '' --amls '40000,0.2,3'
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import numpy as np
from common import SHARED
from scipy import stats

from jaxrobust.kernels.amls import AmlsConfig, latent_size
from jaxrobust.kernels.stats import clopper_pearson, roma_statistics
from jaxrobust.onnx_import import load_onnx
from jaxrobust.rare_events import GROUP_FLOATS, MonteCarloResult, amls_estimate, monte_carlo
from jaxrobust.roma import RomaConfig, confidences, roma

NET = str(SHARED / "networks/mnist/eran_ffnn/mnist_relu_3_50.onnx")
DATA = str(SHARED / "data/mnist.npz")


def timed(fn):
    """``(fn(), wall seconds)``; ``fn`` returns host arrays."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def select(net, x, y, args):
    """Positions of up to ``args.inputs`` correctly classified images whose pilot AMLS estimate lies in
    [10^-6, 10^-3], nearest to 10^-5 first; and the pilot estimates."""
    pilot = AmlsConfig(particles=500, rho=0.1, steps=20, max_levels=8)
    r = jax.device_get(amls_estimate(net, x, y, args.eps, args.delta, pilot, seed=args.seed + 1))
    right = np.asarray(net(x)).argmax(-1) == y
    ok = np.flatnonzero(right & (r.log10_p >= -6) & (r.log10_p <= -3) & ~r.capped)
    return ok[np.argsort(np.abs(r.log10_p[ok] + 5))][:args.inputs], r.log10_p


def amls_configs(text) -> list[AmlsConfig]:
    """``"N,rho,M;N,rho,M"`` -> AMLS configurations."""
    out = []
    for part in text.split(";"):
        n, rho, m = part.split(",")
        out.append(AmlsConfig(particles=int(n), rho=float(rho), steps=int(m)))
    return out


def known_counts(text) -> dict[int, int]:
    """``"66:1111,121:1693"`` -> ``{image: Monte Carlo hits}``."""
    out = {}
    for part in text.split(","):
        image, hits = part.split(":")
        out[int(image)] = int(hits)
    return out


def roma_rows(net, xs, ys, pos, args):
    """RoMA at each ``--roma-samples``: the reported ``log10_tail`` (1/n where the fit lies below it) and the
    fitted tail itself, per input."""
    out = []
    for n in args.roma_samples:
        cfg = RomaConfig(eps=args.eps, delta=args.delta, samples=n, seed=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            roma(net, xs, ys, cfg._replace(seed=args.seed + 7), indices=pos)  # compiles
            r, t = timed(lambda: roma(net, xs, ys, cfg, indices=pos))
        fit = np.asarray(roma_statistics(confidences(net, xs, ys, cfg, indices=pos), args.delta).log10_tail)
        out.append((n, r, fit, t / len(pos)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default=NET, help="ONNX MNIST classifier with logits, pixels in [0, 1]")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--images", type=int, default=128, help="test images the pilot run searches")
    ap.add_argument("--inputs", type=int, default=4, help="inputs compared")
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--mc-samples", type=int, default=10 ** 8)
    ap.add_argument("--chunk", type=int, default=4096, help="Monte Carlo samples per input per step")
    ap.add_argument("--mc-rng", choices=("hash", "threefry"), default="hash",
                    help="Monte Carlo's per-coordinate generator (AMLS keeps its own): threefry is independent of "
                         "the hash AMLS draws its latents from, and ~7x slower")
    ap.add_argument("--ids", type=lambda t: [int(v) for v in t.split(",")],
                    help="compare these test images (positions) instead of the pilot's choice")
    ap.add_argument("--mc-known", type=known_counts,
                    help="IMAGE:HITS,... Monte Carlo hit counts of --mc-samples samples from an earlier run (same net, "
                         "eps, delta): skips the throughput run, the pilot selection and Monte Carlo itself")
    ap.add_argument("--roma-samples", type=lambda t: [int(v) for v in t.split(",") if v.strip()],
                    default=[10_000, 100_000], help="RoMA sample sizes; '' skips RoMA")
    ap.add_argument("--amls", type=amls_configs, default=amls_configs("1000,0.1,100;20000,0.1,10;40000,0.2,3"),
                    help="AMLS configurations N,rho,M separated by ';' (default: the paper's; many particles with "
                         "few moves; more particles, fewer moves and a higher quantile, at most 8.8e5 passes here)")
    ap.add_argument("--reps", type=int, default=8, help="AMLS runs per input and configuration (seeds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    net = load_onnx(args.net)
    d = np.load(args.data)
    x = (d["x_test"][:args.images] / 255.0).astype(np.float32).reshape((args.images,) + tuple(net.input_shape))
    y = d["y_test"][:args.images].astype(np.int64)
    print(f"{os.path.basename(args.net)}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}; eps={args.eps} (uniform L∞, clipped to [0, 1]), delta={args.delta}")

    if args.mc_known:  # steps 1, 2 and Monte Carlo from an earlier run
        rate, t_mc = None, float("nan")
        pos = np.asarray(list(args.mc_known), np.int64)
        if pos.max() >= len(x):
            raise SystemExit(f"--mc-known image {pos.max()} is not among the first --images {len(x)}")
        hits = np.asarray(list(args.mc_known.values()), np.int64)
        low, high = clopper_pearson(hits, args.mc_samples)
        mc = MonteCarloResult(hits, hits / args.mc_samples, np.asarray(low, np.float64), np.asarray(high, np.float64))
        print(f"Monte Carlo: known hit counts of {args.mc_samples:.0e} samples (not recomputed): "
              + ", ".join(f"#{p} {c}" for p, c in zip(pos, hits)))
        xs, ys, k = x[pos], y[pos], len(pos)
    else:
        # 1. Monte Carlo throughput, as many inputs at once as in step 3
        b = len(args.ids) if args.ids else min(args.inputs, len(x))
        n0 = 50 * args.chunk
        monte_carlo(net, x[:b], y[:b], args.eps, args.delta, args.chunk, args.chunk, rng=args.mc_rng)  # compiles
        _, t = timed(lambda: monte_carlo(net, x[:b], y[:b], args.eps, args.delta, n0, args.chunk, rng=args.mc_rng))
        rate = b * n0 / t
        print(f"Monte Carlo: {rate:.3g} samples/s ({b} inputs x {n0} samples in {t:.1f} s): 10^8 samples of one "
              f"input take {1e8 / rate:.0f} s, of {b} inputs {b * 1e8 / rate / 60:.1f} min")

        # 2. pilot selection
        if args.ids:
            pos = np.asarray(args.ids, np.int64)
        else:
            (pos, pilot), t = timed(lambda: select(net, x, y, args))
            print(f"pilot AMLS over {len(x)} images ({t:.0f} s): {len(pos)} in [1e-6, 1e-3]: "
                  + ", ".join(f"#{p} ({pilot[p]:.1f})" for p in pos))
        if not len(pos):
            return
        xs, ys, k = x[pos], y[pos], len(pos)

        # 3. the estimators on the selected inputs
        mc, t_mc = timed(lambda: monte_carlo(net, xs, ys, args.eps, args.delta, args.mc_samples, args.chunk,
                                             seed=args.seed, indices=pos, rng=args.mc_rng))
    mc_lo, mc_hi = np.log10(np.maximum(mc.low, 1e-300)), np.log10(mc.high)
    rows = [{"image": int(p), "estimator": f"MC n={args.mc_samples:.0e}", "log10_p": float(np.log10(mc.p[i])),
             "low": float(mc_lo[i]), "high": float(mc_hi[i]), "forward": args.mc_samples, "seconds": t_mc / k,
             "note": f"{mc.count[i]} hits ({args.mc_rng})"} for i, p in enumerate(pos)]
    for n, r, fit, t in roma_rows(net, xs, ys, pos, args):
        rows += [{"image": int(p), "estimator": f"RoMA n={n:.0e}", "log10_p": float(r.log10_tail[i]),
                  "low": None, "high": None, "forward": n, "seconds": t,
                  "note": f"{r.status[i]}; fitted tail {fit[i]:.2f}" + ("; below 1/n: bound" if r.tail_bound[i] else "")}
                 for i, p in enumerate(pos)]
    ids = np.concatenate([pos + 100_000 * j for j in range(args.reps)])  # run j of input p has id p + 10^5 j
    xr, yr = np.concatenate([xs] * args.reps), np.concatenate([ys] * args.reps)
    summary = []
    for cfg in args.amls:
        run = lambda seed, n=len(ids): jax.device_get(amls_estimate(net, xr[:n], yr[:n], args.eps, args.delta, cfg,
                                                                    seed=seed, indices=ids[:n]))
        group = max(1, min(len(ids), GROUP_FLOATS // (cfg.particles * latent_size("linf", xs[0].size))))
        run(args.seed + 7, group)  # compiles: one group of inputs has the shape of every group
        am, t = timed(lambda: run(args.seed))
        lp = am.log10_p.reshape(args.reps, k)
        inside = (lp >= mc_lo) & (lp <= mc_hi)
        acc = np.asarray(am.acceptance, np.float64)
        summary.append((cfg, lp, inside, np.asarray(am.forward_passes), np.nanmean(acc, axis=1), np.nanmin(acc, axis=1),
                        np.asarray(am.levels), t / len(ids)))
        for i, p in enumerate(pos):
            rows.append({"image": int(p), "estimator": f"AMLS N={cfg.particles} rho={cfg.rho:g} M={cfg.steps}",
                         "log10_p": float(lp[0, i]), "low": float(am.log10_low[i]), "high": float(am.log10_high[i]),
                         "forward": int(am.forward_passes[i]), "seconds": t / len(ids),
                         "inside_mc": bool(inside[0, i]), "reps_inside": int(inside[:, i].sum()),
                         "reps_mean": float(lp[:, i].mean()), "reps_sd": float(lp[:, i].std(ddof=1)) if args.reps > 1
                         else float("nan"),
                         "note": f"{am.levels[i]} levels, acceptance {np.nanmean(am.acceptance[i]):.2f}"
                                 + ("; capped: upper bound" if am.capped[i] else "")})

    print(f"\nlog10 P(c > {args.delta:g}) per input; seconds per input (batches of {k}, AMLS {args.reps} runs per "
          f"input); AMLS runs 2.. give the mean and sd over {args.reps} seeds and how many lie inside the MC interval")
    print(f"{'image':>5}  {'estimator':<28}{'log10 p':>8}  {'95% interval':<17}{'forward':>9}{'MC/fwd':>7}{'s':>8}"
          f"  {'in MC':>5} {'seeds: mean, sd, inside':>24}  note")
    for p in pos:
        ref = next(r for r in rows if r["image"] == p)
        for r in (r for r in rows if r["image"] == p):
            ci = f"[{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
            reps = (f"{r['reps_mean']:.2f}, {r['reps_sd']:.3f}, {r['reps_inside']}/{args.reps}"
                    if "reps_mean" in r else "")
            inside = ("yes" if r["inside_mc"] else "no") if "inside_mc" in r else ""
            print(f"{p:>5}  {r['estimator']:<28}{r['log10_p']:>8.2f}  {ci:<17}{r['forward']:>9.2g}"
                  f"{ref['forward'] / r['forward']:>7.0f}{r['seconds']:>8.1f}  {inside:>5} {reps:>24}  {r['note']}")
    near = [r for r in rows if "inside_mc" in r
            and -5.5 <= next(q for q in rows if q["image"] == r["image"])["log10_p"] <= -4.5]
    for name in dict.fromkeys(r["estimator"] for r in near):
        mine = [r for r in near if r["estimator"] == name]
        met = sum(r["inside_mc"] and 100 * r["forward"] <= args.mc_samples for r in mine)
        print(f"target at MC p in [10^-5.5, 10^-4.5] ({name}): inside the MC interval with <= 1/100 of its forward "
              f"passes for {met} of {len(mine)} inputs; all seeds: {sum(r['reps_inside'] for r in mine)} of "
              f"{args.reps * len(mine)} inside")
    mc_log = np.log10(mc.p)
    mc_sd = (mc_hi - mc_lo) / (2 * 1.96)      # Monte Carlo's own standard error in log10
    print(f"\nAMLS over all {args.reps} seeds x {k} inputs: bias = mean log10 p - MC log10 p per input, and in units "
          "of its standard error (AMLS mean and MC together); sd per input; expected inside: the share of runs an "
          "unbiased estimator with this sd puts inside the MC interval, given MC's own error; forward passes and "
          "levels per run; acceptance: mean over levels of a run, min: lowest level")
    for cfg, lp, inside, fwd, acc, acc_min, levels, t in summary:
        sd = lp.std(0, ddof=1) if args.reps > 1 else np.full(k, np.nan)
        bias = lp.mean(0) - mc_log
        z = bias / np.sqrt(sd ** 2 / args.reps + mc_sd ** 2)
        expected = 2 * stats.norm.cdf(1.96 * mc_sd / np.sqrt(sd ** 2 + mc_sd ** 2)) - 1
        print(f"AMLS N={cfg.particles} rho={cfg.rho:g} M={cfg.steps}: inside {inside.sum()} of {inside.size} "
              f"(expected {expected.sum() * args.reps:.0f}); bias "
              + " ".join(f"{v:+.3f} ({w:+.1f})" for v, w in zip(bias, z)) + "; sd "
              + " ".join(f"{v:.3f}" for v in sd)
              + f"; passes median {np.median(fwd):.3g} max {fwd.max():.3g} (MC/max {args.mc_samples / fwd.max():.0f})"
              f"; levels {levels.min()}-{levels.max()}; acceptance {np.mean(acc):.2f} (min {np.min(acc_min):.2f})"
              f"; {t:.2f} s per run")
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"net": os.path.basename(args.net), "eps": args.eps, "delta": args.delta,
                       "mc_samples": args.mc_samples, "mc_rate": rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
