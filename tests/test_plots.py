"""Figures: PNG and PDF, labelled with the bound they plot, readable with many groups and zero tails."""
import numpy as np

from jaxrobust import plots


def _written(paths):
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    return png


def test_every_figure_is_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    lo = rng.lognormal(-3, 0.5, 40)
    up = np.where(rng.random(40) < 0.2, np.nan, lo * 1.5)
    _written(plots.ecdf({"a": (lo, up), "b": (lo, lo * 1.2, "counterexample")}, tmp_path / "e.png",
                        fit={"a": (-3.0, 0.5)}))
    _written(plots.histogram({"a": lo, "b": lo * 3}, tmp_path / "h.png", bound="counterexample"))
    names = [f"network-with-a-long-name-{i}/test [crown tol=0.001]" for i in range(16)]
    m = np.corrcoef(rng.normal(size=(16, 30)))
    _written(plots.heatmap(m, names, tmp_path / "c.png", n_shared=np.full((16, 16), 30)))
    _written(plots.bars({"0": 0.9, "1": np.nan, "2": 0.7}, tmp_path / "b.png", intervals={
        "0": (0.85, 0.95), "1": (np.nan, np.nan), "2": (0.6, 0.8)}, counts={"0": 10, "1": 3, "2": 8},
        failed={"0": 0, "1": 3, "2": 1}))
    _written(plots.curves([0.01, 0.02, 0.04], {"a": [0.0, 0.0, 1e-3], "b": [1e-6, 1e-4, 0.1]}, tmp_path / "p.png",
                          floor=1e-16, logy=True))


def test_histograms_share_bins_and_figures_name_their_bound(tmp_path):
    import matplotlib.pyplot as plt
    saved = {}
    real_save = plots._save
    plots._save = lambda fig, path: saved.setdefault("fig", fig) and real_save(fig, path)
    try:
        plots.histogram({"narrow": np.linspace(0.1, 0.11, 50), "wide": np.linspace(0.0, 1.0, 50)},
                        tmp_path / "h.png", bins=10)
    finally:
        plots._save = real_save
    ax = saved["fig"].axes[0]
    steps = [p for p in ax.patches if p.get_fill() is False]
    starts = {round(float(s.get_xy()[:, 0].min()), 6) for s in steps}
    assert len(steps) == 2 and len(starts) == 1  # both outlines start at the shared first edge
    assert "proved" in ax.get_xlabel() and "proved" in ax.get_title()
    plt.close("all")
