"""Complete verification on the JAIR queries: decided fraction and time per query, soundness against αβ-CROWN.

For each network and each MNIST test image 0..N-1 that the network classifies correctly, two queries:
ε = the paper's ``epsilon_value`` (reported certified by αβ-CROWN: expected unsat) and ε =
``smallest_sat_value`` (a counterexample was found: expected sat). Every query gets ``--timeout`` seconds. Prints
per network: decided fraction within the timeout, time distribution, verdict counts, soundness
disagreements (VIOLATED at a certified ε, ROBUST at a sat ε), each VIOLATED one re-checked
with onnxruntime on the original ONNX file, and the paper's verifier time per
image (the whole bisection) for scale. ``--milp K`` re-decides the first K unsat queries with the exact
MILP back-end and counts disagreements.

    python benchmarks/bench_verify.py [--networks mnist-net_256x2,...] [--images 100] [--timeout 60] [--csv F]
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np
from common import SHARED

from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import ROBUST, UNKNOWN, VIOLATED
from jaxrobust.reference import load_jair
from jaxrobust.verify import VerifyConfig, verify

FOLDERS = {"mnist-net_256x2": "vnncomp2021_mnistfc", "mnist-net_256x4": "vnncomp2021_mnistfc",
           "mnist-net_256x6": "vnncomp2021_mnistfc", "mnist-net": "fomlas_misc"}
FOLDERS.update({f"mnist_relu_{k}": "eran_ffnn" for k in ("3_50", "3_100", "6_100", "6_200", "9_100", "9_200")})
NAMES = {ROBUST: "unsat", VIOLATED: "sat", UNKNOWN: "unknown"}


def queries(name, images, split="test"):
    """Network, inputs, labels, ε per query, expected verdict, image ids and the paper's times."""
    net = load_onnx(SHARED / "networks" / "mnist" / FOLDERS[name] / f"{name}.onnx")
    ref = load_jair(SHARED / "reference" / "jair" / "results_JAIR_fomlas.csv", f"{name}.onnx", split)
    ds = load_dataset(f"mnist:{SHARED / 'data' / 'mnist.npz'}", split)
    ids = [i for i in range(images) if i in ref]
    x = to_network_input(ds.x[ids], net.input_shape)
    ok = np.asarray(net(x)).argmax(-1) == ds.y[ids]
    ids = [i for i, good in zip(ids, ok) if good and ref[i].certified > 0 and np.isfinite(ref[i].counterexample)]
    x = to_network_input(ds.x[ids], net.input_shape)
    rows = [(ref[i].certified, ROBUST) for i in ids] + [(ref[i].counterexample, VIOLATED) for i in ids]
    eps = np.array([e for e, _ in rows])
    expect = np.array([t for _, t in rows])
    return net, np.concatenate([x, x]), np.concatenate([ds.y[ids]] * 2), eps, expect, ids * 2, \
        np.array([ref[i].time_s for i in ids])


def onnxruntime_margin(folder, name, x, label):
    """``logit_label - max other logit`` of the original ONNX file under onnxruntime at ``x``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(SHARED / "networks" / "mnist" / folder / f"{name}.onnx"))
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    out = sess.run(None, {inp.name: x.reshape(shape).astype(np.float32)})[0].ravel()
    return float(out[label] - np.delete(out, label).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="mnist-net_256x2")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--milp", type=int, default=0, help="cross-check the first K certified queries with MILP")
    ap.add_argument("--csv", help="write one row per query")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; timeout {args.timeout:.0f} s per query")
    rows = []
    for name in args.networks.split(","):
        net, x, y, eps, expect, ids, ref_t = queries(name, args.images)
        t0 = time.perf_counter()
        r = verify(net, x, y, eps, VerifyConfig(timeout=args.timeout), progress=True)
        wall = time.perf_counter() - t0
        decided = (r.status != UNKNOWN) & (r.time_s <= args.timeout)
        unsound = int(np.sum((expect == ROBUST) & (r.status == VIOLATED)) +
                      np.sum((expect == VIOLATED) & (r.status == ROBUST)))
        print(f"\n{name}: {len(x)} queries ({len(x) // 2} images x certified/sat ε), wall {wall:.0f} s")
        for label, sel in (("certified ε", expect == ROBUST), ("sat ε", expect == VIOLATED), ("all", expect != 0)):
            t = r.time_s[sel]
            print(f"  {label:>12}: decided {decided[sel].mean():6.1%}  unsat {np.sum(r.status[sel] == ROBUST):3d}"
                  f"  sat {np.sum(r.status[sel] == VIOLATED):3d}  unknown {np.sum(r.status[sel] == UNKNOWN):3d}"
                  f"  time median {np.median(t):6.2f} s  p90 {np.quantile(t, 0.9):6.2f} s  max {t.max():6.2f} s"
                  f"  subdomains median {np.median(r.domains[sel]):.0f} max {r.domains[sel].max()}")
        stages = {s: int(np.sum(r.stage == s)) for s in np.unique(r.stage)}
        print(f"  decided by: {stages}")
        print(f"  disagreements with αβ-CROWN: {unsound}")
        for k in np.flatnonzero((expect == ROBUST) & (r.status == VIOLATED)):
            margin = onnxruntime_margin(FOLDERS[name], name, r.counterexample[k], int(y[k]))
            print(f"    image {ids[k]}: counterexample at certified ε={eps[k]:.3f}, L∞ distance "
                  f"{np.abs(r.counterexample[k] - x[k]).max():.7f}, onnxruntime margin {margin:.3g} (< 0: misclassified)")
        print(f"  paper's verifier time per image (whole bisection): median {np.median(ref_t):.0f} s,"
              f" p90 {np.quantile(ref_t, 0.9):.0f} s")
        if args.milp:
            from jaxrobust.milp import milp_verify_batch
            k = np.flatnonzero(expect == ROBUST)[:args.milp]
            m = milp_verify_batch(net, x[k], y[k], eps[k], time_limit=args.timeout)
            both = (m.status != UNKNOWN) & (r.status[k] != UNKNOWN)
            print(f"  MILP cross-check on {len(k)} certified queries: decided {np.mean(m.status != UNKNOWN):.0%},"
                  f" disagreements {int(np.sum(both & (m.status != r.status[k])))},"
                  f" median MILP time {np.median(m.time_s):.2f} s")
        rows += [{"network": name, "image": i, "eps": e, "expected": NAMES[t], "result": NAMES[int(s)],
                  "stage": st, "time_s": round(float(ts), 3), "subdomains": int(dm)}
                 for i, e, t, s, st, ts, dm in zip(ids, eps, expect, r.status, r.stage, r.time_s, r.domains)]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
