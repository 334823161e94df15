import numpy as np
import pytest

from jaxrobust.errors import FileFormatError
from jaxrobust.vnnlib import load, parse

TEXT = """; toy
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 0.5))
(assert (>= X_0 -0.5))
(assert (<= X_1 1))
(assert (>= 0 X_1))
(assert (>= X_1 -2))
(assert (or (and (>= Y_0 Y_2)) (and (>= Y_1 Y_2) (<= Y_1 3.5))))
"""


def test_parse_box_and_dnf():
    p = parse(TEXT)
    np.testing.assert_array_equal(p.lower, [-0.5, -2.0])
    np.testing.assert_array_equal(p.upper, [0.5, 0.0])
    assert len(p.disjuncts) == 2
    a, b = p.disjuncts[0]
    np.testing.assert_array_equal(a, [[-1, 0, 1]])
    np.testing.assert_array_equal(b, [0])
    a, b = p.disjuncts[1]
    np.testing.assert_array_equal(a, [[0, -1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(b, [0, 3.5])
    assert p.robustness_label() is None


def test_errors_name_the_problem():
    with pytest.raises(FileFormatError, match="finite bounds"):
        parse(TEXT.replace("(assert (>= X_0 -0.5))", ""))
    with pytest.raises(FileFormatError, match="unbalanced"):
        parse(TEXT + "(assert (<= Y_0")
    with pytest.raises(FileFormatError, match="unsupported output"):
        parse(TEXT.replace("(>= Y_0 Y_2)", "(>= (exp Y_0) Y_2)"))
    with pytest.raises(FileFormatError, match="cannot read"):
        load("/nonexistent/prop.vnnlib")


def test_mnistfc_properties(shared):
    folder = shared("networks", "mnist", "vnncomp2021_mnistfc")
    x = np.load(shared("data", "mnist.npz"))["x_test"].reshape(10000, -1) / 255.0
    y = np.load(shared("data", "mnist.npz"))["y_test"]
    for f in sorted(folder.glob("prop_*_0.03.vnnlib"))[:5]:
        p = load(f)
        label = int(f.read_text().split("label:")[1].split(".")[0])
        assert p.lower.shape == (784,) and p.n_outputs == 10
        assert p.robustness_label() == label
        inside = np.all((x >= p.lower - 1e-6) & (x <= p.upper + 1e-6), axis=1)
        assert inside.any() and np.all(y[inside] == label)   # the box is the ε-ball of a real test image
        assert np.max(p.upper - p.lower) <= 2 * 0.03 + 1e-6
