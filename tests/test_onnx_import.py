"""ONNX import: real networks and synthetic single-op graphs against onnxruntime (the reference)."""
import os
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.errors import FileFormatError, InputError, UnsupportedOpError
from jaxrobust.onnx_import import KNOWN_NORMALIZATION, load_onnx, onnx_summary

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# Same location rule as conftest.SHARED; tests still go through the `shared` fixture to skip cleanly.
SHARED = Path(os.environ.get("JAXROBUST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
NETWORKS = sorted(str(p.relative_to(SHARED / "networks")) for p in (SHARED / "networks").rglob("*.onnx"))
README_ACCURACY = {"mnist-net_256x2": 0.9808, "mnist-net_256x4": 0.9764, "mnist-net_256x6": 0.9689}
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _ort_logits(path, x: np.ndarray) -> np.ndarray:
    """onnxruntime logits of ``x: (B, *input_shape)``, one call per image when batch is fixed to 1."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0] if len(inp.shape) > len(x.shape) - 1 else None
    if dim0 is None:  # no batch dimension declared
        return np.stack([sess.run(None, {inp.name: xi})[0].reshape(-1) for xi in x])
    if isinstance(dim0, int):
        return np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0].reshape(1, -1)
                               for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0].reshape(len(x), -1)


def _normalized(stem: str, x: np.ndarray) -> np.ndarray:
    if stem not in KNOWN_NORMALIZATION:
        return x
    mean = np.asarray(KNOWN_NORMALIZATION[stem]["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(KNOWN_NORMALIZATION[stem]["std"], np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


@cache
def _dataset(kind: str):
    """Images in [0, 1] as float32 and labels: MNIST test set (10k) or the 100 lossless CIFAR images."""
    if kind == "mnist":
        d = np.load(SHARED / "data" / "mnist.npz")
        return d["x_test"].astype(np.float32) / 255, d["y_test"].astype(np.int64)
    d = np.load(SHARED / "data" / "cifar10" / "cifar10_test_first100_lossless.npz")
    return d["x_test"].transpose(0, 3, 1, 2).astype(np.float32) / 255, d["y_test"].astype(np.int64)


@cache
def _evaluate(rel: str):
    """(network, inputs, labels, logits) for a shared network over its whole test set, batch 1000."""
    net = load_onnx(SHARED / "networks" / rel)
    x, y = _dataset("cifar" if net.input_shape[0] == 3 else "mnist")
    x = x.reshape((len(x),) + net.input_shape)
    fn = jax.jit(net.apply)
    bs = 1000
    logits = np.concatenate([np.asarray(fn(net.params, x[i:i + bs])) for i in range(0, len(x), bs)])
    return net, x, y, logits


def _save(tmp_path, nodes, x_shape, out_shape, inits=(), opset=13, name="g"):
    """Write a one-input one-output float graph; return its path."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _check_against_ort(path, batch=5, seed=0, atol=1e-5):
    net = load_onnx(path)
    x = np.random.default_rng(seed).uniform(-1, 1, (batch,) + net.input_shape).astype(np.float32)
    ours = np.asarray(jax.jit(net.apply)(net.params, x))
    ref = _ort_logits(path, x)
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=1e-5)
    single_jit = jax.jit(net.single)
    single = np.stack([np.asarray(single_jit(xi)) for xi in x[:2]])
    np.testing.assert_allclose(single, ours[:2], atol=1e-6, rtol=1e-6)
    return net


def _w(*shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# shared networks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", NETWORKS)
def test_shared_network_matches_onnxruntime(shared, rel):
    path = shared("networks", rel)
    net, x, _, logits = _evaluate(rel)
    x100 = x[:100]
    ref = _ort_logits(path, _normalized(path.stem, x100))
    assert logits.shape == (len(x), net.num_classes) == (len(x), 10)
    assert np.abs(logits[:100] - ref).max() < ATOL


@pytest.mark.parametrize("rel", NETWORKS)
def test_shared_network_accuracy(shared, rel):
    shared("networks", rel)
    net, _, y, logits = _evaluate(rel)
    stem = Path(rel).stem
    acc = (logits.argmax(1) == y).mean()
    if net.input_shape[0] == 3:  # 100 CIFAR-10 images; adversarially trained nets are weaker
        assert acc > 0.4, acc
    elif stem in README_ACCURACY:
        assert abs(acc - README_ACCURACY[stem]) <= 1e-3, acc
    else:
        assert acc > 0.9, acc


def test_declared_input_shapes(shared):
    base = shared("networks", "mnist")
    assert load_onnx(base / "vnncomp2021_mnistfc" / "mnist-net_256x2.onnx").input_shape == (784, 1)
    assert load_onnx(base / "fomlas_misc" / "mnist-net.onnx").input_shape == (784,)
    assert load_onnx(base / "eran_cnn" / "convSmallRELU__Point.onnx").input_shape == (1, 28, 28)
    resnet = load_onnx(shared("networks", "cifar10", "jair_resnet4b", "resnet_4b_pgd.onnx"))
    assert resnet.input_shape == (3, 32, 32) and resnet.domain == (0.0, 1.0)


def test_batched_equals_per_example_and_transforms(shared):
    shared("networks", "mnist", "eran_cnn", "convSmallRELU__PGDK.onnx")
    net, x, _, logits = _evaluate("mnist/eran_cnn/convSmallRELU__PGDK.onnx")
    single = jax.jit(net.single)
    per_example = np.stack([np.asarray(single(xi)) for xi in x[:4]])
    np.testing.assert_allclose(per_example, logits[:4], atol=1e-5, rtol=1e-5)
    vm = jax.jit(jax.vmap(net.single))(jnp.asarray(x[:4]))
    np.testing.assert_allclose(np.asarray(vm), logits[:4], atol=1e-5, rtol=1e-5)
    g = jax.jit(jax.grad(lambda p, xi: net.apply(p, xi).sum()))(net.params, x[:2])
    assert set(g) == set(net.params)
    gx = jax.jit(jax.grad(lambda xi: net.apply(net.params, xi)[:, 3].sum()))(jnp.asarray(x[:2]))
    assert gx.shape == x[:2].shape and np.isfinite(np.asarray(gx)).all()


def test_traced_graph_is_small(shared):
    net = load_onnx(shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx"))
    jaxpr = jax.make_jaxpr(net.apply)(net.params, jnp.zeros((3,) + net.input_shape))
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert set(prims) <= {"reshape", "dot_general", "broadcast_in_dim", "add", "max"}
    assert prims.count("dot_general") == 3 and prims.count("max") == 2
    pool = load_onnx(shared("networks", "mnist", "vnncomp2021_verivital", "Convnet_maxpool.onnx"))
    names = {e.primitive.name for e in
             jax.make_jaxpr(pool.apply)(pool.params, jnp.zeros((2, 1, 28, 28))).jaxpr.eqns}
    assert {"conv_general_dilated", "reduce_window_max", "dot_general"} <= names


def test_normalization_registry_and_hash(shared):
    path = shared("networks", "cifar10", "oval21", "cifar_base_kw.onnx")
    net = load_onnx(path)
    assert net.arch["mean"] == pytest.approx([0.485, 0.456, 0.406]) and net.arch["std"] == [0.225]
    raw = load_onnx(path, mean=0.0, std=1.0)
    x = _dataset("cifar")[0][:4]
    np.testing.assert_allclose(np.asarray(raw(_normalized(path.stem, x))), np.asarray(net(x)),
                               atol=1e-4)
    assert net.hash == load_onnx(path).hash != raw.hash
    assert net.hash != load_onnx(shared("networks", "cifar10", "oval21", "cifar_wide_kw.onnx")).hash
    with pytest.raises(InputError, match="channel"):
        load_onnx(path, mean=[0.1, 0.2], std=1.0)
    with pytest.raises(InputError, match="std"):
        load_onnx(path, mean=0.0, std=0.0)


def test_onnx_summary(shared):
    path = shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx")
    s = onnx_summary(path)
    assert s["input_shape"] == [1, 784, 1] and s["output_shape"] == [1, 10]
    assert s["ops"] == {"Flatten": 1, "Gemm": 3, "Relu": 2}
    assert s["num_params"] == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert s["num_params"] == load_onnx(path).num_params
    assert s["unsupported_ops"] == [] and len(s["sha256"]) == 64
    assert onnx_summary(onnx.load(str(path)))["ops"] == s["ops"]


# ----------------------------------------------------------------------------------------------
# synthetic graphs for ops the shared networks do not cover
# ----------------------------------------------------------------------------------------------
def test_activations_softmax_and_clip(tmp_path):
    nodes = [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.2),
             helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "k"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["d"]),
             helper.make_node("Clip", ["d", "lo", "hi"], ["e"]),
             helper.make_node("Softmax", ["e"], ["f"], axis=-1),
             helper.make_node("Flatten", ["f"], ["y"])]
    inits = [("k", np.float32(3.0)), ("lo", np.float32(0.2)), ("hi", np.float32(0.9))]
    _check_against_ort(_save(tmp_path, nodes, ["N", 4, 5], ["N", 20], inits))
    leaky = [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=1.5),
             helper.make_node("Softmax", ["a"], ["y"], axis=1)]  # opset 11: over all trailing axes
    _check_against_ort(_save(tmp_path, leaky, [1, 3, 4], [1, 3, 4], opset=11, name="old_softmax"))


def test_gemm_attributes_without_batch_dimension(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0)]
    path = _save(tmp_path, nodes, [6, 1], [1, 4], [("w", _w(4, 6)), ("c", _w(4, seed=2))])
    net = _check_against_ort(path)
    assert net.input_shape == (6, 1) and net.num_classes == 4


def test_conv_groups_dilations_pads_and_pools(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, dilations=[2, 1],
                              pads=[1, 0, 2, 1], strides=[1, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[3, 2], pads=[1, 1, 1, 0],
                              strides=[2, 1]),
             helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[2, 3], pads=[1, 1, 0, 1],
                              count_include_pad=0),
             helper.make_node("AveragePool", ["m"], ["a2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2], count_include_pad=1, ceil_mode=1),
             helper.make_node("GlobalAveragePool", ["a"], ["g1"]),
             helper.make_node("GlobalAveragePool", ["a2"], ["g2"]),
             helper.make_node("Concat", ["g1", "g2"], ["g"], axis=1),
             helper.make_node("Flatten", ["g"], ["y"])]
    inits = [("w", _w(4, 1, 3, 3)), ("b", _w(4, seed=3))]
    _check_against_ort(_save(tmp_path, nodes, [1, 2, 9, 10], [1, 8], inits))


def test_auto_pad_and_ceil_mode(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Conv", ["x", "w"], ["d"], auto_pad="SAME_LOWER", strides=[2, 2]),
             helper.make_node("Add", ["c", "d"], ["e"]),
             helper.make_node("MaxPool", ["e"], ["m"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("Flatten", ["m"], ["y"])]
    _check_against_ort(_save(tmp_path, nodes, [1, 1, 7, 7], [1, 8], [("w", _w(2, 1, 4, 4))]))


def test_batchnorm_pad_concat(tmp_path):
    c = 3
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "bb", "mu", "var"], ["n"], epsilon=1e-3),
             helper.make_node("Pad", ["n", "pads", "v"], ["p"]),
             helper.make_node("Conv", ["x", "w"], ["q"], pads=[2, 3, 2, 3]),
             helper.make_node("Concat", ["p", "q"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["y"])]
    inits = [("s", _w(c)), ("bb", _w(c, seed=2)), ("mu", _w(c, seed=3)),
             ("var", np.abs(_w(c, seed=4)) + 0.1), ("v", np.float32(0.5)),
             ("pads", np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64)),
             ("w", _w(2, c, 3, 3)), ("shape", np.array([0, -1], np.int64))]
    net = _check_against_ort(_save(tmp_path, nodes, ["N", c, 4, 4], ["N", 5 * 6 * 8], inits))
    assert set(net.params) == {"s", "bb", "mu", "var", "v", "w"}


def test_shape_arithmetic_is_folded(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
             helper.make_node("Slice", ["s", "one", "big"], ["rest"]),
             helper.make_node("Cast", ["rest"], ["restf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["restf"], ["resti"], to=TensorProto.INT64),
             helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),             # (1, 12)
             helper.make_node("Unsqueeze", ["flat", "one"], ["u"]),              # (1, 1, 12)
             helper.make_node("Squeeze", ["u", "one"], ["sq"]),                  # (1, 12)
             helper.make_node("Gather", ["sq", "cols"], ["picked"], axis=1),
             helper.make_node("MatMul", ["picked", "w"], ["y"])]
    inits = [("zero", np.array(0, np.int64)), ("zero1", np.array([0], np.int64)),
             ("one", np.array([1], np.int64)), ("big", np.array([2**62], np.int64)),
             ("minus1", np.array([-1], np.int64)), ("cols", np.array([5, 1, 7, 2], np.int64)),
             ("w", _w(4, 3))]
    net = _check_against_ort(_save(tmp_path, nodes, [1, 2, 2, 3], [1, 3], inits))
    prims = {e.primitive.name for e in
             jax.make_jaxpr(net.apply)(net.params, jnp.zeros((2, 2, 2, 3))).jaxpr.eqns}
    assert not prims & {"convert_element_type", "concatenate", "iota"}


def test_batch_dissolving_graph_falls_back_to_vmap(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["v"]),       # (1, 4) -> (4,)
             helper.make_node("MatMul", ["v", "w"], ["h"]),            # (4,) @ (4, 3) -> (3,)
             helper.make_node("Unsqueeze", ["h", "zero"], ["y"])]      # -> (1, 3)
    inits = [("flat", np.array([4], np.int64)), ("w", _w(4, 3)), ("zero", np.array([0], np.int64))]
    _check_against_ort(_save(tmp_path, nodes, [1, 4], [1, 3], inits), batch=6)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_unsupported_op_names_op_and_node(tmp_path):
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="my_erf_node")]
    path = _save(tmp_path, nodes, [1, 4], [1, 4])
    with pytest.raises(UnsupportedOpError, match=r"'Erf'.*my_erf_node"):
        load_onnx(path)
    assert onnx_summary(path)["unsupported_ops"] == ["Erf"]
    bad_pad = [helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect", name="crop")]
    path = _save(tmp_path, bad_pad, [1, 4], [1, 3], [("p", np.array([0, 0, 0, -1], np.int64))],
                 name="bad_pad")
    with pytest.raises(UnsupportedOpError, match=r"Pad node 'crop'.*reflect"):
        load_onnx(path)


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileFormatError, match="nope.onnx"):
        load_onnx(missing)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage-that-is-not-a-model" * 7)
    with pytest.raises(FileFormatError, match="corrupt.onnx"):
        load_onnx(corrupt)
    with pytest.raises(FileFormatError, match="corrupt.onnx"):
        onnx_summary(corrupt)
