"""IBP and CROWN throughput of `jaxrobust.kernels` against auto_LiRPA on identical weights.

    python benchmarks/bench_bounds.py [--shared ../shared] [--batches 1 32 256] [--eps 0.02]

Prints, per network / batch size / method: examples per second for both tools (medians of rounds
that alternate between them, so both see the same load) and the median of the per-round ratios, the
fraction of the float32 matmul peak (a 2048x2048 JAX matmul measured in the same run) reached by
jaxrobust's IBP (flops from XLA's cost analysis of the compiled program; not
shown for CROWN, whose chunking loop the cost analysis does not count reliably), for IBP the time of
its weight products alone at the same shapes (every dot / convolution with ``W`` and ``|W|``, nothing
else: the floor of any midpoint-radius IBP on this machine, and the ratio to auto_LiRPA it allows),
and how much looser and how much tighter jaxrobust's bounds (without its round-off margin) are than
auto_LiRPA's.
jaxrobust intersects CROWN bounds with interval bounds, so it can be much tighter (e.g. on a final
ReLU, whose CROWN lower bound may be negative). The load average is printed before and after, since
timings on a shared machine are noisy.

Needs ``pip install --no-deps auto-lirpa appdirs`` (auto_LiRPA 0.3); its incompatibilities with
current numpy/torch are patched at import time below, never in the installed package.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from common import matmul_peak, median_time, paired_times
from onnx import numpy_helper

from jaxrobust.kernels import crown, ibp
from jaxrobust.kernels._walk import _bind
from jaxrobust.kernels.bounds import _program
from jaxrobust.onnx_import import load_onnx

NETS = {
    "mnist-net_256x2": "networks/mnist/vnncomp2021_mnistfc/mnist-net_256x2.onnx",
    "mnist_relu_6_100": "networks/mnist/eran_ffnn/mnist_relu_6_100.onnx",
    "convSmallRELU__Point": "networks/mnist/eran_cnn/convSmallRELU__Point.onnx",
    "cnn-32-64-200": None,    # the zoo's max-pooling CNN (generative-model paper), weights of PRNGKey(0)
}


def import_auto_lirpa():
    """Import auto_LiRPA 0.3 with compatibility shims for numpy 2 and torch >= 2.6."""
    import torch
    shim = types.ModuleType("numpy.lib.arraysetops")
    shim.isin = np.isin
    sys.modules.setdefault("numpy.lib.arraysetops", shim)
    import torch.onnx.symbolic_helper as helper
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    helper._set_opset_version = lambda v: setattr(GLOBALS, "export_onnx_opset_version", v)
    torch._C.Node.__getitem__ = lambda node, k: getattr(node, node.kindOf(k))(k)
    warnings.filterwarnings("ignore")
    import auto_LiRPA
    return auto_LiRPA


def torch_model(path):
    """The same network as a torch ``nn.Sequential`` built from the ONNX initializers."""
    import torch
    from torch import nn
    model = onnx.load(str(path))
    w = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer}
    layers = [nn.Flatten()]
    relu_after = {n.input[0] for n in model.graph.node if n.op_type == "Relu"}
    flat_perm = any(n.op_type == "Transpose" for n in model.graph.node if n.op_type != "Gemm")
    conv_done = False
    for n in model.graph.node:
        if n.op_type == "Conv":
            wt, b = w[n.input[1]], w[n.input[2]]
            stride = next(a.ints for a in n.attribute if a.name == "strides")
            conv = nn.Conv2d(wt.shape[1], wt.shape[0], wt.shape[2:], stride=tuple(stride))
            conv.weight.data, conv.bias.data = torch.tensor(wt), torch.tensor(b)
            if layers and isinstance(layers[0], nn.Flatten):
                layers = []
            layers.append(conv)
            conv_done = True
        elif n.op_type == "Gemm":
            wt, b = w[n.input[1]], w[n.input[2]]
            if conv_done and flat_perm and not any(isinstance(m, nn.Linear) for m in layers):
                # the ONNX graph flattens NHWC; permute the columns to torch's NCHW flatten
                c = layers[-2].out_channels if isinstance(layers[-1], nn.ReLU) else layers[-1].out_channels
                hw = round((wt.shape[1] // c) ** 0.5)
                wt = wt.reshape(-1, hw, hw, c).transpose(0, 3, 1, 2).reshape(wt.shape[0], -1)
                layers.append(nn.Flatten())
            lin = nn.Linear(wt.shape[1], wt.shape[0])
            lin.weight.data, lin.bias.data = torch.tensor(wt), torch.tensor(b)
            layers.append(lin)
        else:
            continue
        if n.output[0] in relu_after:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def zoo_cnn():
    """The zoo's ``cnn`` (small: conv 32 / 64 3x3 SAME, max-pool 2, dense 200) with ``PRNGKey(0)`` weights, and
    the same network in torch, on NCHW inputs (``model.nchw``), flattened in NHWC order as Flax does."""
    import torch
    from torch import nn

    from jaxrobust import zoo
    net = zoo.init(zoo.arch("cnn", size="small"), jax.random.PRNGKey(0))
    p = {k: {n: torch.tensor(np.asarray(a)) for n, a in v.items()} for k, v in net.params["params"].items()}

    def conv(k):
        m = nn.Conv2d(*p[k]["kernel"].shape[2:], 3, padding=1)
        m.weight.data, m.bias.data = p[k]["kernel"].permute(3, 2, 0, 1).contiguous(), p[k]["bias"]
        return m

    def dense(k):
        m = nn.Linear(*p[k]["kernel"].shape)
        m.weight.data, m.bias.data = p[k]["kernel"].T.contiguous(), p[k]["bias"]
        return m

    class FlatNhwc(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    pool = lambda: nn.MaxPool2d(2, 2)
    model = nn.Sequential(conv("Conv_0"), nn.ReLU(), pool(), conv("Conv_1"), nn.ReLU(), pool(),
                          FlatNhwc(), dense("Dense_0"), nn.ReLU(), dense("Dense_1"))
    model.nchw = True
    return net, model.eval()


def to_torch(model, x):
    """``x`` in the layout ``model`` takes (NHWC images as NCHW where the model says so)."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if getattr(model, "nchw", False) else x


def xla_flops(jitted, *args):
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def products_time(prog, B):
    """Median seconds of the weight products of an IBP pass at batch ``B``: each dot / convolution of
    ``prog``'s graph applied to an input of its shape, once with ``W`` and once with ``|W|``."""
    g = prog.graph
    nodes = [n for n in g.nodes if n.kind == "linear" and "abs" in n.extra]
    xs = [jnp.full((B,) + g.shape(n.bounded()[0])[1:], 0.5, jnp.float32) for n in nodes]

    @jax.jit
    def products(consts, xs):
        return [jax.vmap(lambda x, n=n, a=a: _bind(n, consts, [x[None]], absolute=a)[0])(x)
                for n, x in zip(nodes, xs) for a in (False, True)]

    return median_time(lambda: products(prog.consts, xs), 7)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--methods", nargs="+", default=["IBP", "CROWN"])
    ap.add_argument("--eps", type=float, default=0.02)
    args = ap.parse_args()

    import torch
    al = import_auto_lirpa()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shared = Path(args.shared)
    mnist = np.load(shared / "data" / "mnist.npz")
    images = mnist["x_test"][: max(args.batches)].astype(np.float32) / 255.0
    peak = matmul_peak()
    print(f"jax float32 2048^2 matmul peak: {peak / 1e9:.1f} GFLOP/s  "
          f"(devices: {jax.devices()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()})")
    head = (f"{'network':22s} {'B':>4s} {'method':6s} {'jaxrobust ex/s':>14s} {'auto_LiRPA ex/s':>15s} "
            f"{'ratio':>6s} {'%peak':>6s} {'products':>8s} {'max ratio':>9s} {'looser':>9s} {'tighter':>9s}")
    print(head)
    print("-" * len(head))
    for name in args.nets:
        if NETS[name] is None:
            net, tmodel = zoo_cnn()
        else:
            net, tmodel = load_onnx(shared / NETS[name]), torch_model(shared / NETS[name])
        zero = torch.tensor(to_torch(tmodel, np.zeros((1,) + net.input_shape, np.float32)))
        bmodel = al.BoundedModule(tmodel, zero, device="cpu")
        bmodel.nchw = getattr(tmodel, "nchw", False)
        for B in args.batches:
            x = images[:B].reshape((B,) + net.input_shape)
            with torch.no_grad():
                ref_out = tmodel(torch.tensor(to_torch(tmodel, x))).numpy()
            assert np.allclose(np.asarray(net(jnp.asarray(x))), ref_out, atol=1e-4), "models differ"
            for method in args.methods:
                print(row(al, net, bmodel, name, x, args.eps, method, peak), flush=True)
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")


def row(al, net, bmodel, name, x, eps, method, peak):
    """One table row: both tools bound ``method`` on the eps-boxes around ``x`` (clipped to [0, 1])."""
    import torch
    B = len(x)
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    jlo, jhi = jnp.asarray(lo), jnp.asarray(hi)
    bound = ibp if method == "IBP" else crown
    tx, tlo, thi = (torch.tensor(to_torch(bmodel, a)) for a in (x, lo, hi))
    bx = al.BoundedTensor(tx, al.PerturbationLpNorm(norm=np.inf, x_L=tlo, x_U=thi))

    def run_j():
        return jax.block_until_ready(bound(net, jlo, jhi, sound_margin=False))

    def run_t():
        with torch.no_grad():
            return bmodel.compute_bounds(x=(bx,), method=method)

    tj, tt, ratio = paired_times(run_j, run_t)
    bj, bt = run_j(), run_t()
    dl = bt[0].numpy() - np.asarray(bj.lower)
    du = np.asarray(bj.upper) - bt[1].numpy()
    looser, tighter = max(dl.max(), du.max(), 0.0), max(-dl.min(), -du.min(), 0.0)
    pct, floor = "     -", f"{'-':>8s} {'-':>9s}"
    if method == "IBP":
        prog = _program(net, net.input_shape, jnp.float32)
        pct = f"{100 * xla_flops(prog.ibp, prog.consts, jlo, jhi, False) / tj / peak:5.1f}%"
        tp = products_time(prog, B)
        floor = f"{100 * tp / tj:7.0f}% {tt / tp:9.2f}"
    return (f"{name:22s} {B:4d} {method:6s} {B / tj:14.0f} {B / tt:15.0f} {ratio:6.2f} "
            f"{pct} {floor} {looser:9.2e} {tighter:9.2e}")

if __name__ == "__main__":
    main()
