"""The runner's cost and its queue: Ray workers and devices against one process, and a replay of real verifier times.

(a) Overhead: a critical-ε run (attack oracle, bisection to 0.001 on [0, 0.4]) over ``--images`` MNIST test
    images, each run in a fresh process: one process on one device, then ``--workers`` local Ray workers (cluster
    start, worker start and their compilations included), then with ``--devices N`` one process on N devices
    (on a CPU host N forced host devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``; each device
    compiles its own programs); the variants alternate so all see the same load. Prints the medians and the
    median of the per-round ratios to one process. The rows of each are compared with one process's
    (identical, no duplicate).
(b) Scheduling: the per-image verifier times of the JAIR study (``total_time`` of
    ``../shared/reference/jair/results_JAIR_fomlas.csv``, 5480 images) replayed through the runner's queue
    (`runner.dynamic_queue`) with simulated workers; beside it the static split (each worker a contiguous
    block of the inputs, as a job array would give). Speed-up and its fraction of the ideal ``W``.

    python benchmarks/bench_runner.py [--images 300] [--runs 3] [--workers 2] [--devices 0] [--skip-overhead]
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED

NETWORK = SHARED / "networks" / "mnist" / "vnncomp2021_mnistfc" / "mnist-net_256x2.onnx"
JAIR = SHARED / "reference" / "jair" / "results_JAIR_fomlas.csv"


def one_run(images: int, workers: int, out: str) -> float:
    """Wall seconds of one critical-ε run, this process only (called in a fresh subprocess)."""
    from jaxrobust.critical_eps import SearchConfig, run
    from jaxrobust.data import load_dataset
    from jaxrobust.weights import load_network
    t0 = time.perf_counter()
    net = load_network(str(NETWORK) if NETWORK.exists() else "mnist-mlp")
    ds = load_dataset("mnist", "test")
    run(net, ds, range(images), "attack", SearchConfig(eps_max=0.4, tol=0.001), out, chunk=32, progress=False,
        workers=workers or None)
    return time.perf_counter() - t0


def rows(path) -> dict:
    from jaxrobust.critical_eps import TABLE, columns
    from jaxrobust.store import ResultStore
    d = ResultStore(path, TABLE, columns((28, 28, 1))).read()
    assert len(set(d["index"].tolist())) == len(d["index"]), "duplicate rows"
    order = np.argsort(d["index"])
    return {k: v[order] for k, v in d.items() if k != "time_s"}


def overhead(images: int, runs: int, workers: int, devices: int) -> None:
    variants = {"one process": (0, {})}  # name: (Ray workers, environment)
    if workers:
        variants[f"{workers} Ray workers"] = (workers, {})
    if devices > 1:
        variants[f"{devices} devices"] = (0, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs):
            for k, (name, (w, env)) in enumerate(variants.items()):
                out = f"{tmp}/v{k}_{r}.h5"
                p = subprocess.run([sys.executable, __file__, "--one", str(w), "--images", str(images), "--out", out],
                                   capture_output=True, text=True, cwd=Path(__file__).parent, env={**os.environ, **env})
                if p.returncode:
                    sys.exit(p.stderr[-2000:])
                times[name].append(json.loads(p.stdout.strip().splitlines()[-1])["wall_s"])
                print(f"  run {r + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
        base = rows(f"{tmp}/v0_0.h5")
        same = {name: all(np.array_equal(base[c], b[c], equal_nan=b[c].dtype.kind == "f") for c in base)
                for k, name in enumerate(variants) if k for b in [rows(f"{tmp}/v{k}_0.h5")]}
    net = NETWORK.stem if NETWORK.exists() else "mnist-mlp"
    print(f"(a) critical ε of {images} images ({net}, attack oracle), medians of {runs}: one process "
          f"{np.median(times['one process']):.1f} s")
    for name in same:
        ratio = np.median(np.array(times[name]) / np.array(times["one process"]))
        print(f"    {name} {np.median(times[name]):.1f} s; median ratio {ratio:.2f} ({(ratio - 1) * 100:+.0f} %); "
              f"rows identical: {same[name]}")


def replay(times: np.ndarray, workers: int) -> float:
    """Makespan of ``times`` (in their order) through `runner.dynamic_queue` with ``workers`` simulated workers."""
    from jaxrobust.runner import dynamic_queue
    clock, heap = [0.0], []

    def submit(worker, i):
        heapq.heappush(heap, (clock[0] + times[i], i, worker))
        return i

    def wait(_tickets):
        end, i, _ = heapq.heappop(heap)
        clock[0] = end
        return i, None, False

    for _ in dynamic_queue(len(times), list(range(workers)), submit, wait, lambda w: w):
        pass
    return clock[0]


def static(times: np.ndarray, workers: int) -> float:
    """Makespan when worker k runs the k-th contiguous block of the inputs."""
    return max(b.sum() for b in np.array_split(times, workers))


def scheduling() -> None:
    if not JAIR.exists():
        print(f"(b) skipped: {JAIR} not available")
        return
    with open(JAIR) as fh:
        times = np.array([float(r["total_time"]) for r in csv.DictReader(fh)])
    total = times.sum()
    print(f"(b) JAIR verifier times: {len(times)} images, {total / 3600:.0f} h in all, longest {times.max() / 3600:.1f} h")
    print(f"{'workers':>8} {'dynamic speed-up':>17} {'of ideal':>9} {'static speed-up':>16} {'of ideal':>9}")
    for w in (1, 2, 4, 8, 16, 32, 64):
        d, s = total / replay(times, w), total / static(times, w)
        print(f"{w:>8} {d:>17.1f} {d / w:>9.1%} {s:>16.1f} {s / w:>9.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="Ray workers (0: none)")
    p.add_argument("--devices", type=int, default=0, help="also one process on this many devices (0: not)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one timed run with this many workers (0: none)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps({"wall_s": one_run(a.images, a.one, a.out)}))
        return
    if not a.skip_overhead:
        overhead(a.images, a.runs, a.workers, a.devices)
    scheduling()


if __name__ == "__main__":
    main()
