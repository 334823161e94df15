"""PGD-40 (L∞, cross-entropy, random start): jaxrobust vs torchattacks on identical weights.

Networks are rebuilt from the ONNX initializers of the shared MNIST networks, once as a JAX
function and once as a torch module. Prints examples/s (medians of rounds that alternate between the
two tools, so both see the same load) of jaxrobust returning each input's final iterate as
torchattacks does (``keep_best=False``) and keeping its best iterate (the default), of torchattacks,
the medians of the per-round ratios jaxrobust / torchattacks for both, the share of the JAX float32
2048² matmul peak measured in the same run (final-iterate runs; FLOPs per step counted as 2x a forward
pass: the forward and the input-gradient backward, which computes no weight gradients), and the time
of the same passes through the affine layers alone (`affine_time`: the floor of any PGD on this
machine) with the ratio to torchattacks that floor allows. ``--loops`` also times the step-loop
variants (rolled `fori_loop`, partial and full unrolling).

    python benchmarks/bench_attacks.py [--shared ../shared] [--batches 1 32 256] [--loops]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from common import matmul_peak, median_time, paired_times
from jax import lax
from onnx import numpy_helper

from jaxrobust.kernels.attacks import pgd
from jaxrobust.network import from_function

NETS = {
    "mnist-net_256x2": "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx",
    "mnist_relu_6_100": "networks/mnist/eran_ffnn/mnist_relu_6_100.onnx",
    "convSmallRELU__Point": "networks/mnist/eran_cnn/convSmallRELU__Point.onnx",
}
EPS, STEPS = 0.03, 40


def initializers(path):
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in onnx.load(path).graph.initializer}


def dense_layers(w):
    """Gemm (weight (out, in), bias) pairs of a feed-forward ONNX file, in order."""
    names = sorted({k.rsplit(".", 1)[0] for k in w}, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])
    return [(w[n + ".weight"], w[n + ".bias"]) for n in names]


def jax_mlp(layers, relu_last, input_shape, act=jax.nn.relu):
    params = [(jnp.asarray(W.T), jnp.asarray(b)) for W, b in layers]

    def apply(p, x):
        h = x.reshape(x.shape[0], -1)
        for i, (W, b) in enumerate(p):
            h = h @ W + b
            if i < len(p) - 1 or relu_last:
                h = act(h)
        return h

    return from_function(apply, params, input_shape, 10)


def jax_convsmall(w, act=jax.nn.relu):
    conv = lambda h, k, b, s: lax.conv_general_dilated(
        h, k, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    hwio = lambda k: jnp.asarray(k.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    params = {"k0": hwio(w["0.weight"]), "b0": w["0.bias"], "k1": hwio(w["1.0.weight"]), "b1": w["1.0.bias"],
              "k2": hwio(w["2.0.weight"]), "b2": w["2.0.bias"], "W5": w["5.0.weight"].T, "b5": w["5.0.bias"],
              "W6": w["6.weight"].T, "b6": w["6.bias"]}

    def apply(p, x):  # x: (B, 1, 28, 28) NCHW with one channel == NHWC (B, 28, 28, 1)
        h = x.reshape(x.shape[0], 28, 28, 1)
        h = conv(h, p["k0"], p["b0"], 1)
        h = act(conv(h, p["k1"], p["b1"], 2))
        h = act(conv(h, p["k2"], p["b2"], 2))  # (B, 5, 5, 32), flattened HWC like the ONNX graph
        h = act(h.reshape(h.shape[0], -1) @ p["W5"] + p["b5"])
        return h @ p["W6"] + p["b6"]

    return from_function(apply, jax.tree_util.tree_map(jnp.asarray, params), (1, 28, 28), 10)


def torch_model(name, w):
    import torch
    from torch import nn

    def linear(W, b):
        m = nn.Linear(W.shape[1], W.shape[0])
        m.weight.data, m.bias.data = torch.from_numpy(W), torch.from_numpy(b)
        return m

    if name == "convSmallRELU__Point":
        def conv(k, b, s):
            m = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2], stride=s)
            m.weight.data, m.bias.data = torch.from_numpy(k), torch.from_numpy(b)
            return m

        class Nhwc(nn.Module):
            def forward(self, h):
                return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)

        mods = [conv(w["0.weight"], w["0.bias"], 1), conv(w["1.0.weight"], w["1.0.bias"], 2), nn.ReLU(),
                conv(w["2.0.weight"], w["2.0.bias"], 2), nn.ReLU(), Nhwc(),
                linear(w["5.0.weight"], w["5.0.bias"]), nn.ReLU(), linear(w["6.weight"], w["6.bias"])]
    else:
        layers = dense_layers(w)
        mods = [nn.Flatten()]
        for i, (W, b) in enumerate(layers):
            mods.append(linear(W, b))
            if i < len(layers) - 1 or name == "mnist_relu_6_100":
                mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def jax_net(name, w, act=jax.nn.relu):
    """The JAX network ``name`` from its initializers ``w``, with activations ``act``."""
    if name == "convSmallRELU__Point":
        return jax_convsmall(w, act)
    return jax_mlp(dense_layers(w), name == "mnist_relu_6_100",
                   (784,) if name == "mnist-net_256x2" else (1, 28, 28), act)


def affine_time(net, B):
    """Median seconds of STEPS forward and input-gradient passes, at batch ``B``, through ``net``'s
    affine layers alone (built with identity activations): its weight products in the order a gradient
    step needs them, the floor of any PGD here. Each pass starts from the last one's gradient."""
    x = jnp.full((B,) + net.input_shape, 0.5, jnp.float32)

    @jax.jit
    def passes(params, x):
        def step(_, x):
            z, vjp = jax.vjp(lambda v: net.apply(params, v), x)
            return x + 1e-7 * vjp(z)[0]
        return lax.fori_loop(0, STEPS, step, x, unroll=True)  # unrolled as PGD around convolutions

    return median_time(lambda: passes(net.params, x), 7)


def forward_flops(name, w=None):
    if name == "convSmallRELU__Point":
        return 2 * (28 * 28 * 1 + 13 * 13 * 16 * 16 + 5 * 5 * 32 * 16 * 16 + 800 * 100 + 100 * 10)
    return 2 * sum(W.size for W, _ in dense_layers(w))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--loops", action="store_true", help="also time rolled vs unrolled step loops")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()

    import torch
    import torchattacks
    torch.set_num_threads(args.threads)

    shared = Path(args.shared)
    mnist = np.load(shared / "data/mnist.npz")
    peak = matmul_peak()
    print(f"JAX f32 2048^2 matmul peak: {peak / 1e9:.1f} GFLOP/s   ({jax.devices()[0].platform}, "
          f"torch threads {torch.get_num_threads()})")
    print(f"PGD-{STEPS} L∞ eps={EPS} CE loss, random start; examples/s (median)")
    print(f"{'network':22s} {'B':>4s} {'final':>7s} {'best':>7s} {'torchattacks':>12s} {'ratio':>6s} "
          f"{'(best)':>6s} {'%peak':>6s} {'affine':>8s} {'max ratio':>9s}")
    rows = []
    for name in args.nets:
        w = initializers(shared / NETS[name])
        net, affine, tmodel = jax_net(name, w), jax_net(name, w, act=lambda h: h), torch_model(name, w)
        fl = 2 * forward_flops(name, w) * STEPS  # per example
        for B in args.batches:
            x = (mnist["x_test"][:B].astype(np.float32) / 255).reshape((B,) + net.input_shape)
            y = mnist["y_test"][:B].astype(np.int32)
            xj, yj, key = jnp.asarray(x), jnp.asarray(y), jax.random.key(0)
            atk = torchattacks.PGD(tmodel, eps=EPS, alpha=2.5 * EPS / STEPS, steps=STEPS, random_start=True)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
            times = []
            for keep_best in (False, True):
                run = lambda k=keep_best: pgd(net, xj, yj, EPS, key=key, steps=STEPS, loss="ce",  # noqa: E731
                                              keep_best=k).x_adv.block_until_ready()
                times.append(paired_times(run, lambda atk=atk, xt=xt, yt=yt: atk(xt, yt)))
            (tj, tt, ratio), (tb, _, ratio_b) = times
            ej, et = B / tj, B / tt
            pct = 100 * ej * fl / peak
            tp = affine_time(affine, B)
            print(f"{name:22s} {B:4d} {ej:7.0f} {B / tb:7.0f} {et:12.0f} {ratio:6.2f} {ratio_b:6.2f} {pct:5.1f}% "
                  f"{100 * tp / tj:7.0f}% {tt / tp:9.2f}", flush=True)
            rows.append((name, B, ej, et))
            if args.loops and B > 1:
                for u in (1, 4, STEPS):
                    t = median_time(lambda u=u: pgd(net, xj, yj, EPS, key=key, steps=STEPS, loss="ce",  # noqa: B023
                                                    unroll=u), 7)
                    print(f"{'':22s} {'':4s} unroll={u:<3d} {B / t:8.0f} ex/s", flush=True)
    return rows


if __name__ == "__main__":
    main()
