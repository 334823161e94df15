#!/usr/bin/env bash
# The headline benchmarks on the first JAX device, one table: CROWN bounds, PGD, RoMA, critical ε and complete
# verification. `--size full` (default) fits in 8 minutes on one GPU; `--size small` runs in a minute or two
# on CPU (the test suite runs it so). Each row also counts, from a profile of one timed call, the host reads
# (numpy conversions and scalar reads of device arrays) beside the steps of the kernel's inner loop: far fewer
# reads than steps means no host round trip per step (critical ε and verify are steered from the host per
# bisection step or branch-and-bound round by design; their inner attacks and bounds are not).
#
#   benchmarks/gpu.sh [--size small|full] [--network PATH]     (default network: mnist-net_256x2 from ../shared,
#                                                              else the bundled mnist-mlp)
set -euo pipefail
cd "$(dirname "$0")/.."
size=full
network=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --network) network="$2"; shift 2 ;;
    *) echo "usage: $0 [--size small|full] [--network PATH]" >&2; exit 2 ;;
  esac
done
case "$size" in small|full) ;; *) echo "--size must be small or full, got $size" >&2; exit 2 ;; esac
if [ -z "$network" ] && [ -f ../shared/networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx ]; then
  network=../shared/networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx
fi
exec python - "$size" "${network:-mnist-mlp}" <<'EOF'
import cProfile
import pstats
import sys
import time

import jax
import numpy as np

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.data import load_dataset, to_network_input
from jaxrobust.kernels.attacks import pgd
from jaxrobust.kernels.bounds import margin_bounds
from jaxrobust.oracles import make_oracle
from jaxrobust.roma import RomaConfig, roma
from jaxrobust.verify import VerifyConfig, verify
from jaxrobust.weights import load_network

size, spec = sys.argv[1], sys.argv[2]
S = {"small": dict(bounds=64, pgd=64, roma=(8, 2000), crit=32, verify=8),
     "full": dict(bounds=4096, pgd=4096, roma=(256, 100_000), crit=1000, verify=100)}[size]
net = load_network(spec)
ds = load_dataset("mnist", "test")
n_max = max(S["bounds"], S["pgd"], S["crit"], S["verify"], S["roma"][0])
reps = -(-n_max // len(ds.y))
x = to_network_input(np.concatenate([ds.x] * reps)[:n_max], net.input_shape)
y = np.concatenate([ds.y] * reps)[:n_max]
key = jax.random.PRNGKey(0)


def reads(fn):
    """Host reads during one call of ``fn``, from its profile: numpy conversions made by jaxrobust code (an
    upper bound on device-to-host reads, as numpy inputs count too) plus scalar reads of jax arrays."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    n = 0
    for (path, _, name), (_, calls, _, _, callers) in pstats.Stats(prof).stats.items():
        if name in ("<built-in method numpy.asarray>", "<built-in method numpy.array>"):
            n += sum(c[1] for (p, _, _), c in callers.items() if "jaxrobust" in p)
        elif name == "_value" and "jax" in path:
            n += calls
    return n


def bench(name, what, n, unit, fn, steps):
    fn()  # compile
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    rows.append((name, what, t, f"{n / t:,.0f} {unit}/s", reads(fn), steps))


rows = []
bench("bounds", f"CROWN margins, {S['bounds']} images, eps 0.01", S["bounds"], "images",
      lambda: jax.block_until_ready(margin_bounds(net, x[:S["bounds"]], 0.01, "crown", labels=y[:S["bounds"]])), "-")
bench("attacks", f"PGD-40, {S['pgd']} images, eps 0.03", S["pgd"], "images",
      lambda: jax.block_until_ready(pgd(net, x[:S["pgd"]], y[:S["pgd"]], 0.03, key=key, steps=40).x_adv), 40)
k, n = S["roma"]
bench("RoMA", f"{k} images x {n:,} samples, eps 0.04", k * n, "samples",
      lambda: roma(net, x[:k], y[:k], RomaConfig(eps=0.04, samples=n)), n)
oracle = make_oracle(net, "attack")
bench("critical eps", f"attack oracle, {S['crit']} images, tol 0.001", S["crit"], "images",
      lambda: search(net, oracle, x[:S["crit"]], y[:S["crit"]], SearchConfig(eps_max=0.4, tol=0.001)), 60)
cfg = VerifyConfig(timeout=10.0)
holder = {}
bench("verify", f"complete, {S['verify']} images, eps 0.02, 10 s each", S["verify"], "queries",
      lambda: holder.update(r=verify(net, x[:S["verify"]], y[:S["verify"]], 0.02, cfg)), "-")
decided = int(np.sum(holder["r"].status != 0))

dev = jax.devices()[0]
print(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s)); network {net.name}; size {size}")
print(f"{'benchmark':<13} {'workload':<44} {'seconds':>8} {'throughput':>22} {'host reads':>10} {'inner steps':>11}")
for name, what, t, thr, r, steps in rows:
    print(f"{name:<13} {what:<44} {t:>8.2f} {thr:>22} {r:>10} {steps:>11}")
print(f"verify: {decided} of {S['verify']} queries decided")
EOF
