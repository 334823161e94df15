"""MLP GANs: training, generator sets on disk, ONNX/Keras generators, augmentation, sample grids."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import gan
from jaxrobust.augment import AffineRange, augmented_copies, random_affine, warp
from jaxrobust.errors import FileFormatError, InputError

TINY = dict(latent_dim=4, hidden=(16,), disc_hidden=(16,), batch_size=8, steps_per_call=2, progress=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(30, 28, 28, 1)).astype(np.float32)
    return x, np.arange(30) % 3


@pytest.fixture(scope="module")
def per_class(data):
    return gan.train_gans(*data, classes=[0, 2], steps=4, **TINY)


def test_per_class_training(per_class):
    gens, losses = per_class
    assert sorted(gens) == [0, 2]
    assert losses.shape == (4, 2, 2) and np.isfinite(losses).all()
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    a, b = np.asarray(gens[0](z)), np.asarray(gens[2](z))
    assert a.shape == (5, 28, 28, 1) and a.min() >= -1 and a.max() <= 1
    assert not np.allclose(a, b)  # independently trained generators
    assert gens[0].output_range == (-1.0, 1.0) and gens[0].latent_dim == 4


def test_conditional_training_and_roundtrip(data, per_class, tmp_path):
    gens, losses = gan.train_gans(*data, conditional=True, steps=2, augment=True, **TINY)
    assert sorted(gens) == [0, 1, 2] and losses.shape == (2, 2)
    z = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    assert not np.allclose(gens[0](z), gens[1](z))  # the label changes the output
    assert gens[0].params["model"] is gens[1].params["model"] and gens[0].apply == gens[1].apply  # one model
    cond_path, pc_path = tmp_path / "cond.msgpack", tmp_path / "pc.msgpack"
    h = gan.save_generators(gens, cond_path, meta={"steps": 2})
    gan.save_generators(per_class[0], pc_path)
    assert cond_path.stat().st_size < 0.7 * pc_path.stat().st_size  # one model for 3 classes vs 2 for 2
    back = gan.load_generators(cond_path)
    assert gan.set_hash(back) == h and gan.generator_meta(cond_path) == {"steps": 2}
    for c in gens:
        np.testing.assert_allclose(back[c](z), gens[c](z), rtol=1e-6, atol=1e-6)
        assert back[c].hash == gens[c].hash
    back_pc = gan.load_generators(pc_path)
    assert sorted(back_pc) == [0, 2]
    np.testing.assert_allclose(back_pc[2](z), per_class[0][2](z), rtol=1e-6, atol=1e-6)


def test_corrupt_and_unknown_files(per_class, tmp_path):
    path = tmp_path / "g.msgpack"
    gan.save_generators(per_class[0], path)
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError):
        gan.load_generators(path)
    (tmp_path / "g.txt").write_text("x")
    with pytest.raises(FileFormatError, match="unknown generator file type"):
        gan.load_generators(tmp_path / "g.txt")
    with pytest.raises(FileFormatError, match="not found"):
        gan.load_generators(tmp_path / "missing.msgpack")


def test_bad_inputs(data):
    x, y = data
    with pytest.raises(InputError):
        gan.train_gans(x * 2, y, steps=1, **TINY)
    with pytest.raises(InputError, match="no training images"):
        gan.train_gans(x, y, classes=[7], steps=1, **TINY)
    arch = gan.gan_arch(latent_dim=4, hidden=(8,), num_classes=3)
    with pytest.raises(InputError, match="label"):
        gan.make_generator(arch, None)


def test_onnx_generator(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 784)).astype(np.float32), rng.normal(size=784).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["z", "W", "b"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 784])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "gen.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    (g,) = gan.load_generators(path).values()
    z = rng.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(g(z), np.tanh(z @ w + b).reshape(4, 28, 28, 1), rtol=1e-5, atol=1e-5)
    assert g.latent_dim == 3 and g.output_shape == (28, 28, 1)


def test_keras_dcgan_as_generator_set(shared):
    gens = gan.load_generators(shared("networks", "generative", "keras_dcgan_mnist", "mnist_generator.h5"))
    (g,) = gens.values()
    assert list(gens) == [None] and g.latent_dim == 100 and g.output_shape == (28, 28, 1)


def test_augment_identity_and_shift():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1))
    np.testing.assert_allclose(random_affine(jax.random.PRNGKey(1), x, AffineRange(0, 0, 0, 0)), x, atol=1e-6)
    eye = jnp.broadcast_to(jnp.eye(2), (3, 2, 2))
    shifted = warp(x, eye, jnp.broadcast_to(jnp.array([0.0, 1 / 28]), (3, 2)))  # one pixel right
    np.testing.assert_allclose(shifted[:, :, 1:], x[:, :, :-1], atol=1e-6)
    np.testing.assert_allclose(shifted[:, :, 0], 0.0)
    out = random_affine(jax.random.PRNGKey(2), x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not np.allclose(out, x)


def test_augmented_copies():
    x = np.random.default_rng(0).uniform(size=(5, 28, 28, 1)).astype(np.float32)
    xa, ya = augmented_copies(jax.random.PRNGKey(0), x, np.arange(5), copies=2, batch_size=4)
    assert xa.shape == (15, 28, 28, 1) and ya.tolist() == list(range(5)) * 3
    np.testing.assert_array_equal(xa[:5], x)
    with pytest.raises(InputError):
        augmented_copies(jax.random.PRNGKey(0), x[0], np.arange(1))


def test_sample_grid(per_class, tmp_path):
    import matplotlib.image as mpimg
    path = gan.sample_grid(per_class[0], tmp_path / "grid.png", per_class=4)
    img = mpimg.imread(path)
    assert img.shape[:2] == (2 * 29 - 1, 4 * 29 - 1)
