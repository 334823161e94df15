"""Branch and bound resumed across bisection steps against a fresh search, counted in subdomains.

After a query at ε₁ stops undecided, the critical-ε bisection queries a smaller ε₂. The query at ε₂ either starts
from its root box (fresh) or from the subdomains ε₁ left pending (`VerifyConfig(resume=True)`, `subdomains`).
For each pair, ε₁ stops after ``--budget`` subdomains; both variants at ε₂ then run to a verdict (or
``--cap`` subdomains). MILP refinement is off so that the counts do not depend on time. Prints, per pair, the
subdomains each variant bounded at ε₂ and its wall time.

The pairs are steps of the complete critical-ε bisection on mnist-net_256x4 (MNIST test images 0, 1, 2, 4, 6):
the query that timed out and the next one below it.

    python benchmarks/bench_resume.py [--budget 8000] [--cap 30000]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import SHARED

from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.onnx_import import load_onnx
from jaxrobust.subdomains import PendingStore
from jaxrobust.verify import VerifyConfig, verify

PAIRS = ((0, 0.0377, 0.0339), (1, 0.0452, 0.0442), (2, 0.0227, 0.0207), (1, 0.0515, 0.0432), (4, 0.0344, 0.0313),
         (6, 0.0342, 0.0297))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mnist-net_256x4")
    ap.add_argument("--budget", type=int, default=8000, help="subdomains of the first query")
    ap.add_argument("--cap", type=int, default=30000, help="subdomains of the second query")
    args = ap.parse_args()
    net = load_onnx(SHARED / "networks" / "mnist" / "vnncomp2021_mnistfc" / f"{args.net}.onnx")
    ds = load_dataset(f"mnist:{SHARED / 'data' / 'mnist.npz'}", "test")
    x = np.asarray(to_network_input(ds.x[:10], net.input_shape), np.float32)
    y = np.asarray(ds.y[:10])
    cfg = VerifyConfig(timeout=600.0, refine=0.0, max_domains=args.cap)
    verify(net, x[:1], y[:1], 0.04, cfg._replace(max_domains=1000))          # compile every batch shape
    print(f"{args.net}, first query stopped after {args.budget} subdomains, second capped at {args.cap}; "
          f"load {os.getloadavg()[0]:.1f}")
    ratios = []
    for i, e1, e2 in PAIRS:
        store = PendingStore()
        first = verify(net, x[i:i + 1], y[i:i + 1], e1, cfg._replace(max_domains=args.budget), pending=store)
        pool = sum(len(p.pool["t"]) for p in store._items.values())
        out = {}
        for name, pending in (("fresh", None), ("resumed", store)):
            t0 = time.perf_counter()
            r = verify(net, x[i:i + 1], y[i:i + 1], e2, cfg, pending=pending)
            out[name] = (r.stage[0], int(r.domains[0]), time.perf_counter() - t0)
        ratios.append(out["resumed"][1] / out["fresh"][1])
        print(f"image {i}: {e1:.4f} ({first.stage[0]}, {pool} pending) -> {e2:.4f}: "
              + "; ".join(f"{k} {s} {d} subdomains {t:.1f} s" for k, (s, d, t) in out.items()), flush=True)
    print(f"resumed / fresh subdomains: median {np.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
