"""Attack-only critical-ε search: jaxrobust's batched bisection vs VERONA's approach, plus JAIR soundness.

VERONA's approach (the robustness-distribution paper's package): for one image at a time, binary search
over a grid of ε values (here the paper's 0.002 … 0.4, 200 values), one PGD-40 attack per step
(torchattacks, batch 1) on the same weights. jaxrobust, all images at once on the same grid: the attack
oracle's minimum-norm attack (one batched pass, `kernels.minnorm`), and for comparison bisection with PGD-40
per query (margin loss, optionally followed by a multi-targeted attack on 9 wrong classes).

Prints seconds per image for each (median of --runs), the speed ratio, how often our upper bound is at
least as tight as VERONA's (against its last run, and against the best of its runs per image), and the
soundness check against the JAIR per-image results in ``../shared/reference/jair``: our ``eps_upper`` must
never lie below their certified ``epsilon_value`` (allowing one grid step).

    python benchmarks/bench_critical_eps.py [--images 100] [--runs 3]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from common import torch_mlp

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle

GRID = tuple(np.round(np.arange(1, 201) * 0.002, 6))
NET = "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx"
CONFIGS = {  # label -> make_oracle options of the attack oracle
    "minimum-norm, 60 steps": {},
    "minimum-norm alone": {"guided": False, "leaky": False},
    "minimum-norm + leaky, no bound-guided": {"guided": False},
    "PGD-40 bisection": {"min_norm_steps": 0, "targets": 0},
    "PGD-40 + 9 targets bisection": {"min_norm_steps": 0, "targets": 9},
}


def verona_search(model, x, y, grid, steps=40):
    """Per-image binary search over ``grid`` with torchattacks PGD at batch 1 (VERONA's loop).

    Returns the smallest grid ε where the attack succeeded (NaN if none)."""
    import torch
    import torchattacks
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        xi, yi = torch.from_numpy(x[i:i + 1]), torch.from_numpy(y[i:i + 1]).long()
        lo, hi = 0, len(grid) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            atk = torchattacks.PGD(model, eps=grid[mid], alpha=2.5 * grid[mid] / steps, steps=steps, random_start=True)
            adv = atk(xi, yi)
            with torch.no_grad():
                fooled = bool(model(adv).argmax(1) != yi)
            if fooled:
                out[i], hi = grid[mid], mid - 1
            else:
                lo = mid + 1
    return out


def tighter(ours, theirs) -> str:
    """``"a/b"``: of the ``b`` images where both found a counterexample, ours is at least as close on ``a``."""
    both = np.isfinite(ours) & np.isfinite(theirs)
    return f"{int(np.sum(ours[both] <= theirs[both] + 1e-9))}/{int(both.sum())}"


def jair_rows(shared: Path, network: str, split="test"):
    rows = {}
    with open(shared / "reference/jair/results_JAIR_fomlas.csv") as f:
        for r in csv.DictReader(f):
            if r["network_path"].strip() == network and r["split"] == split:
                rows[int(r["image_id"])] = (float(r["epsilon_value"]), float(r["smallest_sat_value"]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--verona-images", type=int, default=100, help="images run through the (slow) VERONA loop")
    ap.add_argument("--configs", type=int, nargs="+", default=list(range(len(CONFIGS))),
                    help=f"our configurations to run, by position in {list(CONFIGS)}")
    args = ap.parse_args()
    shared = Path(args.shared)
    import torch
    torch.set_num_threads(1)

    net = load_onnx(shared / NET)
    d = np.load(shared / "data/mnist.npz")
    x = (d["x_test"][:args.images].reshape(-1, 784, 1) / 255.0).astype(np.float32)
    y = d["y_test"][:args.images].astype(np.int64)
    cfg = SearchConfig(grid=GRID)
    ours = {}
    for label in [list(CONFIGS)[i] for i in args.configs]:
        oracle = make_oracle(net, "attack", **CONFIGS[label])
        search(net, oracle, x, y, cfg)  # compile
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            res = search(net, oracle, x, y, cfg)
            times.append((time.perf_counter() - t0) / len(x))
        ours[label] = (float(np.median(times)), res)

    model, _ = torch_mlp(shared / NET)
    k = min(args.verona_images, len(x))
    vt, vruns = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        vruns.append(verona_search(model, x[:k].reshape(k, 1, 784), y[:k], GRID))
        vt.append((time.perf_counter() - t0) / k)
    theirs, vres, vbest = float(np.median(vt)), vruns[-1], np.min(vruns, axis=0)

    ref = jair_rows(shared, "mnist-net_256x2.onnx")
    print(f"mnist-net_256x2, MNIST test 0..{len(x) - 1}, grid 0.002..0.4 (200 values), PGD-40 per query")
    print(f"{'':>34} {'s/image':>9} {'speed-up':>9} {'<= VERONA':>10} {'<= best':>8} {'median ub':>10} "
          f"{'JAIR viol.':>10}")
    print(f"{'VERONA approach (batch 1, torch)':>34} {theirs:9.4f} {'1.0x':>9} {'':>10} {'':>8} "
          f"{np.nanmedian(vres):10.4f}   ({k} images, {args.runs} runs)")
    for label, (sec, res) in ours.items():
        up = res.eps_upper
        ids = [i for i in range(len(x)) if i in ref and res.status[i] != "misclassified"]
        viol = sum(np.isfinite(up[i]) and up[i] < ref[i][0] - 0.002 for i in ids)
        print(f"{label:>34} {sec:9.4f} {theirs / sec:8.1f}x {tighter(up[:k], vres):>10} {tighter(up[:k], vbest):>8} "
              f"{np.nanmedian(up[:k]):10.4f} {viol:10d}   (median ub on all {len(x)}: {np.nanmedian(up[ids]):.4f})")
    ids = [i for i in range(len(x)) if i in ref]
    print(f"JAIR on these images: median certified {np.median([ref[i][0] for i in ids]):.4f}, median smallest "
          f"counterexample {np.median([ref[i][1] for i in ids]):.4f}; '<= best' compares with VERONA's closest over its runs; 'JAIR viol.' counts our upper bound below "
          "their certified ε minus one grid step (must be 0)")


if __name__ == "__main__":
    main()
