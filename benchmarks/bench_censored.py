"""Censored inputs of the attack oracle against the complete verifier on mnist-net_256x2.

An input is censored when every attack failed up to ``eps_max``. Gradient attacks cannot see units that are
off: on this network 3-4 of 256 first-layer units are active at some images, and their counterexamples lie
across kinks no gradient points to. For test and train images 0..N-1 this runs the attack oracle three ways: the
minimum-norm attack alone, then the same on leaky ReLU gradients (`falsify.leaky_minimizer`) for the inputs it
leaves, the bound-guided attack (`falsify.guided_falsifier`) instead, and both in turn (the default); then
`verify` (branch and bound, 60 s) at
``eps_max`` on every input either leaves censored: a VIOLATED verdict there is a counterexample the attacks
missed. Prints seconds per image (median of --runs), the counts, and each configuration's upper bounds on the
inputs the minimum-norm attack alone leaves censored.

    python benchmarks/bench_censored.py [--images 100] [--runs 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle
from jaxrobust.verdict import VIOLATED
from jaxrobust.verify import VerifyConfig, verify

NET = "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eps-max", type=float, default=0.5)
    args = ap.parse_args()
    shared = Path(args.shared)
    net = load_onnx(shared / NET)
    d = np.load(shared / "data/mnist.npz")
    cfg = SearchConfig(eps_max=args.eps_max, tol=1e-3)
    print(f"{'split':6} {'attacks':38} {'s/image':>8} {'censored':>9} {'missed':>7}  inputs left censored")
    for split in ("test", "train"):
        x = (d[f"x_{split}"][:args.images].reshape(-1, 784, 1) / 255.0).astype(np.float32)
        y = d[f"y_{split}"][:args.images].astype(np.int64)
        hard = None    # the inputs the minimum-norm attack alone leaves censored
        for options in ({"leaky": False, "guided": False}, {"guided": False}, {"leaky": False}, {}):
            oracle = make_oracle(net, "attack", **options)
            search(net, oracle, x[:2], y[:2], cfg)   # compile
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                r = search(net, oracle, x, y, cfg)
                times.append((time.perf_counter() - t0) / len(x))
            left = np.flatnonzero(r.status == "censored")
            missed = []
            if len(left):
                v = verify(net, x[left], y[left], args.eps_max, VerifyConfig(timeout=60.0), key=jax.random.PRNGKey(0))
                missed = left[v.status == VIOLATED].tolist()
            hard = left if hard is None else hard
            print(f"{split:6} {'+'.join(oracle.attacks):38} {np.median(times):8.4f} {len(left):9d} {len(missed):7d}"
                  f"  {left.tolist()}; upper bounds of {hard.tolist()}: {np.round(r.eps_upper[hard], 4).tolist()}")


if __name__ == "__main__":
    main()
