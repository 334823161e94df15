"""Global correctness and latent-attack timings (Fijalkow & Gupta's setting), median of several runs,
each with its wall and process CPU time and the 1-minute load average (the machine may be shared).

* global correctness: 10^4 samples per class for all ten per-class MNIST GANs, small CNN classifier
  (the paper's target: ≤ 30 s on 2 CPU cores);
* time to the first realistic adversarial example (latent L∞ ball, eps): white-box latent PGD and
  black-box random search, first call (compilation included) and warm median. The original notebooks
  took 87 s (black-box) and 632 s (white-box).

Needs the per-class GANs of ``benchmarks/train_gans.py`` (``--gans``); the small CNN is trained once on
MNIST (2 epochs) and cached beside them.

    python benchmarks/bench_generative.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
from common import SHARED

from jaxrobust import generative as G
from jaxrobust import zoo
from jaxrobust.data import default_cache_dir, load_dataset
from jaxrobust.gan import load_generators
from jaxrobust.training import accuracy, train
from jaxrobust.weights import load_weights, save_network


def small_cnn(path: Path, data: str):
    """The paper's small classifier trained on MNIST (cached at ``path``)."""
    if path.exists():
        return load_weights(path)
    ds = load_dataset(data, "train")
    net = zoo.init(zoo.arch("cnn", size="small"), jax.random.PRNGKey(0))
    net, _ = train(net, ds.x, ds.y, epochs=2, batch_size=128, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_network(net, path)
    return net


def timed(fn, runs: int) -> dict:
    """First call (compilation included), then ``runs`` more: median and per-run wall and process CPU
    seconds, with the 1-minute load average at the end of each run.

    On a shared machine the CPU time divided by the core count estimates the wall time when idle."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    wall, cpu, load = [], [], []
    for r in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(r + 1)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        load.append(os.getloadavg()[0])
    return {"first_s": first, "median_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "runs_s": wall, "runs_cpu_s": cpu, "load_avg": load, "cores": os.cpu_count()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gans", type=Path, default=default_cache_dir() / "gans" / "mnist-perclass.msgpack")
    p.add_argument("--classifier", type=Path, default=default_cache_dir() / "classifiers" / "mnist-cnn-small.msgpack")
    p.add_argument("--data", default=f"mnist:{SHARED / 'data' / 'mnist.npz'}")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--eps", type=float, default=0.1, help="latent L∞ radius of the attacks")
    p.add_argument("--batch", type=int, default=32, help="latents attacked per round")
    p.add_argument("--max-rounds", type=int, default=100, help="rounds of --batch latents before an attack gives up")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    gens = load_generators(args.gans)
    clf = small_cnn(args.classifier, args.data)
    test = load_dataset(args.data, "test")
    out = {"devices": str(jax.devices()), "classifier": clf.name, "test_accuracy": accuracy(clf, test.x, test.y)}

    def correctness(r):
        return [G.global_correctness(clf, g, c, samples=args.samples, key=jax.random.PRNGKey(r)).estimate
                for c, g in gens.items()]

    print(f"load average before: {os.getloadavg()}", flush=True)
    out["correctness"] = {"classes": len(gens), "samples_per_class": args.samples, **timed(correctness, args.runs),
                          "estimates": [round(e, 4) for e in correctness(0)]}
    c = out["correctness"]
    print(f"global correctness, {c['classes']} classes x {args.samples} samples: median {c['median_s']:.1f} s wall, "
          f"{c['median_cpu_s']:.1f} s CPU ({c['cores']} cores), load average per run {c['load_avg']}", flush=True)
    print(json.dumps(c), flush=True)

    label = 8
    for method, kw in (("pgd", {"steps": 40}), ("random", {"queries": 500})):
        def attack(r):
            return G.time_to_first(clf, gens[label], label, args.eps, batch=args.batch, method=method,
                                   max_rounds=args.max_rounds, key=jax.random.PRNGKey(100 + r), **kw)
        first, f_rounds, _ = attack(0)
        results = [(*attack(r + 1)[:2], os.getloadavg()[0]) for r in range(args.runs)]
        out[f"first_adversarial_{method}"] = {
            "class": label, "eps": args.eps, "batch": args.batch, **kw, "first_call_s": first,
            "first_call_rounds": f_rounds, "median_s": statistics.median(t for t, _, _ in results),
            "runs": [{"s": t, "rounds": n, "load_avg": a} for t, n, a in results]}
        print(json.dumps(out[f"first_adversarial_{method}"]), flush=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
