"""Complete critical ε with and without the warm start (CROWN proofs and the minimum-norm attack first).

Runs the complete oracle's bisection on test images 0..N-1 (MNIST, or ``--data``) of a VNN-COMP 2021 mnistfc
network (or any ONNX file) twice: cold (``min_norm_steps=0``: PGD bisection for counterexamples, proofs from 0)
and warm (the default). Prints per variant the share of images whose bracket closed to the tolerance, the median
seconds and oracle queries per image.

    python benchmarks/bench_warm.py [--net mnist-net_256x2] [--data mnist] [--images 20] [--timeout 30] \
        [--tol 0.001] [--variants cold,warm]

The JAIR CIFAR ResNets at the resolution of #17's target (gap <= 1/255) on the lossless CIFAR-10 test images:

    python benchmarks/bench_warm.py --net ../shared/networks/cifar10/jair_resnet4b/resnet_4b_fgsm.onnx \
        --data cifar10:../shared/data/cifar10/cifar10_test_first100_lossless.npz --tol 0.0039 --timeout 120 \
        --variants warm --images 10

``--per-image`` also prints each image's proved radius, counterexample radius and status.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import SHARED

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mnist-net_256x2", help="an mnistfc network's name or an .onnx path")
    ap.add_argument("--data", default="mnist", help="dataset spec of `data.load_dataset`, e.g. cifar10:PATH")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per verification query")
    ap.add_argument("--tol", type=float, default=0.001)
    ap.add_argument("--variants", default="cold,warm", help="comma-separated: cold, warm")
    ap.add_argument("--per-image", action="store_true")
    args = ap.parse_args()
    path = args.net if args.net.endswith(".onnx") else SHARED / "networks" / "mnist" / "vnncomp2021_mnistfc" / \
        f"{args.net}.onnx"
    net = load_onnx(path)
    ds = load_dataset(args.data, "test")
    x = np.asarray(to_network_input(ds.x[:args.images], net.input_shape), np.float32)
    y = np.asarray(ds.y[:args.images])
    cfg = SearchConfig(eps_max=0.5, tol=args.tol)
    print(f"{os.path.basename(str(path))}, {args.data.split(':')[0]} test 0..{args.images - 1}, tol {args.tol:g}, "
          f"{args.timeout:g} s per query, load {os.getloadavg()[0]:.1f}")
    for name, steps in (("cold", 0), ("warm", 60)):
        if name not in args.variants.split(","):
            continue
        oracle = make_oracle(net, "complete", timeout=args.timeout, min_norm_steps=steps)
        t0 = time.perf_counter()
        r = search(net, oracle, x, y, cfg, batch_size=32)
        wall = time.perf_counter() - t0
        ok = r.status != "misclassified"
        print(f"{name}: exact {np.sum(r.status[ok] == 'exact')}/{ok.sum()}, median {np.median(r.time_s[ok]):.1f} s "
              f"and {np.median(r.queries[ok]):.1f} queries per image, wall {wall / len(y):.1f} s per image",
              flush=True)
        if args.per_image:
            for i in range(len(y)):
                print(f"  image {i}: [{r.eps_lower[i]:.4f}, {r.eps_upper[i]:.4f}] {r.status[i]}, "
                      f"{r.time_s[i]:.0f} s, {r.queries[i]} queries")
        gap = (r.eps_upper / r.eps_lower)[ok & (r.eps_lower > 0)]
        if len(gap):
            print(f"  upper / lower: median {np.median(gap):.2f}")


if __name__ == "__main__":
    main()
