import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrobust as jr
from jaxrobust import zoo
from jaxrobust.errors import FileFormatError, InputError
from jaxrobust.training import accuracy, adversarial_loss, loss, make_step, train
from jaxrobust.weights import load_network, load_weights, save_network


def test_from_flax_linen_and_nnx_agree_with_the_module():
    m = zoo.MLP((8,), 3)
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
    net = jr.from_flax(m, params, (4, 4, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 4, 4, 1))
    assert net.num_classes == 3
    np.testing.assert_allclose(net(x), m.apply(params, x), rtol=1e-6)

    class Lin(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.reshape(x.shape[0], -1))

    mod = Lin(nnx.Rngs(0))
    n2 = jr.from_flax(mod, None, (4, 4, 1))
    np.testing.assert_allclose(n2(x), mod(x), rtol=1e-6)
    assert n2.num_params == 16 * 3 + 3


def test_network_is_a_pytree_through_jit_vmap_grad():
    net = zoo.init(zoo.arch("conv_small"), jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
    f = jax.jit(lambda n, x: n(x))
    np.testing.assert_allclose(f(net, x), net(x), rtol=1e-5, atol=1e-6)
    per = jax.vmap(net.single)(x)
    np.testing.assert_allclose(per, net(x), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda n: n(x).sum())(net)
    assert isinstance(g, jr.Network) and g.params is not None
    leaves = jax.tree_util.tree_leaves(net)
    assert len(leaves) == 8 and all(isinstance(a, jax.Array) for a in leaves)


@pytest.mark.parametrize("a,out", [(zoo.arch("mlp", hidden=(256, 256)), "mlp-256x2"), (zoo.arch("conv_small"), "conv_small"),
                                   (zoo.arch("cnn", size="small"), "cnn-32-64-200"),
                                   (zoo.arch("cnn", size="large"), "cnn-64-128-512")])
def test_zoo_families(a, out):
    net = zoo.init(a, jax.random.PRNGKey(0))
    assert net.name == out and net(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
    with pytest.raises(InputError, match="family"):
        zoo.arch("transformer")


def test_hash_identifies_content_and_weights_round_trip(tmp_path):
    a = zoo.arch("mlp", hidden=(16,))
    n1, n2 = zoo.init(a, jax.random.PRNGKey(0)), zoo.init(a, jax.random.PRNGKey(1))
    assert n1.hash == zoo.init(a, jax.random.PRNGKey(0)).hash and n1.hash != n2.hash
    assert n1.hash != zoo.init(zoo.arch("mlp", hidden=(16,), num_classes=10, input_shape=(28, 28, 1)),
                               jax.random.PRNGKey(0)).replace(arch={"zoo": {**a, "hidden": [17]}}).hash
    p = tmp_path / "w.msgpack"
    assert save_network(n1, p) == n1.hash
    back = load_network(p)
    assert back.hash == n1.hash and back.name == n1.name
    x = jnp.ones((2, 28, 28, 1)) * 0.5
    np.testing.assert_array_equal(back(x), n1(x))
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.msgpack").write_bytes(bytes(data))
    with pytest.raises(FileFormatError):
        load_weights(tmp_path / "bad.msgpack")
    (tmp_path / "junk.msgpack").write_bytes(b"\x00\x01junk")
    with pytest.raises(FileFormatError, match="junk.msgpack"):
        load_weights(tmp_path / "junk.msgpack")
    with pytest.raises(FileFormatError, match="no network"):
        load_network("no-such-net")
    with pytest.raises(InputError, match="zoo"):
        save_network(jr.from_function(lambda p, x: x, {}, (2,), 2), tmp_path / "f.msgpack")


def test_bundled_networks_load_and_classify_the_bundled_sample():
    from jaxrobust.data import load_dataset
    ds = load_dataset("mnist", "test")
    for name, hash_ in (("mnist-mlp", "1e17d7b84ff98516"), ("mnist-mlp-pgd", "d2c2843c1a1ff563")):
        net = load_network(name)
        assert net.hash == hash_ and net.name == name
        assert accuracy(net, ds.x, ds.y) > 0.97


def test_check_inputs_and_labels():
    net = zoo.init(zoo.arch("mlp", hidden=(4,)), jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="shape"):
        net.check_inputs(np.zeros((2, 784)))
    with pytest.raises(InputError, match="NaN"):
        net.check_inputs(np.full((1, 28, 28, 1), np.nan))
    with pytest.raises(InputError, match="domain"):
        net.check_inputs(np.full((1, 28, 28, 1), 2.0))
    with pytest.raises(InputError, match="numeric"):
        net.check_inputs(np.full((1, 28, 28, 1), "a"))
    with pytest.raises(InputError, match="labels"):
        net.check_labels(np.array([10]), 1)


def test_training_functions_and_driver_learn():
    from jaxrobust.data import load_dataset
    ds = load_dataset("mnist", "test")  # the bundled 1000 images: train on 800, test on 200
    x, y = ds.x[:800], ds.y[:800]
    net = zoo.init(zoo.arch("mlp", hidden=(32,)), jax.random.PRNGKey(0))
    before = float(loss(net.apply, net.params, x, y))
    assert float(adversarial_loss(net.apply, net.params, x[:64], y[:64], jax.random.PRNGKey(0), eps=0.1)) >= \
        float(loss(net.apply, net.params, x[:64], y[:64]))
    trained, hist = train(net, x, y, epochs=4, batch_size=64, learning_rate=3e-3, progress=False)
    assert float(loss(trained.apply, trained.params, x, y)) < before and hist[-1] < hist[0]
    assert accuracy(trained, ds.x[800:], ds.y[800:]) > 0.8
    robust, _ = train(net, x[:128], y[:128], epochs=1, batch_size=64, eps=0.05, pgd_steps=3, progress=False)
    assert robust.hash != net.hash
    with pytest.raises(InputError, match="eps"):
        train(net, x, y, eps=-1)
    import optax
    step = make_step(net.apply, optax.sgd(0.1))
    from jaxrobust.training import TrainState
    s, v = step(TrainState(net.params, optax.sgd(0.1).init(net.params)), x[:8], y[:8], jax.random.PRNGKey(0))
    assert np.isfinite(float(v))


# --- preprocessing ---------------------------------------------------------------------------------
def _affine(shape, classes=2, seed=0):
    w = jax.random.normal(jax.random.PRNGKey(seed), (int(np.prod(shape)), classes))
    return jr.from_function(lambda p, x: x.reshape(len(x), -1) @ p, w, shape, classes, name="affine")


@pytest.mark.parametrize("shape, axis", [((3, 4, 4), 0), ((4, 4, 3), -1)])
def test_preprocessing_is_part_of_the_network(shape, axis):
    net = _affine(shape)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    pre = jr.with_preprocessing(net, mean=mean, std=std, domain=(0.0, 1.0))
    x = np.random.default_rng(0).random((5, *shape), np.float32)
    b = (3, 1, 1) if axis == 0 else (1, 1, 3)
    np.testing.assert_allclose(pre(x), net((x - mean.reshape(b)) / std.reshape(b)), rtol=1e-5, atol=1e-5)
    assert pre.hash != net.hash and jr.with_preprocessing(net, mean=mean, std=std).hash == pre.hash
    assert jax.jit(lambda n, x: n(x))(pre, x).shape == (5, 2)  # still a pytree with a hashable apply
    from jaxrobust.network import preprocessing_of
    assert preprocessing_of(pre) == {"mean": list(mean), "std": list(std)} and preprocessing_of(net) is None


def test_preprocessing_errors_name_the_problem():
    net = _affine((4, 4, 3))
    with pytest.raises(InputError, match="do not fit the input shape"):
        jr.with_preprocessing(net, mean=[0.1, 0.2])
    with pytest.raises(InputError, match="positive"):
        jr.with_preprocessing(net, std=[1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="LO < HI"):
        jr.with_preprocessing(net, domain=(1.0, 0.0))
    assert jr.with_preprocessing(net, domain=(-1, 1)).domain == (-1.0, 1.0)


def test_sidecar_json_records_preprocessing_and_options_override_it(tmp_path):
    from jaxrobust.loading import write_sidecar
    net = zoo.init(zoo.arch("mlp", hidden=(8,)), jax.random.PRNGKey(0))
    path = tmp_path / "n.msgpack"
    save_network(net, path)
    assert jr.load_network(path).hash == net.hash  # no sidecar: loaded as it is
    write_sidecar(path, mean=[0.5], std=[0.25], domain=[0, 1])
    x = np.random.default_rng(1).random((3, 28, 28, 1), np.float32)
    np.testing.assert_allclose(jr.load_network(path)(x), net((x - 0.5) / 0.25), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jr.load_network(path, std=0.5)(x), net((x - 0.5) / 0.5), rtol=1e-5, atol=1e-5)
    (tmp_path / "n.json").write_text('{"mean": [0.5], "scale": 2}')
    with pytest.raises(FileFormatError, match="unknown preprocessing keys"):
        jr.load_network(path)


def test_onnx_preprocessing_replaces_the_builtin_normalisation(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(2).normal(size=(12, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "cifar_base_kw.onnx"  # a stem with a built-in normalisation, which the options replace
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    x = np.random.default_rng(3).random((4, 3, 2, 2), np.float32)
    mean = np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)
    got = jr.load_network(path, mean=mean.ravel(), std=0.5)(x)
    np.testing.assert_allclose(got, ((x - mean) / 0.5).reshape(4, -1) @ w, rtol=1e-5, atol=1e-5)
