"""Figures: ECDFs of critical ε with fitted log-normal and [proved, counterexample] bracket, histograms on shared
bins, correlation heat maps, per-class bars with intervals and counts, curves over ε. Every function writes
``PATH`` as PNG and the same figure as PDF next to it (Agg backend, no display) and returns both paths; every
figure names the bound it plots (proved / counterexample / bracket) where it plots one."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

BOUND_LABELS = {"proved": "proved lower bound on critical ε", "counterexample": "counterexample upper bound on critical ε",
                "bracket": "critical ε bracket: proved ≤ ε* ≤ counterexample"}


def _save(fig, path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path.with_suffix(".png"), path.with_suffix(".pdf")


def _legend(ax, n):
    ax.legend(fontsize=7 if n <= 8 else 6, ncol=1 if n <= 8 else 2, frameon=False)


def ecdf(curves: dict, path, *, fit: dict | None = None, title: str = "critical ε") -> tuple[Path, Path]:
    """ECDF per name. ``curves[name] = (lower (n,), upper (n,)[, kind])``: with a proof oracle the proved
    lower bounds, the counterexample upper bounds (NaN = none found: drawn at the right edge) and the band
    between them; with ``kind = "counterexample"`` (attack oracle) only the upper bounds.
    ``fit[name] = (mu, sigma)`` overlays the fitted log-normal CDF of the plotted bound."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    kinds = set()
    for i, (name, (lo, up, *kind)) in enumerate(curves.items()):
        kind = kind[0] if kind else "proved"
        color = f"C{i % 10}"
        lo = np.sort(np.asarray(lo, float))
        up = np.sort(np.where(np.isnan(up), np.inf, np.asarray(up, float)))
        if not lo.size:
            continue
        f = np.arange(1, len(lo) + 1) / len(lo)
        cap = max(np.max(lo), np.max(up[np.isfinite(up)], initial=0.0))  # censored uppers drawn at the right edge
        main = lo if kind == "proved" else np.minimum(up, cap)
        ax.step(main, f, where="post", color=color, label=f"{name} ({kind})")
        kinds.add(kind)
        if kind == "proved" and not np.allclose(lo, up):
            ax.step(np.minimum(up, cap), f, where="post", color=color, ls="--", label=f"{name} (counterexample)")
            ax.fill_betweenx(f, lo, np.minimum(up, cap), step="post", color=color, alpha=0.15)
            kinds.add("bracket")
        if fit and name in fit:
            mu, sigma = fit[name]
            grid = np.linspace(max(main[main > 0].min(initial=cap), 1e-6), max(cap, 2e-6), 200)
            ax.plot(grid, stats.norm.cdf((np.log(grid) - mu) / sigma), color=color, ls=":",
                    label=f"{name} log-normal fit")
    ax.set_xlabel("ε (L∞)")
    ax.set_ylabel("fraction of inputs")
    ax.set_title(f"{title}: " + ("bracket (proved … counterexample)" if "bracket" in kinds else " / ".join(sorted(kinds))),
                 fontsize=10)
    _legend(ax, len(ax.get_legend_handles_labels()[0]))
    return _save(fig, path)


def histogram(values: dict, path, *, bins: int = 30, bound: str = "proved", title: str = "critical ε") -> tuple[Path, Path]:
    """Histograms of ``values[name] (n,)`` on one set of bins shared by every name (outlined steps, so
    overlapping distributions stay readable). ``bound`` names what the values are (see `BOUND_LABELS`)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    clean = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in values.items()}
    pooled = np.concatenate([v for v in clean.values()] + [np.zeros(0)])
    edges = np.histogram_bin_edges(pooled if pooled.size else [0.0, 1.0], bins=bins)
    for i, (name, v) in enumerate(clean.items()):
        ax.hist(v, bins=edges, histtype="step", lw=1.5, color=f"C{i % 10}", label=f"{name} (n={v.size})")
        ax.hist(v, bins=edges, alpha=0.12, color=f"C{i % 10}")
    ax.set_xlabel(f"ε (L∞): {BOUND_LABELS.get(bound, bound)}")
    ax.set_ylabel("inputs per bin")
    ax.set_title(f"{title} ({bound})", fontsize=10)
    _legend(ax, len(clean))
    return _save(fig, path)


def heatmap(matrix, names, path, *, n_shared=None, title: str = "Spearman correlation of critical ε") -> tuple[Path, Path]:
    """Annotated heat map of a ``(K, K)`` matrix, readable at its default size for K up to ~20; ``n_shared (K, K)``
    (inputs behind each cell) goes under the title as its range."""
    m = np.asarray(matrix, float)
    k = len(names)
    side = max(4.5, 1.8 + 0.42 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    size = 9 if k <= 8 else 7 if k <= 14 else 6
    short = [n if len(n) <= 28 else n[:25] + "…" for n in names]
    ax.set_xticks(range(k), short, rotation=45, ha="right", rotation_mode="anchor", fontsize=size)
    ax.set_yticks(range(k), short, fontsize=size)
    for i in range(k):
        for j in range(k):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=size,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n_shared is not None:
        off = np.asarray(n_shared)[~np.eye(k, dtype=bool)]
        title += f"\n(shared inputs per pair: {off.min()}–{off.max()})" if off.size else ""
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def bars(values: dict, path, *, intervals: dict | None = None, counts: dict | None = None, failed: dict | None = None,
         xlabel: str = "", ylabel: str = "", title: str = "") -> tuple[Path, Path]:
    """Bar per label: ``values[label]`` (NaN: no value, drawn as an empty bar marked "no fit"),
    ``intervals[label] = (low, high)`` as error bars, ``counts[label]`` inputs and ``failed[label]`` of them
    whose fit FAILed, written over each bar."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.0))
    v = np.array([values[k] for k in names], float)
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(v), color="C0", alpha=0.8)
    if intervals:
        lo = np.array([intervals[k][0] for k in names], float)
        hi = np.array([intervals[k][1] for k in names], float)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(v)
        ax.errorbar(x[ok], v[ok], yerr=[v[ok] - lo[ok], hi[ok] - v[ok]], fmt="none", ecolor="black", capsize=3)
    top = np.nanmax(np.concatenate([v, [hi.max()] if intervals and np.isfinite(hi).any() else []]), initial=1e-12)
    for i, k in enumerate(names):
        text = [] if counts is None else [f"n={counts[k]}"]
        if failed and failed.get(k):
            text.append(f"FAIL {failed[k]}")
        if not np.isfinite(v[i]):
            text.append("no fit")
        ax.text(i, (np.nan_to_num(v[i]) if np.isfinite(v[i]) else 0) + 0.02 * top, "\n".join(text), ha="center",
                va="bottom", fontsize=7, color="C3" if failed and failed.get(k) else "black")
    ax.set_xticks(x, names)
    ax.set_ylim(top=top * 1.18 if top > 0 else 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def curves(xs, ys: dict, path, *, floor: float | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
           logy: bool = False) -> tuple[Path, Path]:
    """Lines of ``ys[name] (len(xs),)`` against ``xs``. On a log axis, values at or below ``floor`` (e.g. zero
    estimated tail) are drawn at ``floor`` with open downward markers and a dotted line, so every line stays
    visible; NaN values are left out."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = np.asarray(xs, float)
    for i, (name, y) in enumerate(ys.items()):
        y = np.asarray(y, float)
        style = {"color": f"C{i % 10}", "ls": ("-", "--", ":", "-.")[i % 4]}
        size = 10 - 2 * (i % 3)  # overlapping markers stay visible: earlier series drawn larger
        if logy and floor is not None:
            low = np.isfinite(y) & (y <= floor * (1 + 1e-3))  # float32 round-off of values at the floor
            shown = np.where(low, floor, y)
            ax.plot(xs, shown, label=name, **style)
            ax.plot(xs[~low], shown[~low], "o", ms=size, color=style["color"])
            if low.any():
                ax.plot(xs[low], shown[low], "v", mfc="none", mew=1.5, ms=size, color=style["color"],
                        label=f"{name}: ≤ {floor:.2g} (not resolved by the samples)")
        else:
            ax.plot(xs, y, marker="o", ms=size, label=name, **style)
    if logy:
        ax.set_yscale("log")
        if floor is not None:
            ax.axhline(floor, color="grey", ls=":", lw=1)
            top = max([floor] + [v for y in ys.values() for v in np.asarray(y, float) if np.isfinite(v)])
            ax.set_ylim(floor / 3, top * 3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend(ax, len(ax.get_legend_handles_labels()[0]))
    return _save(fig, path)
