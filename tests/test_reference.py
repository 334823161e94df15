"""Soundness against the JAIR authors' per-image results (αβ-CROWN) on a shared network."""
import numpy as np
import pytest

from jaxrobust.critical_eps import SearchConfig, search
from jaxrobust.errors import InputError
from jaxrobust.onnx_import import load_onnx
from jaxrobust.oracles import make_oracle
from jaxrobust.reference import CIFAR_GRID_STEP, jair_cifar_image, load_jair, violations


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


def test_jair_cifar_ids_name_the_images_of_their_labels(shared):
    """Every row of the CIFAR results names an image of its own class; of the first 100 test images, only
    ids 20 and 44 are in the sample."""
    import csv

    rows = list(csv.DictReader(open(shared("reference", "jair", "results_CIFAR_JAIR.csv")), skipinitialspace=True))
    per = {"test": 1000, "train": 5000}
    for r in rows:   # labels in class order, as many per class as the split has: image j is of class j // per
        labels = np.repeat(np.arange(10), per[r["split"]])
        j = jair_cifar_image(int(r["image_id"]), r["split"], labels)
        assert labels[j] == int(r["original_label"]), r
    y100 = np.load(shared("data", "cifar10", "cifar10_test_first100_lossless.npz"))["y_test"].reshape(-1)
    found = {i: jair_cifar_image(i, "test", y100) for i in range(100)}
    assert {i: j for i, j in found.items() if j is not None} == {20: 15, 44: 13}
    with pytest.raises(InputError, match="image ids"):
        jair_cifar_image(100, "test", y100)
    with pytest.raises(InputError, match="split"):
        jair_cifar_image(0, "val", y100)


@pytest.mark.slow
def test_resnet_critical_eps_is_sound_against_jair_cifar(shared):
    """resnet_4b_standard on the one sampled test image we hold losslessly (id 20): an attack upper bound and
    a CROWN lower bound that respect the published row (counterexample at 0.0078)."""
    net = load_onnx(shared("networks", "cifar10", "jair_resnet4b", "resnet_4b_standard.onnx"))
    ref = load_jair(shared("reference", "jair", "results_CIFAR_JAIR.csv"), "resnet_4b_standard.onnx", "test")
    d = np.load(shared("data", "cifar10", "cifar10_test_first100_lossless.npz"))
    j = jair_cifar_image(20, "test", d["y_test"].reshape(-1))
    x = (d["x_test"][j:j + 1].transpose(0, 3, 1, 2) / 255.0).astype(np.float32).reshape((1, *net.input_shape))
    y = np.asarray([ref[20].label])
    r = search(net, make_oracle(net, "crown", targets=3), x, y, SearchConfig(eps_max=0.05, tol=0.001),
               indices=np.asarray([20]))
    v = violations(ref, [20], r.eps_lower, r.eps_upper, tol=CIFAR_GRID_STEP)
    assert r.status[0] != "misclassified" and v["checked"] == 1 and v["violations"] == 0, (r, v)
    assert r.eps_upper[0] <= ref[20].counterexample + CIFAR_GRID_STEP
