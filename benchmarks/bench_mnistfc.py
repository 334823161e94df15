"""VNN-COMP 2021 mnistfc: the 90 instances of ``../shared/networks/mnist/vnncomp2021_mnistfc``, decided per network.

Each instance (network, VNN-LIB property, 120 s in the competition's file) is run through
`verify.verify_property` with ``--timeout`` seconds. Every ``sat`` counterexample is re-checked with
onnxruntime on the original ONNX file; with ``--milp S`` every ``unsat`` is re-decided by the MILP
(`milp.milp_verify`, S seconds) and a MILP counterexample counts as a disagreement. Prints one line per
instance and a table per network: decided, sat / unsat / undecided, median time of the decided ones, and
the published α,β-CROWN counts (VNN-COMP 2021, 300 s on a GPU, MIP-refined intermediate bounds).

    python benchmarks/bench_mnistfc.py [--networks mnist-net_256x4,mnist-net_256x6] [--timeout 120] [--milp 60]
                                       [--refine 0] [--props prop_0_0.03.vnnlib,prop_9_0.03.vnnlib]
"""
from __future__ import annotations

import argparse
import csv
import time

import numpy as np
from common import SHARED

from jaxrobust import vnnlib
from jaxrobust.kernels.relu_chain import relu_chain
from jaxrobust.onnx_import import load_onnx
from jaxrobust.verdict import VIOLATED
from jaxrobust.verify import VerifyConfig, verify_property

FOLDER = SHARED / "networks" / "mnist" / "vnncomp2021_mnistfc"
PUBLISHED = {"mnist-net_256x2": "—", "mnist-net_256x4": "22/30", "mnist-net_256x6": "18/29"}


def onnx_check(path, x, prop) -> bool:
    """Whether onnxruntime's output at ``x`` lies in the property's unsafe region."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path))
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    y = sess.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].reshape(-1).astype(np.float64)
    return any(np.all(a @ y <= b) for a, b in prop.disjuncts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="mnist-net_256x2,mnist-net_256x4,mnist-net_256x6")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--milp", type=float, default=0.0, help="seconds of MILP per unsat instance (0: skip)")
    ap.add_argument("--refine", type=float, default=VerifyConfig().refine,
                    help="share of the time for MILP-refined root bounds on deep MLPs (0: off)")
    ap.add_argument("--props", help="only these property files (comma-separated)")
    args = ap.parse_args()
    with open(FOLDER / "mnistfc_instances.csv") as f:
        rows = [r for r in csv.reader(f) if r]
    table = []
    for name in args.networks.split(","):
        path = FOLDER / f"{name}.onnx"
        net = load_onnx(path)
        chain = relu_chain(net, net.input_shape) if args.milp else None
        res, times, bad = [], [], 0
        for onnx, prop_file, _ in rows:
            if onnx.strip() != f"{name}.onnx" or (args.props and prop_file.strip() not in args.props.split(",")):
                continue
            prop = vnnlib.load(FOLDER / prop_file.strip())
            t0 = time.perf_counter()
            r = verify_property(net, prop, VerifyConfig(timeout=args.timeout, refine=args.refine))
            t = time.perf_counter() - t0
            note = ""
            if r.result == "sat" and not onnx_check(path, r.x, prop):
                bad, note = bad + 1, "  onnxruntime: NOT a counterexample"
            if r.result == "unsat" and chain is not None:
                from jaxrobust.milp import milp_verify
                label = int(np.argmax(sum(a[0] for a, _ in prop.disjuncts)))    # rows e_label - e_j
                m = milp_verify(chain, prop.lower, prop.upper, label, time_limit=args.milp)
                if m.status == VIOLATED:
                    bad, note = bad + 1, "  MILP: counterexample"
                note = note or f"  MILP: {('unknown', 'robust')[int(m.status == 1)]}"
            print(f"{name} {prop_file.strip():22} {r.result:8} {r.stage:10} {t:6.1f} s {r.domains:8d}{note}",
                  flush=True)
            res.append(r.result)
            times.append(t)
        res, times = np.array(res), np.array(times)
        dec = np.isin(res, ("sat", "unsat"))
        table.append((name, f"{dec.sum()}/{len(res)}", int((res == "sat").sum()), int((res == "unsat").sum()),
                      int((~dec).sum()), float(np.median(times[dec])) if dec.any() else float("nan"), bad,
                      PUBLISHED.get(name, "")))
    print(f"\n{'network':16} {'decided':>8} {'sat':>4} {'unsat':>6} {'undec.':>7} {'median s':>9} {'wrong':>6} "
          f"{'α,β-CROWN 2021':>15}")
    for row in table:
        print(f"{row[0]:16} {row[1]:>8} {row[2]:4d} {row[3]:6d} {row[4]:7d} {row[5]:9.2f} {row[6]:6d} {row[7]:>15}")


if __name__ == "__main__":
    main()
