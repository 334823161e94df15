"""``jaxrobust train``: a zoo network, standard or PGD adversarial training; preprocessing goes to ``OUT.json``."""
from __future__ import annotations

from .common import (
    check_output,
    command,
    download_option,
    load_data,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    preprocessing_options,
    warn_if_inaccurate,
)


def _options(p):
    p.add_argument("--arch", default="mlp:256,256",
                   help="mlp:H1,H2,... | conv_small | cnn:small|medium|large (default mlp:256,256)")
    p.add_argument("--activation", default="relu", choices=["relu", "sigmoid", "tanh"],
                   help="hidden activation of an mlp (default relu)")
    p.add_argument("--dataset", "-d", default="mnist", help="dataset spec (default mnist)")
    download_option(p)
    preprocessing_options(p)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--eps", type=nonneg_float, default=0.0, help="PGD adversarial training radius (0 = standard)")
    p.add_argument("--pgd-steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=nonneg_int, default=0, help="standard epochs before adversarial training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="output weights file (.msgpack); preprocessing goes to OUT.json")


def _arch(args):
    from .. import zoo
    from ..errors import InputError
    family, _, opts = args.arch.partition(":")
    try:
        if family == "mlp":
            return zoo.arch("mlp", hidden=[int(h) for h in (opts or "256,256").split(",")], activation=args.activation)
        if family == "cnn":
            return zoo.arch("cnn", size=opts or "small")
        return zoo.arch(family)
    except (ValueError, KeyError) as e:
        raise InputError(f"--arch {args.arch}: {e}") from None


@command("train", "train a zoo network (standard or PGD adversarial) and save its weights", _options)
def train_cmd(args):
    from pathlib import Path

    import jax

    from .. import zoo
    from ..loading import write_sidecar
    from ..network import with_preprocessing
    from ..training import train
    from ..weights import save_network
    check_output(args.out, "--out")
    a = _arch(args)
    tr, te = load_data(args, "train"), load_data(args, "test")
    a["input_shape"] = list(tr.x.shape[1:])
    a["num_classes"] = tr.num_classes
    plain = zoo.init(a, jax.random.PRNGKey(args.seed), name=Path(args.out).stem)
    net = with_preprocessing(plain, mean=args.mean, std=args.std, domain=args.domain)
    net.check_inputs(tr.x[:1], f"{tr.id} images")
    net, hist = train(net, tr.x, tr.y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                      eps=args.eps, eps_warmup=args.warmup, pgd_steps=args.pgd_steps, seed=args.seed)
    print(f"trained {net.name} on {tr.id} ({len(tr.y)} images), final loss {hist[-1]:.4f}")
    acc = warn_if_inaccurate(net, te.x, te.y, f"{te.id} ({len(te.y)} images)")
    print(f"test accuracy {acc:.4f} on {te.id} ({len(te.y)} images)")
    digest = save_network(plain.replace(params=net.params, domain=net.domain), args.out)
    side = write_sidecar(args.out, mean=args.mean, std=args.std, domain=args.domain)
    print(f"saved {args.out} (hash {digest})" + (f" and its preprocessing {side}" if side else ""))
