"""``jaxrobust roma``: RoMA probabilistic robustness per input, per class and across ε and networks; with
``--estimator``, Monte Carlo and adaptive multilevel splitting estimates of the same ``P(c > δ)`` beside it."""
from __future__ import annotations

import argparse
import json

from .common import (
    check_output,
    check_results_file,
    command,
    data_options,
    fmt,
    load_data,
    load_net,
    nonneg_list,
    open_unit,
    positive_int,
    preprocessing_options,
    scale,
    scale_options,
    selection,
    unit,
    warn_if_inaccurate,
)

FAIL = "FAIL"
SET_ASIDE = (FAIL, "misclassified")  # statuses without a fitted plr


def _options(p):
    p.add_argument("--network", "-n", action="append",
                   help="network (repeat to compare models on the same inputs and seeds; default mnist-mlp)")
    preprocessing_options(p)
    data_options(p)
    p.add_argument("--eps", type=nonneg_list, default=(0.04,),
                   help="radius of the --sampler ball (Gaussian: standard deviation); a comma list runs an ε sweep")
    p.add_argument("--delta", type=unit, default=0.6, help="confidence threshold δ of a confident misclassification")
    p.add_argument("--samples", type=positive_int, default=10_000, help="perturbations per input")
    p.add_argument("--sampler", default="linf", choices=["linf", "l2", "l1", "gaussian"],
                   help="perturbation law: uniform in the L∞, L2 or L1 ball (∩ domain), or Gaussian")
    p.add_argument("--significance", type=float, default=0.05, choices=[0.15, 0.10, 0.05, 0.025, 0.01],
                   help="Anderson–Darling level (0.15, 0.10, 0.05, 0.025, 0.01)")
    p.add_argument("--confidence", type=open_unit, default=0.95,
                   help="Clopper–Pearson level of the Monte Carlo bounds and level of the AMLS interval")
    p.add_argument("--estimator", type=_estimators, default=("roma",),
                   help="comma list of roma, mc (plain Monte Carlo with --mc-samples samples) and amls (adaptive "
                        "multilevel splitting): estimates of P(c > δ) stored in each row; RoMA's fit always runs "
                        "(default roma)")
    p.add_argument("--mc-samples", type=positive_int, default=1_000_000, help="samples per input of --estimator mc")
    p.add_argument("--amls-particles", type=positive_int, default=10_000, help="AMLS particles N")
    p.add_argument("--amls-rho", type=open_unit, default=0.1, help="AMLS fraction of particles kept per level ρ")
    p.add_argument("--amls-steps", type=positive_int, default=10, help="AMLS Metropolis–Hastings moves per level M")
    p.add_argument("--amls-max-levels", type=positive_int, default=50,
                   help="AMLS levels before a run stops with an upper bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--resume", action="store_true")
    scale_options(p)
    p.add_argument("--csv", help="also export all rows to this CSV")
    p.add_argument("--plot", metavar="DIR", help="write per-class bars and plr-vs-ε figures (PNG and PDF) here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _estimators(text) -> tuple:
    """``--estimator``: a comma list of `rare_events.ESTIMATORS`, RoMA always among them."""
    from ..errors import InputError
    from ..rare_events import parse_estimators
    try:
        return parse_estimators(f"roma,{text}")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@command("roma", "RoMA probabilistic robustness: sampling, Anderson–Darling, Box-Cox, categorical robustness",
         _options)
def roma_cmd(args):
    import numpy as np

    from ..data import parse_indices
    from ..errors import InputError
    from ..kernels.amls import AmlsConfig
    from ..rare_events import COLUMNS as ESTIMATE_COLUMNS
    from ..rare_events import EstimatorConfig
    from ..rare_events import check_config as check_estimators
    from ..roma import CSV_COLUMNS, RomaConfig, categorical, compare_models, config_key, run
    check_results_file(args.out, "--out")
    check_output(args.csv, "--csv")
    check_output(args.plot, "--plot", folder=True)
    if args.samples < 3:
        raise InputError(f"--samples must be at least 3, got {args.samples}")
    est = EstimatorConfig(args.estimator, args.mc_samples,
                          AmlsConfig(args.amls_particles, args.amls_rho, args.amls_steps, args.amls_max_levels,
                                     args.confidence))
    check_estimators(est)
    ds = load_data(args)
    idx = parse_indices(args.indices, len(ds.y))
    nets = [load_net(n, args) for n in (args.network or ["mnist-mlp"])]
    if len({n.name for n in nets}) < len(nets):  # keep labels apart when files share a name
        nets = [n.replace(name=f"{n.name}@{n.hash[:6]}") for n in nets]
    for net in nets:
        warn_if_inaccurate(net, selection(net, ds, idx), ds.y[idx], f"{ds.id} images {args.indices}")
    summary = {"networks": [], "comparisons": []}
    tails = {}
    for net in nets:
        for eps in args.eps:
            cfg = RomaConfig(eps=eps, delta=args.delta, samples=args.samples, sampler=args.sampler,
                             significance=args.significance, confidence=args.confidence, seed=args.seed)
            store = run(net, ds, idx, cfg, args.out, resume=args.resume, estimators=est, **scale(args))
            rows = store.read()
            m = ((rows["network"] == net.hash) & (rows["config"] == store.save_config(config_key(cfg, est)))
                 & np.isin(rows["index"], ds.indices[idx]))
            r = {k: v[m] for k, v in rows.items()}
            summary["networks"].append(_summary(net.name, eps, r, categorical, est.estimators))
            tails[(net.name, eps)] = dict(zip(r["index"].tolist(), r["log10_tail"].tolist()))
    for eps in args.eps:
        for a in range(len(nets)):
            for b in range(a + 1, len(nets)):
                ta, tb = tails[(nets[a].name, eps)], tails[(nets[b].name, eps)]
                keys = sorted(set(ta) & set(tb))
                summary["comparisons"].append({"a": nets[a].name, "b": nets[b].name, "eps": eps,
                                               **compare_models([ta[k] for k in keys], [tb[k] for k in keys])})
    if args.csv:
        from ..roma import COLUMNS, TABLE
        from ..store import ResultStore
        extra = tuple(ESTIMATE_COLUMNS) if len(est.estimators) > 1 else ()
        ResultStore(args.out, TABLE, COLUMNS).to_csv(args.csv, CSV_COLUMNS + extra)
    if args.plot:
        summary["plots"] = _plots(summary, nets, args)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return
    print(format_roma(summary))


def _summary(name, eps, r, categorical, estimators=("roma",)) -> dict:
    """One network at one ε: status counts by name, plr aggregates over the fitted inputs only, per class; with
    other estimators, their aggregates over the correctly classified inputs."""
    import numpy as np
    st = r["status"].astype(str)
    fitted = ~np.isin(st, SET_ASIDE)
    classes = []
    for c in categorical(r["label"], r["plr"], st, r["mc_upper"]):
        m = r["label"] == c.label
        k = int((fitted & m).sum())
        half = _half_width(c.plr_var, k)
        classes.append({**c._asdict(), "fitted": k, "fail": int((st[m] == FAIL).sum()),
                        "plr_low": c.plr_mean - half, "plr_high": c.plr_mean + half})
    return {"network": name, "eps": eps, "inputs": int(len(st)),
            "status": {s: int((st == s).sum()) for s in sorted(set(st))},
            "complete": float(fitted.mean()) if len(st) else None,
            "plr_mean": float(np.mean(r["plr"][fitted])) if fitted.any() else None,
            "median_log10_tail": float(np.median(r["log10_tail"][fitted])) if fitted.any() else None,
            "mc_upper_mean": float(r["mc_upper"].mean()) if len(st) else None,
            "n_adversarial_total": int(r["n_adversarial"].sum()),
            "tail_bound": int(np.sum(r["tail_bound"][fitted])) if "tail_bound" in r else 0,
            "median_time_s": float(np.median(r["time_s"])) if len(st) else None, "per_class": classes,
            **_estimates(r, st != "misclassified", estimators)}


def _estimates(r, seen, estimators) -> dict:
    """Aggregates of the Monte Carlo and AMLS columns over the rows ``seen``."""
    import numpy as np
    med = lambda a: float(np.median(a)) if len(a) else None
    out = {}
    if "mc" in estimators:
        out["mc"] = {"samples": int(r["mc_samples"][seen][0]) if seen.any() else None,
                     "inputs_with_hits": int((r["mc_count"][seen] > 0).sum()),
                     "median_p": med(r["mc_p"][seen]), "median_high": med(r["mc_high"][seen])}
    if "amls" in estimators:
        lp = r["amls_log10_p"][seen]
        out["amls"] = {"median_log10_p": med(lp), "capped": int(r["amls_capped"][seen].sum()),
                       "zero": int(np.isneginf(lp).sum()), "mean_acceptance": med(r["amls_acceptance"][seen]),
                       "median_forward": med(r["amls_forward"][seen])}
    return out


def _half_width(var, k, level=0.95) -> float:
    """Half-width of the t interval of a mean of ``k`` values with sample variance ``var`` (NaN if k < 2)."""
    from scipy import stats
    return float(stats.t.ppf(0.5 + level / 2, k - 1) * (var / k) ** 0.5) if k >= 2 and var == var else float("nan")


def _plots(summary, nets, args) -> list[str]:
    from .. import plots
    paths = []
    for e in summary["networks"]:
        cls = e["per_class"]
        paths += plots.bars({str(c["label"]): c["plr_mean"] for c in cls},
                            f"{args.plot}/plr_by_class_{e['network']}_eps{e['eps']:g}.png",
                            intervals={str(c["label"]): (c["plr_low"], c["plr_high"]) for c in cls},
                            counts={str(c["label"]): c["n"] for c in cls}, failed={str(c["label"]): c["fail"] for c in cls},
                            xlabel="class (n = inputs of the class; FAIL = fits that failed)",
                            ylabel="mean plr (fitted inputs, 95% t interval)",
                            title=f"RoMA {e['network']}, ε={e['eps']:g}, δ={args.delta:g}: plr per class")
    if len(args.eps) > 1:
        tail = {n.name: [1 - e["plr_mean"] if e["plr_mean"] is not None else float("nan")
                         for e in summary["networks"] if e["network"] == n.name] for n in nets}
        paths += plots.curves(args.eps, tail, f"{args.plot}/plr_vs_eps.png", floor=1 / args.samples, logy=True,
                              xlabel="ε (L∞)",
                              ylabel=f"1 − mean plr = mean P(confidence > δ={args.delta:g})",
                              title="RoMA ε sweep (fitted inputs; FAIL and misclassified set aside)")
    return [str(p) for p in paths]


def format_roma(summary) -> str:
    lines = []
    for e in summary["networks"]:
        status = ", ".join(f"{k} {v}" for k, v in e["status"].items())
        lines.append(f"{e['network']}  ε={e['eps']:g}: {e['inputs']} inputs ({status}); mean plr "
                     f"{fmt(e['plr_mean'], '.6f')}, median log10 P(c>δ) {fmt(e['median_log10_tail'], '.1f')} "
                     f"over fitted inputs ({e['tail_bound']} of them a bound: tail below 1/n); mean Monte Carlo upper bound {fmt(e['mc_upper_mean'], '.2e')}, "
                     f"{fmt(e['median_time_s'] and e['median_time_s'] * 1e3, '.1f')} ms/input")
        lines.append("   class     n  misclassified  FAIL  complete  mean plr   95% interval           var plr   t-test p"
                     "  binom p")
        for c in e["per_class"]:
            lines.append(f"   {c['label']:>5} {c['n']:>5}  {c.get('misclassified', 0):>13} {c['fail']:>5}  "
                         f"{fmt(c['complete'], '8.3f')}  "
                         f"{fmt(c['plr_mean'], '.6f'):>8}   [{fmt(c['plr_low'], '.6f')}, {fmt(c['plr_high'], '.6f')}]  "
                         f"{fmt(c['plr_var'], '.2e'):>8}  {fmt(c['t_p'], '.3g'):>8}  {fmt(c['binom_p'], '.3g'):>7}")
        if "mc" in e:
            m = e["mc"]
            lines.append(f"   Monte Carlo ({m['samples']} samples/input): {m['inputs_with_hits']} inputs with samples "
                         f"c > δ, median estimate {fmt(m['median_p'], '.2e')}, median Clopper–Pearson upper end "
                         f"{fmt(m['median_high'], '.2e')}")
        if "amls" in e:
            a = e["amls"]
            lines.append(f"   AMLS: median log10 P(c>δ) {fmt(a['median_log10_p'], '.2f')} ({a['capped']} capped: upper "
                         f"bounds; {a['zero']} with no particle past a level), median acceptance "
                         f"{fmt(a['mean_acceptance'], '.2f')}, median {fmt(a['median_forward'], '.3g')} forward passes")
    for c in summary["comparisons"]:
        lines.append(f"{c['a']} vs {c['b']} at ε={c['eps']:g}: mean log10 P(c>δ) {fmt(c['mean_a'], '.1f')} vs "
                     f"{fmt(c['mean_b'], '.1f')} on {c['n']} inputs, Wilcoxon p={c['wilcoxon_p']:.3g}")
    for p in summary.get("plots", []):
        lines.append(f"plot: {p}")
    return "\n".join(lines)
