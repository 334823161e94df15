"""Complete verdicts on the VNN-COMP 2021 verivital CNNs (average and max pooling), MNIST test images.

For each network and ε, every image 0..N-1 is one L∞ query (the whole cascade, ``--timeout`` seconds each);
prints the decided fraction, verdict counts and the time per query, and checks every VIOLATED verdict's
counterexample with onnxruntime on the original ONNX file.

    python benchmarks/bench_verify_cnn.py [--networks Convnet_maxpool:0.004,Convnet_avgpool:0.02] [--images 50]
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
    ap.add_argument("--networks", default="Convnet_maxpool:0.004,Convnet_avgpool:0.02,Convnet_avgpool:0.04")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; timeout {args.timeout:.0f} s per query")
    ds = load_dataset(f"mnist:{SHARED / 'data' / 'mnist.npz'}", "test")
    import onnxruntime as ort
    for item in args.networks.split(","):
        name, eps = item.split(":")
        path = SHARED / "networks" / "mnist" / "vnncomp2021_verivital" / f"{name}.onnx"
        net = load_onnx(path)
        x = to_network_input(ds.x[:args.images], net.input_shape)
        y = ds.y[:args.images]
        t0 = time.perf_counter()
        r = verify(net, x, y, float(eps), VerifyConfig(timeout=args.timeout), progress=True)
        wall = time.perf_counter() - t0
        sess = ort.InferenceSession(str(path))
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        confirmed = sum(int(np.argmax(sess.run(None, {inp.name: r.counterexample[i].reshape(shape)})[0]) != y[i])
                        for i in np.flatnonzero(r.status == VIOLATED))
        stages = {str(s): int(np.sum(r.stage == s)) for s in np.unique(r.stage)}
        print(f"\n{name} ε={eps}: {len(x)} queries, wall {wall:.0f} s, decided {np.mean(r.status != UNKNOWN):.0%}"
              f" (unsat {np.sum(r.status == ROBUST)}, sat {np.sum(r.status == VIOLATED)}, unknown"
              f" {np.sum(r.status == UNKNOWN)}); time median {np.median(r.time_s):.2f} s, max {r.time_s.max():.1f} s;"
              f" sat confirmed by onnxruntime {confirmed}/{np.sum(r.status == VIOLATED)}; decided by {stages}")


if __name__ == "__main__":
    main()
