"""``jaxrobust train``: a zoo network, standard, PGD adversarial or certified (IBP, CROWN-IBP) training;
preprocessing goes to ``OUT.json``."""
from __future__ import annotations

import argparse

from .common import (
    check_output,
    command,
    download_option,
    float_list,
    load_data,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    preprocessing_options,
    warn_if_inaccurate,
)


def unit_pair(text) -> tuple[float, float]:
    """``"1,0.5"`` -> ``(1.0, 0.5)``: two numbers in [0, 1]."""
    values = float_list(text)
    if len(values) != 2 or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected START,END in [0, 1], got {text!r}")
    return values


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
    p.add_argument("--method", choices=["standard", "pgd", "ibp", "crown-ibp"],
                   help="training method (default pgd when --eps > 0, else standard)")
    p.add_argument("--eps", type=nonneg_float, default=0.0, help="training radius of pgd, ibp and crown-ibp")
    p.add_argument("--pgd-steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=nonneg_int, default=0, help="standard epochs before robust training")
    p.add_argument("--ramp", type=nonneg_int, default=0,
                   help="ibp / crown-ibp: epochs over which eps grows linearly from 0 (with kappa and beta)")
    p.add_argument("--kappa", type=unit_pair, metavar="START,END",
                   help="ibp / crown-ibp: weight of the clean loss over the ramp (default 1,0.5)")
    p.add_argument("--beta", type=unit_pair, metavar="START,END",
                   help="crown-ibp: weight of CROWN-IBP against IBP bounds over the ramp (default 1,0)")
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


def _method_options(args) -> dict:
    """The method options of `training.train`, checked (`InputError` naming the offending option)."""
    from ..errors import InputError
    from ..training import check_method_options
    kw = {"eps": args.eps, "eps_warmup": args.warmup, "eps_ramp": args.ramp,
          "kappa": args.kappa or (1.0, 0.5), "beta": args.beta or (1.0, 0.0)}
    kw["method"] = check_method_options(args.method, epochs=args.epochs, **kw)
    for option, value, methods in (("--kappa", args.kappa, ("ibp", "crown-ibp")), ("--beta", args.beta, ("crown-ibp",))):
        if value and kw["method"] not in methods:
            raise InputError(f"{option} applies to --method {' or '.join(methods)}, not {kw['method']}")
    return kw


@command("train", "train a zoo network (standard, PGD adversarial, IBP or CROWN-IBP) and save its weights", _options)
def train_cmd(args):
    from pathlib import Path

    import jax

    from .. import zoo
    from ..loading import write_sidecar
    from ..network import with_preprocessing
    from ..training import train
    from ..weights import save_network
    check_output(args.out, "--out")
    method = _method_options(args)
    a = _arch(args)
    tr, te = load_data(args, "train"), load_data(args, "test")
    a["input_shape"] = list(tr.x.shape[1:])
    a["num_classes"] = tr.num_classes
    plain = zoo.init(a, jax.random.PRNGKey(args.seed), name=Path(args.out).stem)
    net = with_preprocessing(plain, mean=args.mean, std=args.std, domain=args.domain)
    net.check_inputs(tr.x[:1], f"{tr.id} images")
    net, hist = train(net, tr.x, tr.y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                      pgd_steps=args.pgd_steps, seed=args.seed, **method)
    print(f"trained {net.name} on {tr.id} ({len(tr.y)} images, {method['method']}"
          + (f" at eps {args.eps}" if args.eps else "") + f"), final loss {hist[-1]:.4f}")
    acc = warn_if_inaccurate(net, te.x, te.y, f"{te.id} ({len(te.y)} images)")
    print(f"test accuracy {acc:.4f} on {te.id} ({len(te.y)} images)")
    digest = save_network(plain.replace(params=net.params, domain=net.domain), args.out)
    side = write_sidecar(args.out, mean=args.mean, std=args.std, domain=args.domain)
    print(f"saved {args.out} (hash {digest})" + (f" and its preprocessing {side}" if side else ""))


def _gan_options(p):
    p.add_argument("--dataset", "-d", default="mnist", help="dataset spec (default mnist)")
    download_option(p)
    p.add_argument("--classes", help="comma-separated classes, one GAN each (default every class)")
    p.add_argument("--conditional", action="store_true", help="one class-conditional GAN instead of one per class")
    p.add_argument("--steps", type=positive_int, default=2000, help="generator/discriminator update pairs")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--latent-dim", type=positive_int, default=10)
    p.add_argument("--augment", action="store_true", help="train on randomly rotated / sheared / shifted / zoomed images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="output generator set (.msgpack), input of `jaxrobust global`")


@command("train-gan", "train per-class (or one class-conditional) MLP GANs for `jaxrobust global`", _gan_options)
def train_gan_cmd(args):
    import numpy as np

    from ..errors import InputError
    from ..gan import save_generators, train_gans
    check_output(args.out, "--out")
    classes = None
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise InputError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    ds = load_data(args, "train")
    bad = sorted(set(classes or []) - set(np.unique(ds.y).tolist()))
    if bad:
        raise InputError(f"--classes: {ds.id} has no images of class {bad[0]}")
    gens, losses = train_gans(ds.x, ds.y, classes=classes, conditional=args.conditional, steps=args.steps,
                              batch_size=args.batch_size, learning_rate=args.lr, latent_dim=args.latent_dim,
                              augment=args.augment, seed=args.seed)
    digest = save_generators(gens, args.out, meta={"dataset": ds.id, "steps": args.steps, "augment": args.augment})
    final = np.asarray(losses)[-1].reshape(-1, 2).mean(0)
    print(f"trained {len(gens)} generator(s) for classes {sorted(gens)} on {ds.id}; final losses discriminator "
          f"{final[0]:.3f}, generator {final[1]:.3f}")
    print(f"saved {args.out} (hash {digest})")
