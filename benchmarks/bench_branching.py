"""Branching rules side by side: filtered smart branching (FSB) against the BaBSR-like scores alone.

On the JAIR queries at the published certified radii of ``--network`` (MNIST test images 0..N-1, those the
network classifies correctly), where branch and bound has to prove robustness, runs `verify` with
``VerifyConfig(fsb=K)`` and ``fsb=0``, alternating ``--runs`` times in one process (the first run of each
includes compilation). Prints per run: decided queries, subdomains bounded (deterministic), wall time.

    python benchmarks/bench_branching.py [--network mnist-net_256x2] [--images 100] [--timeout 60] [--fsb 4]
"""
from __future__ import annotations

import argparse
import time

from bench_verify import queries

from jaxrobust.verdict import ROBUST, UNKNOWN
from jaxrobust.verify import VerifyConfig, verify


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="mnist-net_256x2")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--fsb", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    net, x, y, eps, expect, _, _ = queries(args.network, args.images)
    k = expect == ROBUST
    x, y, eps = x[k], y[k], eps[k]
    print(f"{args.network}: {len(x)} queries at certified radii, {args.timeout:.0f} s each")
    print(f"{'run':>3} {'rule':10} {'decided':>8} {'subdomains':>11} {'wall s':>8}")
    for run in range(args.runs):
        for fsb in (args.fsb, 0):
            t0 = time.perf_counter()
            r = verify(net, x, y, eps, VerifyConfig(timeout=args.timeout, fsb=fsb, refine=0.0))
            rule = f"FSB k={fsb}" if fsb else "scores"
            print(f"{run:3d} {rule:10} {int((r.status != UNKNOWN).sum()):8d} {int(r.domains.sum()):11d} "
                  f"{time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    main()
