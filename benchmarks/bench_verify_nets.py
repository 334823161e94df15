"""Complete verdicts on shared networks beyond the MNIST MLPs: the VNN-COMP 2021 verivital CNNs (average and
max pooling) on MNIST, the JAIR CIFAR ResNets on the lossless CIFAR-10 test images.

For each network and ε, every image 0..N-1 that the network classifies correctly is one L∞ query (the whole
cascade, ``--timeout`` seconds each); prints the decided fraction, verdict counts and the time per query
(the first query of a network includes compilation), and checks every VIOLATED verdict's counterexample
with onnxruntime on the original ONNX file.

    python benchmarks/bench_verify_nets.py [--networks mnist/vnncomp2021_verivital/Convnet_maxpool:0.004,...]
        [--images 50 | --ids 3,17] [--timeout 60]
    python benchmarks/bench_verify_nets.py --networks cifar10/jair_resnet4b/resnet_4b_fgsm:0.00784 --images 20

``--every EPS_MNIST,EPS_CIFAR``: every ONNX network under shared/networks at that radius, with ``--no-attack``
the verdicts come from the bounds and branch and bound alone (no network is refused):

    python benchmarks/bench_verify_nets.py --every 0.01,0.00392157 --images 5 --timeout 20 --no-attack
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import SHARED

from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import ROBUST, UNKNOWN, VIOLATED
from jaxrobust.verify import VerifyConfig, verify


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default=",".join(f"mnist/vnncomp2021_verivital/{n}" for n in (
        "Convnet_maxpool:0.004", "Convnet_maxpool:0.02", "Convnet_avgpool:0.02", "Convnet_avgpool:0.04")),
        help="comma-separated PATH:EPS, PATH relative to shared/networks without .onnx")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--ids", default="", help="comma-separated image indices instead of 0..images-1")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--every", help="EPS_MNIST,EPS_CIFAR: every shared ONNX network at that radius")
    ap.add_argument("--no-attack", action="store_true", help="skip the PGD stage (attack_steps=0)")
    args = ap.parse_args()
    if args.every:
        radii = dict(zip(("mnist", "cifar10"), args.every.split(",")))
        args.networks = ",".join(f"{p.relative_to(SHARED / 'networks').with_suffix('')}:{radii[p.parts[-3]]}"
                                 for p in sorted((SHARED / "networks").rglob("*.onnx")))
    cfg = VerifyConfig(timeout=args.timeout, attack_steps=0 if args.no_attack else VerifyConfig().attack_steps)
    print(f"load average {os.getloadavg()[0]:.1f}; timeout {args.timeout:.0f} s per query")
    data = {"mnist": f"mnist:{SHARED / 'data' / 'mnist.npz'}",
            "cifar10": f"cifar10:{SHARED / 'data' / 'cifar10' / 'cifar10_test_first100_lossless.npz'}"}
    import onnxruntime as ort
    for item in args.networks.split(","):
        rel, eps = item.rsplit(":", 1)
        path = SHARED / "networks" / f"{rel}.onnx"
        name = path.stem
        net = load_onnx(path)
        ds = load_dataset(data[rel.split("/")[0]], "test")
        ids = np.array([int(i) for i in args.ids.split(",")]) if args.ids else np.arange(args.images)
        x = to_network_input(ds.x[ids], net.input_shape)
        y = ds.y[ids]
        ok = np.asarray(net(x)).argmax(-1) == y
        x, y, ids = x[ok], y[ok], ids[ok]
        t0 = time.perf_counter()
        r = verify(net, x, y, float(eps), cfg, progress=True)
        wall = time.perf_counter() - t0
        sess = ort.InferenceSession(str(path))
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        confirmed = sum(int(np.argmax(sess.run(None, {inp.name: r.counterexample[i].reshape(shape)})[0]) != y[i])
                        for i in np.flatnonzero(r.status == VIOLATED))
        stages = {str(s): int(np.sum(r.stage == s)) for s in np.unique(r.stage)}
        print(f"\n{name} ε={eps}: {len(x)} queries (of {len(ok)} images), wall {wall:.0f} s, decided {np.mean(r.status != UNKNOWN):.0%}"
              f" (unsat {np.sum(r.status == ROBUST)}, sat {np.sum(r.status == VIOLATED)}, unknown"
              f" {np.sum(r.status == UNKNOWN)}); time median {np.median(r.time_s):.2f} s, max {r.time_s.max():.1f} s;"
              f" sat confirmed by onnxruntime {confirmed}/{np.sum(r.status == VIOLATED)}; decided by {stages}")
        print(f"undecided images: {','.join(str(i) for i in ids[r.status == UNKNOWN])}")


if __name__ == "__main__":
    main()
