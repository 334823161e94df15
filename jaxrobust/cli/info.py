"""``jaxrobust info``: shapes, ops, parameters, preprocessing and accuracy of a network."""
from __future__ import annotations

import json

from .common import command, download_option, load_data, load_net, preprocessing_options, selection, warn_if_inaccurate


def _options(p):
    p.add_argument("network", help="bundled name (mnist-mlp, mnist-mlp-pgd, mnist-certified), .onnx file or .msgpack weights")
    preprocessing_options(p)
    p.add_argument("--dataset", "-d", help="dataset spec (mnist, mnist:PATH, cifar10, ...) to measure accuracy on")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--indices", default="all", help="images to measure accuracy on (default all), e.g. :1000")
    download_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")


@command("info", "input shape, ops, parameters, preprocessing and accuracy of a network", _options)
def info(args):
    import jax

    from ..data import parse_indices
    from ..network import preprocessing_of
    net = load_net(args.network, args)
    jaxpr = jax.make_jaxpr(net.apply)(net.params, jax.ShapeDtypeStruct((1, *net.input_shape), "float32"))
    ops = {}
    for eqn in _all_eqns(jaxpr.jaxpr):
        ops[eqn.primitive.name] = ops.get(eqn.primitive.name, 0) + 1
    out = {"name": net.name, "hash": net.hash, "input_shape": list(net.input_shape),
           "num_classes": net.num_classes, "domain": list(net.domain), "preprocessing": preprocessing_of(net),
           "parameters": net.num_params, "ops": dict(sorted(ops.items()))}
    if str(args.network).lower().endswith(".onnx"):
        from ..onnx_import import onnx_summary
        out["onnx_ops"] = onnx_summary(args.network)["ops"]
    if args.dataset:
        ds = load_data(args)
        idx = parse_indices(args.indices, len(ds.y))
        out["dataset"] = f"{ds.id} ({len(idx)} images)"
        out["accuracy"] = warn_if_inaccurate(net, selection(net, ds, idx), ds.y[idx], out["dataset"])
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}×{b}" if k == "ops" or k == "onnx_ops" else f"{a} {b}" for a, b in v.items())
        print(f"{k:>13}: {'-' if v is None else v}")


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        subs = [p for p in eqn.params.values() if hasattr(p, "jaxpr") or hasattr(p, "eqns")]
        if subs:
            for s in subs:
                yield from _all_eqns(getattr(s, "jaxpr", s))
        else:
            yield eqn
