"""``jaxrobust distribution``: critical-ε distributions of a results file, one group per network, data set and
configuration (never pooled), with the rows set aside counted."""
from __future__ import annotations

import json

from .common import check_output, command, fmt, nonneg_int


def _options(p):
    p.add_argument("results", help="HDF5 file written by critical-eps")
    p.add_argument("--by", default="network_name,split",
                   help="grouping columns, any stored key (network_name, split, oracle, config, ...); rows of "
                        "different networks, data sets or configurations are never pooled (default network_name,split)")
    p.add_argument("--plot", metavar="DIR", help="write ECDF, histogram and correlation figures (PNG and PDF) here")
    p.add_argument("--bootstrap", type=nonneg_int, default=1000, help="replicates of the goodness-of-fit bootstrap")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("distribution", "analyse critical-ε results: ECDF, log-normal fit + KS, train vs test, correlations",
         _options)
def distribution_cmd(args):
    from ..distributions import summarize
    check_output(args.plot, "--plot", folder=True)
    by = tuple(k.strip() for k in args.by.split(",") if k.strip())
    out = summarize(args.results, by=by, bootstrap=args.bootstrap, plot_dir=args.plot)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(format_summary(out))


def format_summary(out) -> str:
    """Plain-text report of a `distributions.summarize` result."""
    lines = []
    for g in out["groups"]:
        config = "" if g["config_name"] in g["label"] else f" [{g['config_name']}]"
        lines.append(f"{g['label']}{config}  (values: {g['bound']} bounds)")
        lines.append(f"  n={g['n']}  " + "  ".join(f"{k}={v}" for k, v in g["status"].items()))
        lines.append(f"  median ε lower {fmt(g['median_lower'])}  upper {fmt(g['median_upper'])}  "
                     f"median time {fmt(g['median_time_s'], '.3f')} s")
        aside = ", ".join(f"{v} {k}" for k, v in g["set_aside"].items())
        lines.append(f"  fitted: {g['n_fit']} observed + {g['n_censored']} right-censored; "
                     f"set aside: {aside or 'none'}")
        if "lognormal" in g:
            f = g["lognormal"]
            lines.append(f"  log-normal fit: median {f['median']:.4f}, σ(log) {f['sigma']:.3f}; "
                         f"KS D={f['ks_statistic']:.3f} p={fmt(f['ks_p'], '.3f')}, bootstrap p={f['lilliefors_p']:.3f}")
        else:
            lines.append("  log-normal fit: fewer than 3 observed values")
    for c in out["comparisons"]:
        lines.append(f"train vs test ({c['train']} / {c['test']}): medians {c['median_a']:.4f} vs {c['median_b']:.4f}; "
                     f"KS p={c['ks_p']:.3g}, Mann-Whitney p={c['mannwhitney_p']:.3g}")
    if out["correlation"]:
        c = out["correlation"]
        lines.append("Spearman correlation across groups (shared inputs):")
        for i, n in enumerate(c["names"]):
            lines.append(f"  {n:>24} " + " ".join("   -  " if v != v else f"{v:6.2f}" for v in c["spearman"][i]))
    for p in out.get("plots", []):
        lines.append(f"plot: {p}")
    return "\n".join(lines)
