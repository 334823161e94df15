"""Figures: ECDFs of critical ε with fitted log-normal and [lower, upper] band, histograms, correlation heat
maps, per-class bars and curves. Every function writes a PNG and returns its path (Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ecdf(curves: dict, path, *, fit: dict | None = None, title: str = "critical ε") -> Path:
    """ECDF per name. ``curves[name] = (lower (n,), upper (n,))`` draws the band between the ECDFs of the
    proved lower and the counterexample upper bounds (upper may hold NaN = censored); ``fit[name] = (mu, sigma)``
    overlays the log-normal CDF."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (lo, up)) in enumerate(curves.items()):
        color = f"C{i}"
        lo = np.sort(np.asarray(lo, float))
        up = np.sort(np.where(np.isnan(up), np.inf, np.asarray(up, float)))
        f = np.arange(1, len(lo) + 1) / len(lo)
        cap = max(lo.max(), np.max(up[np.isfinite(up)], initial=0.0))  # censored uppers drawn at the right edge
        ax.step(lo, f, where="post", color=color, label=f"{name} (proved)")
        if not np.allclose(lo, up):
            ax.step(np.minimum(up, cap), f, where="post", color=color, ls="--", label=f"{name} (counterexample)")
            ax.fill_betweenx(f, lo, np.minimum(up, cap), step="post", color=color, alpha=0.15)
        if fit and name in fit:
            mu, sigma = fit[name]
            grid = np.linspace(max(lo.min(), 1e-6), max(cap, 2e-6), 200)
            ax.plot(grid, stats.norm.cdf((np.log(grid) - mu) / sigma), color=color, ls=":",
                    label=f"{name} log-normal fit")
    ax.set_xlabel("ε (L∞)")
    ax.set_ylabel("fraction of inputs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def histogram(values: dict, path, *, bins: int = 30, title: str = "critical ε") -> Path:
    """Overlaid histograms of ``values[name] (n,)``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in values.items():
        v = np.asarray(v, float)
        ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("ε (L∞)")
    ax.set_ylabel("inputs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def heatmap(matrix, names, path, *, title: str = "Spearman correlation") -> Path:
    """Annotated heat map of a ``(K, K)`` matrix."""
    m = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(names), 1 + 0.6 * len(names)))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def bars(values: dict, path, *, errors: dict | None = None, ylabel: str = "", title: str = "") -> Path:
    """Bar chart of ``values[label] -> float`` with optional error bars."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(values)
    ax.bar(range(len(names)), [values[k] for k in names],
           yerr=[errors[k] for k in names] if errors else None, capsize=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def curves(xs, ys: dict, path, *, xlabel: str = "", ylabel: str = "", title: str = "", logy: bool = False) -> Path:
    """Line plot of ``ys[name] (len(xs),)`` against ``xs``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, y in ys.items():
        ax.plot(xs, y, marker="o", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)
