"""Soundness against the JAIR authors' per-image results (αβ-CROWN) on a shared network."""
import numpy as np
import pytest

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle
from jaxrobust.reference import load_jair, violations


@pytest.mark.slow
def test_crown_critical_eps_is_sound_against_jair(shared):
    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    ref = load_jair(shared("reference", "jair", "results_JAIR_fomlas.csv"), "mnist-net_256x2.onnx", "test")
    d = np.load(shared("data", "mnist.npz"))
    ids = np.arange(16)
    x = (d["x_test"][ids].reshape(-1, 784, 1) / 255.0).astype(np.float32)
    y = d["y_test"][ids].astype(np.int64)
    assert all(ref[i].label == y[i] for i in ids)
    r = search(net, make_oracle(net, "crown", targets=3), x, y, SearchConfig(eps_max=0.2, tol=0.002), indices=ids)
    v = violations(ref, ids, r.eps_lower, r.eps_upper)
    assert v["checked"] == len(ids) and v["violations"] == 0, v
    ok = r.status != "misclassified"
    # CROWN proofs are real but incomplete: below the exact certificate, yet not vacuous
    assert np.median(r.eps_lower[ok]) > 0.25 * np.median([ref[i].certified for i in ids[ok]])
