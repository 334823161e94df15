"""Global robustness (Fijalkow & Gupta) of the small MNIST CNN on the per-class GANs: how many latents stay UNKNOWN.

For each class ``c`` and latent L∞ radius ``eps``, `generative.global_robustness` classifies the ε-box around
``--samples`` latents of ``G_c`` as ROBUST / VIOLATED / UNKNOWN twice: with ``bounds="crown"`` (latent PGD, then
forward-mode linear bounds of ``C ∘ G_c``) and with ``bounds="complete"`` (the same, then input-splitting branch
and bound, ``--timeout`` seconds per latent left undecided). Printed per class and overall: the three fractions,
the reasons (`Robustness.reason`: ``attack``, ``crown``, ``complete``, or the branch-and-bound stage that gave up;
empty: undecided), wall seconds per latent and, for ``complete``, seconds of branch and bound per latent that
CROWN left undecided. The project's target: unknown ≤ 10 % at eps = 0.01. Compilation is done by a warm-up call
first; the 1-minute load average is printed with every row (the machine may be shared).

Needs the per-class GANs of ``benchmarks/train_gans.py``; the small CNN is trained once and cached
(``bench_generative.small_cnn``). ``--json`` also saves the indices of the UNKNOWN latents (latent ``i`` of class
``c`` is ``generative.latents(fold_in(PRNGKey(seed), c), [i], 10)``) for closer study.

    python benchmarks/bench_global.py --classes 0 1 2 --samples 50
    python benchmarks/bench_global.py --eps 0.01 --samples 100 --timeout 10 --json global.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from bench_generative import small_cnn
from common import SHARED

from jaxrobust import generative as G
from jaxrobust.data import default_cache_dir
from jaxrobust.gan import load_generators

METHODS = ("crown", "complete")


def run(clf, gen, c: int, eps: float, bounds: str, args) -> dict:
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed), c)
    t0 = time.perf_counter()
    r = G.global_robustness(clf, gen, c, eps, samples=args.samples, key=key, bounds=bounds,
                            complete_timeout=args.timeout)
    wall = time.perf_counter() - t0
    return {"class": c, "eps": eps, "bounds": bounds, "samples": r.samples, "counts": r.counts.tolist(),
            "wall_s": wall, "reasons": dict(Counter(str(s) or "-" for s in r.reason)),
            "unknown_index": np.flatnonzero(r.status == G.UNKNOWN).tolist(), "load_avg": os.getloadavg()[0]}


def row(name: str, rows: list, crown_rows: list | None = None) -> str:
    n = sum(r["samples"] for r in rows)
    rob, vio, unk = (sum(r["counts"][k] for r in rows) / n for k in range(3))
    wall = sum(r["wall_s"] for r in rows)
    reasons = Counter()
    for r in rows:
        reasons.update(r["reasons"])
    bab = ""
    if crown_rows is not None:   # branch-and-bound seconds per latent that CROWN left undecided
        todo = sum(r["counts"][2] for r in crown_rows)
        extra = wall - sum(r["wall_s"] for r in crown_rows)
        bab = f"{extra / todo:7.2f}" if todo else "      -"
    why = " ".join(f"{k}:{v}" for k, v in sorted(reasons.items()))
    return (f"{name:>7} {n:5d} {rob:7.1%} {vio:7.1%} {unk:7.1%} {wall / n:8.3f} {bab:>7} "
            f"{rows[-1]['load_avg']:5.2f}  {why}")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gans", type=Path, default=default_cache_dir() / "gans" / "mnist-perclass.msgpack")
    p.add_argument("--classifier", type=Path, default=default_cache_dir() / "classifiers" / "mnist-cnn-small.msgpack")
    p.add_argument("--data", default=f"mnist:{SHARED / 'data' / 'mnist.npz'}")
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--samples", type=int, default=100, help="latents per class")
    p.add_argument("--eps", type=float, nargs="+", default=[0.01], help="latent L∞ radii")
    p.add_argument("--timeout", type=float, default=10.0, help="branch-and-bound seconds per undecided latent")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every row (with UNKNOWN indices) here")
    args = p.parse_args(argv)

    gens = load_generators(args.gans)
    clf = small_cnn(args.classifier, args.data)
    t0 = time.perf_counter()   # warm-up: compile the attack, the bounds and the branch-and-bound shapes
    for bounds in args.methods:
        G.global_robustness(clf, gens[args.classes[0]], args.classes[0], args.eps[0], samples=args.samples,
                            bounds=bounds, complete_timeout=min(args.timeout, 2.0), key=jax.random.PRNGKey(99))
    print(f"warm-up {time.perf_counter() - t0:.1f} s; devices {jax.devices()}; load average {os.getloadavg()}",
          flush=True)
    header = (f"{'class':>7} {'n':>5} {'robust':>7} {'violat':>7} {'unknown':>7} {'s/latent':>8} {'bab s/u':>7} "
              f"{'load':>5}  reasons")
    results = []
    for eps in args.eps:
        by_method = {m: [] for m in args.methods}
        for bounds in args.methods:
            print(f"\neps {eps}, bounds {bounds}" + (f", timeout {args.timeout} s" if bounds == "complete" else ""))
            print(header, flush=True)
            crown = by_method["crown"] if bounds == "complete" and "crown" in args.methods else None
            for i, c in enumerate(args.classes):
                r = run(clf, gens[c], c, eps, bounds, args)
                by_method[bounds].append(r)
                print(row(str(c), [r], None if crown is None else [crown[i]]), flush=True)
            print(row("all", by_method[bounds], crown), flush=True)
            results += by_method[bounds]
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}))
    return results


if __name__ == "__main__":
    main()
