"""Critical ε in L∞, L2 and L1 on mnist-net_256x2: CROWN lower and attack upper brackets, side by side.

For each norm, the critical-ε search (`critical_eps.search`) runs twice on MNIST test images 0..N-1:

* ``crown``: CROWN proofs over the ball (dual-norm concretisation) bisected against PGD in that norm
  (margin loss, then 9 targeted restarts): the lower end is a proof, the upper end a counterexample;
* ``attack``: the minimum-norm attack in that norm (one batched pass), an upper bound only.

With ``--complete N``, the complete oracle (branch and bound over the ball) then runs on the first N images.

Prints per norm the medians of the lower end, both upper ends, the median ratio upper / lower (the gap that
complete verification would close; 1 = exact), the share of inputs whose bracket closed to the tolerance and
seconds per image. With auto_LiRPA importable (see ``bench_bounds.py``), also its CROWN lower bounds of the
same margins over the L2 and L1 balls (``PerturbationLpNorm``, no domain) at each image's proved radius,
beside ours: ours also intersect the ball with [0, 1]^n, so they should be at least as high.

    python benchmarks/bench_norms.py [--images 100] [--complete 10 --timeout 10]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.kernels import margin_bounds, robustness_spec
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle

NET = "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx"
EPS_MAX = {"linf": 0.5, "l2": 8.0, "l1": 60.0}


def run_norm(net, x, y, norm, tol_share):
    cfg = SearchConfig(eps_max=EPS_MAX[norm], tol=EPS_MAX[norm] * tol_share)
    out = {}
    for kind in ("crown", "attack"):
        oracle = make_oracle(net, kind, norm=norm)
        t0 = time.perf_counter()
        out[kind] = search(net, oracle, x, y, cfg, batch_size=128)
        out[kind + "_s"] = (time.perf_counter() - t0) / len(x)
    return out


def lirpa_lower(path, x, y, eps, norm):
    """auto_LiRPA CROWN lower bounds ``(N, 9)`` of the margins over the ``norm`` balls of radii ``eps: (N,)``."""
    import torch
    from bench_bounds import import_auto_lirpa
    from common import torch_mlp
    al = import_auto_lirpa()
    model = torch_mlp(path)[0]
    bm = al.BoundedModule(model, torch.zeros((1,) + x.shape[1:]), device="cpu")
    spec = torch.tensor(np.asarray(robustness_spec(np.asarray(y), 10)))
    rows = []
    for i in range(len(x)):
        ptb = al.PerturbationLpNorm(norm={"l2": 2, "l1": 1}[norm], eps=float(eps[i]))
        bx = al.BoundedTensor(torch.tensor(x[i:i + 1]), ptb)
        with torch.no_grad():
            lb, _ = bm.compute_bounds(x=(bx,), C=spec[i:i + 1], method="CROWN")
        rows.append(lb.numpy()[0])
    return np.array(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--tol-share", type=float, default=0.002, help="bisection tolerance as a share of eps_max")
    ap.add_argument("--complete", type=int, default=0, help="also run the complete oracle on this many images")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per query of the complete oracle")
    args = ap.parse_args()
    path = Path(args.shared) / NET
    net = load_onnx(path)
    ds = load_dataset("mnist", "test")
    x = np.asarray(to_network_input(ds.x[:args.images], net.input_shape), np.float32)
    y = np.asarray(ds.y[:args.images])
    print(f"mnist-net_256x2, MNIST test 0..{args.images - 1}; tolerance {args.tol_share:g} x eps_max")
    print(f"{'norm':5s} {'eps_max':>7s} {'CROWN lower':>11s} {'PGD upper':>9s} {'min-norm':>9s} "
          f"{'ratio':>6s} {'ratio mn':>8s} {'closed':>6s} {'s/img crown':>11s} {'s/img attack':>12s} {'censored':>8s}")
    results = {}
    for norm in ("linf", "l2", "l1"):
        r = run_norm(net, x, y, norm, args.tol_share)
        c, a = r["crown"], r["attack"]
        ok = (c.status != "misclassified") & (c.eps_lower > 0)
        upper = np.fmin(c.eps_upper, a.eps_upper)
        ratio = np.nanmedian(c.eps_upper[ok] / c.eps_lower[ok])
        ratio_mn = np.nanmedian(upper[ok] / c.eps_lower[ok])
        closed = np.mean(c.status[c.status != "misclassified"] == "exact")
        print(f"{norm:5s} {EPS_MAX[norm]:7g} {np.median(c.eps_lower[ok]):11.4f} {np.nanmedian(c.eps_upper[ok]):9.4f} "
              f"{np.nanmedian(a.eps_upper[ok]):9.4f} {ratio:6.2f} {ratio_mn:8.2f} {closed:6.0%} "
              f"{r['crown_s']:11.3f} {r['attack_s']:12.3f} {np.sum(np.isnan(upper[ok])):8d}", flush=True)
        results[norm] = (c, ok)
    for norm in ("l2", "l1") if args.complete else ():
        n = args.complete
        cfg = SearchConfig(eps_max=EPS_MAX[norm], tol=EPS_MAX[norm] * args.tol_share)
        t0 = time.perf_counter()
        f = search(net, make_oracle(net, "complete", norm=norm, timeout=args.timeout), x[:n], y[:n], cfg)
        c, ok = results[norm][0], results[norm][1][:n]
        print(f"{norm} complete oracle ({args.timeout:g} s per query), images 0..{n - 1}: exact "
              f"{np.mean(f.status[ok] == 'exact'):.0%}, median lower {np.median(f.eps_lower[ok]):.4f} (CROWN "
              f"{np.median(c.eps_lower[:n][ok]):.4f}), median upper / lower {np.nanmedian(f.eps_upper[ok] / f.eps_lower[ok]):.3f}, "
              f"{(time.perf_counter() - t0) / n:.1f} s per image", flush=True)
    try:
        from bench_bounds import import_auto_lirpa
        import_auto_lirpa()
    except ImportError:
        print("auto_LiRPA not importable: no cross-check of the L2 / L1 bounds")
        return
    for norm in ("l2", "l1"):
        c, ok = results[norm]
        eps = c.eps_lower[ok]
        ours = np.asarray(margin_bounds(net, x[ok], eps, "crown", labels=y[ok], norm=norm)).min(1)
        theirs = lirpa_lower(path, x[ok], y[ok], eps, norm).min(1)
        print(f"{norm}: at the proved radii, min margin bound ours median {np.median(ours):.4f}, auto_LiRPA "
              f"{np.median(theirs):.4f}; ours >= theirs - 1e-4 on {np.mean(ours >= theirs - 1e-4):.0%} of "
              f"{ok.sum()} images; auto_LiRPA proves {np.mean(theirs > 0):.0%} of them")


if __name__ == "__main__":
    main()
