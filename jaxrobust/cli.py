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
    p.add_argument("--activation", default="relu", choices=["relu", "sigmoid", "tanh"],
                   help="hidden activation of an mlp (default relu)")
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
    from pathlib import Path

    import jax

    from . import zoo
    from .data import load_dataset
    from .training import accuracy, train
    from .weights import save_network
    family, _, opts = args.arch.partition(":")
    if family == "mlp":
        a = zoo.arch("mlp", hidden=[int(h) for h in (opts or "256,256").split(",")], activation=args.activation)
    elif family == "cnn":
        a = zoo.arch("cnn", size=opts or "small")
    else:
        a = zoo.arch(family)
    tr, te = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    a["input_shape"] = list(tr.x.shape[1:])
    a["num_classes"] = tr.num_classes
    net = zoo.init(a, jax.random.PRNGKey(args.seed), name=Path(args.out).stem)
    net, hist = train(net, tr.x, tr.y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                      eps=args.eps, eps_warmup=args.warmup, pgd_steps=args.pgd_steps, seed=args.seed)
    digest = save_network(net, args.out)
    print(f"trained {net.name} on {tr.name}/train ({len(tr.y)} images), final loss {hist[-1]:.4f}")
    print(f"test accuracy {accuracy(net, te.x, te.y):.4f} on {te.name}/test ({len(te.y)} images)")
    print(f"saved {args.out} (hash {digest})")


# --- critical-eps / distribution / demo -------------------------------------------------------
def _data_options(p):
    """The data selection shared by the per-input methods."""
    p.add_argument("--dataset", "-d", default="mnist", help="mnist | fashion_mnist | cifar10 | gtsrb, optionally NAME:PATH")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--indices", default="0:100", help="e.g. 0:100, 3,5,9 or 0:1000:10")


def _critical_eps_options(p):
    p.add_argument("--network", "-n", default="mnist-mlp",
                   help="bundled name (mnist-mlp, mnist-mlp-pgd), .onnx file or .msgpack weights")
    _data_options(p)
    p.add_argument("--oracle", default="crown", choices=["attack", "ibp", "crown", "alpha-crown", "complete"])
    p.add_argument("--tol", type=float, default=0.001, help="bisection tolerance (default 0.001)")
    p.add_argument("--grid-step", type=float, help="search the grid step, 2·step, ... ≤ eps-max instead (paper: 0.002)")
    p.add_argument("--eps-max", type=float, default=0.5, help="upper end of the search interval")
    p.add_argument("--attack-steps", type=int, default=40)
    p.add_argument("--targets", type=int, default=9,
                   help="wrong classes tried by the multi-targeted follow-up attack (0 = margin PGD only)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-query time limit of the complete oracle (s)")
    _bab_options(p)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64, help="inputs per committed chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--resume", action="store_true", help="skip inputs already stored with the same configuration")
    p.add_argument("--csv", help="also export all rows of the results file to this CSV")


def _search_config(args):
    from .critical_eps import SearchConfig
    grid = None
    if args.grid_step:
        import numpy as np
        grid = tuple(float(v) for v in np.round(np.arange(1, int(args.eps_max / args.grid_step + 1e-9) + 1)
                                                * args.grid_step, 10))
    return SearchConfig(eps_max=args.eps_max, tol=args.tol, grid=grid, seed=args.seed)


@command("critical-eps", "critical ε per input by batched bisection over an oracle, stored in HDF5",
         _critical_eps_options)
def critical_eps_cmd(args):
    from .critical_eps import CSV_COLUMNS, run
    from .data import load_dataset, parse_indices
    from .weights import load_network
    net = load_network(args.network)
    ds = load_dataset(args.dataset, args.split)
    idx = parse_indices(args.indices, len(ds.y))
    options = {"attack_steps": args.attack_steps, "targets": args.targets}
    if args.oracle == "complete":
        options.update(timeout=args.timeout, **_bab_config(args))
    store = run(net, ds, idx, args.oracle, _search_config(args), args.out, resume=args.resume, chunk=args.chunk,
                batch_size=args.batch_size, oracle_options=options)
    print(f"{len(store)} rows in {args.out}")
    if args.csv:
        print(f"wrote {store.to_csv(args.csv, CSV_COLUMNS)} rows to {args.csv}")


def _distribution_options(p):
    p.add_argument("results", help="HDF5 file written by critical-eps")
    p.add_argument("--by", default="network_name,split", help="grouping columns (default network_name,split)")
    p.add_argument("--plot", metavar="DIR", help="write ECDF, histogram and correlation PNGs here")
    p.add_argument("--bootstrap", type=int, default=1000, help="replicates of the Lilliefors-style bootstrap")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("distribution", "analyse critical-ε results: ECDF, log-normal fit + KS, train vs test, correlations",
         _distribution_options)
def distribution_cmd(args):
    from pathlib import Path

    from .distributions import summarize
    if not Path(args.results).is_file():
        raise FileNotFoundError(f"no results file {args.results}")
    out = summarize(args.results, by=tuple(args.by.split(",")), bootstrap=args.bootstrap, plot_dir=args.plot)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(_format_summary(out))


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _format_summary(out) -> str:
    lines = []
    for g in out["groups"]:
        name = " / ".join(str(v) for k, v in g.items() if k in ("network_name", "split", "network", "dataset", "oracle"))
        lines.append(f"{name}: n={g['n']}  " + "  ".join(f"{k}={v}" for k, v in g["status"].items()))
        lines.append(f"  median ε lower {_fmt(g['median_lower'])}  upper {_fmt(g['median_upper'])}  "
                     f"median time {_fmt(g['median_time_s'], '.3f')} s")
        if "lognormal" in g:
            f = g["lognormal"]
            lines.append(f"  log-normal fit (n={f['n']}): median {f['median']:.4f}, σ(log) {f['sigma']:.3f}; "
                         f"KS D={f['ks_statistic']:.3f} p={f['ks_p']:.3f}, bootstrap p={f['lilliefors_p']:.3f}")
    for c in out["comparisons"]:
        lines.append(f"train vs test {c.get('network_name', '')}: medians {c['median_a']:.4f} vs {c['median_b']:.4f}; "
                     f"KS p={c['ks_p']:.3g}, Mann-Whitney p={c['mannwhitney_p']:.3g}")
    if out["correlation"]:
        c = out["correlation"]
        lines.append("Spearman correlation across networks (shared inputs):")
        for i, n in enumerate(c["names"]):
            lines.append(f"  {n:>24} " + " ".join("   -  " if v != v else f"{v:6.2f}" for v in c["spearman"][i]))
    for p in out.get("plots", []):
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def _roma_options(p):
    p.add_argument("--network", "-n", action="append",
                   help="network (repeat to compare models on the same inputs and seeds; default mnist-mlp)")
    _data_options(p)
    p.add_argument("--eps", default="0.04", help="L∞ radius; a comma list runs an ε sweep")
    p.add_argument("--delta", type=float, default=0.6, help="confidence threshold δ of a confident misclassification")
    p.add_argument("--samples", type=int, default=10_000, help="perturbations per input")
    p.add_argument("--sampler", default="linf", choices=["linf", "l2", "gaussian"])
    p.add_argument("--significance", type=float, default=0.05, help="Anderson–Darling level (0.15, 0.10, 0.05, 0.025, 0.01)")
    p.add_argument("--confidence", type=float, default=0.95, help="Clopper–Pearson level of the Monte Carlo bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--csv", help="also export all rows to this CSV")
    p.add_argument("--plot", metavar="DIR", help="write per-class bars and plr-vs-ε PNGs here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


@command("roma", "RoMA probabilistic robustness: sampling, Anderson–Darling, Box-Cox, categorical robustness",
         _roma_options)
def roma_cmd(args):
    import numpy as np

    from . import plots
    from .data import load_dataset, parse_indices
    from .roma import CSV_COLUMNS, RomaConfig, categorical, compare_models, run
    from .weights import load_network
    ds = load_dataset(args.dataset, args.split)
    idx = parse_indices(args.indices, len(ds.y))
    eps_values = [float(e) for e in args.eps.split(",")]
    nets = [load_network(n) for n in (args.network or ["mnist-mlp"])]
    if len({n.name for n in nets}) < len(nets):  # keep labels apart when files share a name
        nets = [n.replace(name=f"{n.name}@{n.hash[:6]}") for n in nets]
    summary = {"networks": [], "comparisons": []}
    plr_by = {}
    for net in nets:
        for eps in eps_values:
            cfg = RomaConfig(eps=eps, delta=args.delta, samples=args.samples, sampler=args.sampler,
                             significance=args.significance, confidence=args.confidence, seed=args.seed)
            store = run(net, ds, idx, cfg, args.out, resume=args.resume)
            rows = store.read()
            m = ((rows["network"] == net.hash) & (rows["config"] == store.save_config({"method": "roma", **cfg._asdict()}))
                 & np.isin(rows["index"], ds.indices[idx]))
            r = {k: v[m] for k, v in rows.items()}
            ok = r["status"] != "FAIL"
            plr_by[(net.name, eps)] = dict(zip(r["index"].tolist(), r["log10_tail"].tolist()))
            summary["networks"].append({
                "network": net.name, "eps": eps, "inputs": int(m.sum()), "complete": float(ok.mean()),
                "plr_mean": float(np.nanmean(r["plr"])) if ok.any() else None,
                "median_log10_tail": float(np.nanmedian(r["log10_tail"])) if ok.any() else None,
                "mc_upper_mean": float(r["mc_upper"].mean()), "n_adversarial_total": int(r["n_adversarial"].sum()),
                "median_time_s": float(np.median(r["time_s"])),
                "per_class": [c._asdict() for c in categorical(r["label"], r["plr"], r["status"], r["mc_upper"])]})
    for eps in eps_values:
        for a in range(len(nets)):
            for b in range(a + 1, len(nets)):
                pa, pb = plr_by[(nets[a].name, eps)], plr_by[(nets[b].name, eps)]
                keys = sorted(set(pa) & set(pb))
                summary["comparisons"].append({"a": nets[a].name, "b": nets[b].name, "eps": eps,
                                               **compare_models([pa[k] for k in keys], [pb[k] for k in keys])})
    if args.csv:
        from .roma import COLUMNS, TABLE
        from .store import ResultStore
        ResultStore(args.out, TABLE, COLUMNS).to_csv(args.csv, CSV_COLUMNS)
    if args.plot:
        for e in summary["networks"]:
            plots.bars({str(c["label"]): c["plr_mean"] for c in e["per_class"]},
                       f"{args.plot}/plr_by_class_{e['network']}_eps{e['eps']:g}.png", ylabel="mean plr",
                       title=f"{e['network']}, ε={e['eps']:g}")
        if len(eps_values) > 1:
            plots.curves(eps_values, {n.name: [1 - e["plr_mean"] if e["plr_mean"] is not None else float("nan")
                                               for e in summary["networks"] if e["network"] == n.name] for n in nets},
                         f"{args.plot}/plr_vs_eps.png", xlabel="ε", ylabel="1 − mean plr", logy=True,
                         title="RoMA ε sweep")
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return
    for e in summary["networks"]:
        print(f"{e['network']}  ε={e['eps']:g}: {e['inputs']} inputs, complete {e['complete']:.3f}, "
              f"mean plr {_fmt(e['plr_mean'], '.6f')}, median log10 P(c>δ) {_fmt(e['median_log10_tail'], '.1f')}, "
              f"mean Monte Carlo upper bound {e['mc_upper_mean']:.2e}, {e['median_time_s'] * 1e3:.1f} ms/input")
        print("   class     n  complete  mean plr   var plr   t-test p  binom p")
        for c in e["per_class"]:
            print(f"   {c['label']:>5} {c['n']:>5}  {c['complete']:8.3f}  {_fmt(c['plr_mean'], '.6f')}  "
                  f"{_fmt(c['plr_var'], '.2e')}  {_fmt(c['t_p'], '.3g'):>8}  {_fmt(c['binom_p'], '.3g'):>7}")
    for c in summary["comparisons"]:
        print(f"{c['a']} vs {c['b']} at ε={c['eps']:g}: mean log10 P(c>δ) {_fmt(c['mean_a'], '.1f')} vs "
              f"{_fmt(c['mean_b'], '.1f')} on {c['n']} inputs, Wilcoxon p={c['wilcoxon_p']:.3g}")


def _global_options(p):
    from .generative import BOUND_METHODS, LATENT_BOX
    p.add_argument("--classifier", "-n", required=True, help="classifier: bundled name, .onnx or .msgpack weights")
    p.add_argument("--generator", "-g", required=True,
                   help="generator file: a generator set (.msgpack, jaxrobust.gan), the Keras DCGAN (.h5) or .onnx")
    p.add_argument("--class", dest="cls", type=int, help="only this class (default: every class of the set)")
    p.add_argument("--reference", help="reference classifier for an unconditional generator (agreement)")
    p.add_argument("--samples", type=int, default=10_000, help="Monte Carlo samples per class for correctness")
    p.add_argument("--eps", type=float, help="latent L∞ radius for global robustness (omit to skip robustness)")
    p.add_argument("--robust-samples", type=int, default=1000, help="latents per class for robustness")
    p.add_argument("--bounds", choices=BOUND_METHODS, default="ibp", help="verification of latent boxes")
    p.add_argument("--attack-steps", type=int, default=40, help="latent PGD steps")
    p.add_argument("--latent-box", type=float, default=LATENT_BOX, help="latent domain [-b, b]^d")
    p.add_argument("--confidence", type=float, default=0.95, help="Clopper–Pearson confidence level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--images", metavar="DIR", help="write PNGs of misclassified samples and adversarial pairs here")
    p.add_argument("--resume", action="store_true", help="skip classes already stored with the same configuration")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("global", "global correctness / robustness of a classifier on generated images (Fijalkow & Gupta)",
         _global_options)
def global_cmd(args):
    """``jaxrobust global``: print the per-class table (or JSON) of `generative.run_global`."""
    from .errors import InputError
    from .gan import load_generators
    from .generative import run_global
    from .weights import load_network

    classifier = load_network(args.classifier)
    generators = load_generators(args.generator)
    reference = load_network(args.reference) if args.reference else None
    if args.cls is not None:
        if None in generators:
            raise InputError(f"{args.generator} is an unconditional generator; --class does not apply")
        classes = [args.cls]
    else:
        classes = None
    if None in generators and reference is None and args.eps is None:
        raise InputError("an unconditional generator needs --reference (correctness) or --eps (robustness)")
    out = run_global(classifier, generators, args.out, classes=classes, samples=args.samples, eps=args.eps,
                     robust_samples=args.robust_samples, reference=reference, confidence=args.confidence,
                     bounds=args.bounds, attack_steps=args.attack_steps, seed=args.seed, latent_box=args.latent_box,
                     image_dir=args.images, resume=args.resume)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(format_global_summary(out))


def format_global_summary(out: dict) -> str:
    """Plain-text table of a `generative.run_global` summary."""
    conf = out["config"]["confidence"]
    lines = []
    if out["correctness"]:
        lines.append(f"global correctness of {out['classifier']} ({conf:.0%} Clopper–Pearson)")
        lines.append(f"{'class':>6} {'samples':>8} {'correct':>8} {'estimate':>9}  interval")
        for r in out["correctness"]:
            name = "all" if r["class"] < 0 else r["class"]
            lines.append(f"{name:>6} {r['samples']:>8} {r['correct']:>8} {r['estimate']:>9.4f}  "
                         f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
    if out["robustness"]:
        lines.append(f"global robustness, latent eps={out['config']['eps']} (verified / falsified / unknown)")
        for r in out["robustness"]:
            name = "all" if r["class"] < 0 else r["class"]
            cells = [f"{r[s] / r['samples']:.3f} [{r[s + '_low']:.3f}, {r[s + '_high']:.3f}]"
                     for s in ("verified", "falsified", "unknown")]
            lines.append(f"{name:>6} n={r['samples']:<6} " + "  ".join(cells))
    return "\n".join(lines)


def _demo_options(p):
    p.add_argument("--network", "-n", default="mnist-mlp", help="network (default: the bundled mnist-mlp)")
    p.add_argument("--images", type=int, default=100, help="number of MNIST test images (default 100)")
    p.add_argument("--out", "-o", help="keep the HDF5 results here (default: a temporary file)")


@command("demo", "critical-ε distribution of the bundled MNIST network on bundled test images, end to end",
         _demo_options)
def demo_cmd(args):
    import tempfile
    import time
    from pathlib import Path

    from .critical_eps import SearchConfig, run
    from .data import load_dataset, to_network_input
    from .distributions import summarize
    from .training import accuracy
    from .weights import load_network
    t0 = time.perf_counter()
    net = load_network(args.network)
    ds = load_dataset("mnist", "test")
    n = min(args.images, len(ds.y))
    acc = accuracy(net, to_network_input(ds.x, net.input_shape), ds.y)
    print(f"network {net.name} ({net.num_params:,} parameters, hash {net.hash}); "
          f"accuracy {acc:.4f} on {len(ds.y)} MNIST test images")
    print(f"critical ε of test images 0..{n - 1}: CROWN proofs + PGD counterexamples, bisection to 0.001")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "demo.h5")
        run(net, ds, range(n), "crown", SearchConfig(eps_max=0.3, tol=0.001), out, resume=True,
            oracle_options={"targets": 3})
        print(_format_summary(summarize(out, bootstrap=500)))
    print(f"done in {time.perf_counter() - t0:.1f} s")


# --- verify ----------------------------------------------------------------------------------
def _bab_options(p):
    """Budgets of the complete verifier (`verify.VerifyConfig`)."""
    p.add_argument("--max-domains", type=int, default=10 ** 7, help="subdomains bounded per query (default 10^7)")
    p.add_argument("--max-memory", default="1G",
                   help="memory of pending subdomains per query, e.g. 512M or 4G (default 1G)")
    p.add_argument("--branch", default="auto", choices=["auto", "neurons", "inputs"],
                   help="split subdomains on neurons, on the inputs, or auto: inputs for networks with <= 20 inputs")


def _bab_config(args) -> dict:
    from .errors import InputError
    text = str(args.max_memory).strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
    try:
        size = int(float(text.rstrip("KMGB") or "x") * scale)
    except ValueError:
        raise InputError(f"--max-memory must be a size such as 512M or 4G, got {args.max_memory!r}") from None
    if size < 2 ** 20:
        raise InputError(f"--max-memory must be at least 1M, got {args.max_memory!r}")
    if args.max_domains < 1:
        raise InputError(f"--max-domains must be >= 1, got {args.max_domains}")
    return {"max_domains": args.max_domains, "max_pool_bytes": size, "split": args.branch}


def _verify_options(p):
    p.add_argument("network", help=".onnx file, bundled name or .msgpack weights")
    p.add_argument("property", help="VNN-LIB property (.vnnlib)")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit in seconds (default 60)")
    p.add_argument("--seed", type=int, default=0)
    _bab_options(p)
    p.add_argument("--out", "-o", help="also write the VNN-COMP result file (result line + counterexample)")
    p.add_argument("--json", action="store_true", help="print JSON instead")


@command("verify", "complete verification of a VNN-LIB property: prints sat / unsat / unknown / timeout",
         _verify_options)
def verify_cmd(args):
    from . import vnnlib
    from .verify import VerifyConfig, verify_property
    from .weights import load_network
    cfg = VerifyConfig(timeout=args.timeout, seed=args.seed, **_bab_config(args))
    net = load_network(args.network)
    prop = vnnlib.load(args.property)
    r = verify_property(net, prop, cfg, progress=not args.json)
    text = r.result
    if r.result == "sat":
        pairs = [f"(X_{i} {v!r})" for i, v in enumerate(r.x.astype(float).tolist())]
        pairs += [f"(Y_{j} {v!r})" for j, v in enumerate(r.y.astype(float).tolist())]
        text += "\n(" + "\n ".join(pairs) + ")"
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(text + "\n")
    if args.json:
        out = {"result": r.result, "time_s": r.time_s, "domains": r.domains, "stage": r.stage}
        if r.result == "sat":
            out["x"], out["y"] = r.x.tolist(), r.y.tolist()
        print(json.dumps(out))
        return
    print(text)
    print(f"{r.result} in {r.time_s:.2f} s ({r.domains} subdomains, decided by {r.stage})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrobust", description="Robustness of neural-network classifiers in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        options(p)
        p.set_defaults(func=fn)
    return parser


def _compilation_cache():
    """Keep compiled XLA programs across runs (one process per query is common) in the cache directory;
    ``JAXROBUST_COMPILE_CACHE=0`` turns it off."""
    import os
    if os.environ.get("JAXROBUST_COMPILE_CACHE", "1") == "0":
        return
    import jax

    from .data import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _compilation_cache()
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
