"""Complete critical ε of sigmoid and tanh MLPs (6x200, MNIST), the networks the dense-ReLU verifier refused.

Trains each network with the zoo (``jaxrobust train --arch mlp:200,200,200,200,200,200 --activation ACT
--epochs 10 --lr 0.003``, seed 0) into the cache unless it is there, then runs the complete oracle's bisection to
``--tol`` on MNIST test images 0..N-1 and prints the test accuracy, the fraction of images whose critical ε
is bracketed within the tolerance (``exact``), the statuses and the time per image. ``--radii`` prints instead
what bounds the gap: the median radius CROWN proves (bisection of the ``crown`` oracle), the median radius of the
closest counterexample of PGD (200 steps, 10 restarts, margin loss, bisected) and of the minimum-norm attack, and
their ratio (the factor by which proofs must exceed CROWN's for a gap of 0).

    python benchmarks/bench_smooth.py [--images 50] [--timeout 60] [--tol 0.002] [--radii]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import SHARED

from jaxrobust.cli import main as cli
from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.oracles import make_oracle
from jaxrobust.training import accuracy
from jaxrobust.weights import load_network

CACHE = Path(os.environ.get("JAXROBUST_CACHE", Path.home() / ".cache" / "jaxrobust")) / "smooth"


def network(act: str, data: str):
    path = CACHE / f"mnist-{act}-6x200.msgpack"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        cli(["train", "--arch", "mlp:" + ",".join(["200"] * 6), "--activation", act, "--dataset", data,
             "--epochs", "10", "--lr", "0.003", "--out", str(path)])
    return load_network(str(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", default="sigmoid,tanh")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--tol", type=float, default=0.002)
    ap.add_argument("--eps-max", type=float, default=0.2)
    ap.add_argument("--radii", action="store_true", help="CROWN, PGD and minimum-norm radii instead")
    args = ap.parse_args()
    data = f"mnist:{SHARED / 'data' / 'mnist.npz'}"
    ds = load_dataset(data, "test")
    print(f"load average {os.getloadavg()[0]:.1f}; timeout {args.timeout:.0f} s per verification query")
    for act in args.activations.split(","):
        net = network(act, data)
        acc = accuracy(net, ds.x, ds.y)
        x = to_network_input(ds.x[:args.images], net.input_shape)
        y = ds.y[:args.images]
        if args.radii:
            radii(net, x, y, SearchConfig(eps_max=args.eps_max, tol=args.tol / 4))
            continue
        oracle = make_oracle(net, "complete", timeout=args.timeout)
        t0 = time.perf_counter()
        r = search(net, oracle, x, y, SearchConfig(eps_max=args.eps_max, tol=args.tol))
        wall = time.perf_counter() - t0
        ok = r.status != "misclassified"
        exact = np.mean(r.status[ok] == "exact")
        stats = {str(s): int(np.sum(r.status == s)) for s in np.unique(r.status)}
        gap = (r.eps_upper - r.eps_lower)[ok]
        print(f"{net.name}: test accuracy {acc:.4f}; {ok.sum()} correctly classified of {len(y)}: gap <= {args.tol}"
              f" for {exact:.0%} ({stats}); median gap {np.nanmedian(gap):.4f}; median critical ε"
              f" {np.nanmedian(r.eps_lower[ok]):.4f}; {wall / len(y):.1f} s per image (wall {wall:.0f} s)")


def radii(net, x, y, cfg):
    """Medians of the CROWN-proved radius, PGD's and the minimum-norm attack's counterexample radii."""
    crown = search(net, make_oracle(net, "crown", attack_steps=200, restarts=10, targets=0, guided=False), x, y, cfg)
    attack = search(net, make_oracle(net, "attack", min_norm_steps=200, guided=False), x, y, cfg)
    ok = crown.status != "misclassified"
    lo, pgd, mn = crown.eps_lower[ok], crown.eps_upper[ok], attack.eps_upper[ok]
    print(f"{net.name}, {ok.sum()} images: median radius CROWN proves {np.median(lo):.4f}; closest counterexample "
          f"PGD {np.nanmedian(pgd):.4f}, minimum-norm {np.nanmedian(mn):.4f}; median best / CROWN "
          f"{np.nanmedian(np.fmin(pgd, mn) / lo):.2f}")


if __name__ == "__main__":
    main()
