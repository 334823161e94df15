"""The ``jaxrobust`` command line. Errors print as one line (``--debug`` for the traceback)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import JaxRobustError

COMMANDS = {}


def command(name: str, help: str, options):
    """Register ``fn(args)`` as subcommand ``name``; ``options(parser)`` adds its arguments."""
    def wrap(fn):
        COMMANDS[name] = (fn, help, options)
        return fn
    return wrap


# --- info ------------------------------------------------------------------------------------
def _info_options(p):
    p.add_argument("network", help="bundled name (mnist-mlp, mnist-mlp-pgd), .onnx file or .msgpack weights")
    p.add_argument("--dataset", "-d", help="dataset spec (mnist, mnist:PATH, cifar10, ...) to measure test accuracy")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("info", "input shape, ops, parameter count and accuracy of a network", _info_options)
def info(args):
    import jax
    from .weights import load_network
    net = load_network(args.network)
    jaxpr = jax.make_jaxpr(net.apply)(net.params, jax.ShapeDtypeStruct((1, *net.input_shape), "float32"))
    ops = {}
    for eqn in _all_eqns(jaxpr.jaxpr):
        ops[eqn.primitive.name] = ops.get(eqn.primitive.name, 0) + 1
    out = {"name": net.name, "hash": net.hash, "input_shape": list(net.input_shape),
           "num_classes": net.num_classes, "domain": list(net.domain), "parameters": net.num_params,
           "ops": dict(sorted(ops.items()))}
    if str(args.network).lower().endswith(".onnx"):
        from .onnx_import import onnx_summary
        out["onnx_ops"] = onnx_summary(args.network)["ops"]
    if args.dataset:
        from .data import load_dataset, to_network_input
        from .training import accuracy
        ds = load_dataset(args.dataset, "test")
        out["dataset"] = f"{ds.name}/{ds.split} ({len(ds.y)} images)"
        out["accuracy"] = accuracy(net, to_network_input(ds.x, net.input_shape), ds.y)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}×{b}" for a, b in v.items())
        print(f"{k:>12}: {v}")


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        subs = [p for p in eqn.params.values() if hasattr(p, "jaxpr") or hasattr(p, "eqns")]
        if subs:
            for s in subs:
                yield from _all_eqns(getattr(s, "jaxpr", s))
        else:
            yield eqn


# --- train -----------------------------------------------------------------------------------
def _train_options(p):
    p.add_argument("--arch", default="mlp:256,256",
                   help="mlp:H1,H2,... | conv_small | cnn:small|medium|large (default mlp:256,256)")
    p.add_argument("--dataset", "-d", default="mnist", help="dataset spec (default mnist)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=0.0, help="PGD adversarial training radius (0 = standard)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=0, help="standard epochs before adversarial training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="output weights file (.msgpack)")


@command("train", "train a zoo network (standard or PGD adversarial) and save its weights", _train_options)
def train_cmd(args):
    import jax
    from . import zoo
    from .data import load_dataset
    from .training import accuracy, train
    from .weights import save_network
    family, _, opts = args.arch.partition(":")
    if family == "mlp":
        a = zoo.arch("mlp", hidden=[int(h) for h in (opts or "256,256").split(",")])
    elif family == "cnn":
        a = zoo.arch("cnn", size=opts or "small")
    else:
        a = zoo.arch(family)
    tr, te = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    a["input_shape"] = list(tr.x.shape[1:])
    a["num_classes"] = tr.num_classes
    net = zoo.init(a, jax.random.PRNGKey(args.seed))
    net, hist = train(net, tr.x, tr.y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                      eps=args.eps, eps_warmup=args.warmup, pgd_steps=args.pgd_steps, seed=args.seed)
    digest = save_network(net, args.out)
    print(f"trained {net.name} on {tr.name}/train ({len(tr.y)} images), final loss {hist[-1]:.4f}")
    print(f"test accuracy {accuracy(net, te.x, te.y):.4f} on {te.name}/test ({len(te.y)} images)")
    print(f"saved {args.out} (hash {digest})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrobust", description="Robustness of neural-network classifiers in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        options(p)
        p.set_defaults(func=fn)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (JaxRobustError, FileNotFoundError, PermissionError) as e:
        if args.debug:
            raise
        print(f"jaxrobust {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
