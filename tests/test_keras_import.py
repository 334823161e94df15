"""Keras HDF5 generator import: a synthetic file against a numpy reference, and the real MNIST DCGAN."""
import functools

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.errors import FileFormatError
from jaxrobust.generator import Generator
from jaxrobust.keras_import import (
    DCGAN_MNIST_GENERATOR,
    keras_sequential_generator,
    load_keras_dcgan_generator,
    read_keras_weights,
)

TINY = (
    ("dense", {"units": 12, "activation": "relu"}),
    ("reshape", {"shape": (2, 2, 3)}),
    ("upsample", {"factor": 2}),
    ("conv2d", {"filters": 2, "kernel_size": 3}),
    ("batchnorm", {"epsilon": 1e-3}),
    ("activation", {"fn": "tanh"}),
)


def _write_keras_h5(path, layers):
    """Write a flat Keras-2-style weights file: one group per layer, ``layer_names``/``weight_names`` attrs."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.2.4"
        f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
        for name, weights in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{k}:0".encode() for k in weights])
            for k, v in weights.items():
                g.create_dataset(f"{name}/{k}:0", data=v)


def _tiny_weights(rng):
    return [
        ("dense_1", {"kernel": rng.normal(size=(4, 12)), "bias": rng.normal(size=12)}),
        ("reshape_1", {}),
        ("up_sampling2d_1", {}),
        ("conv2d_1", {"kernel": rng.normal(size=(3, 3, 3, 2)), "bias": rng.normal(size=2)}),
        ("batch_normalization_1", {"gamma": rng.normal(size=2), "beta": rng.normal(size=2),
                                   "moving_mean": rng.normal(size=2), "moving_variance": rng.random(2) + 0.5}),
        ("activation_1", {}),
    ]


def _reference(weights, z):
    """Straightforward numpy forward pass of `TINY` (loops for the 'same' cross-correlation)."""
    w = dict(weights)
    x = np.maximum(z @ w["dense_1"]["kernel"] + w["dense_1"]["bias"], 0).reshape(-1, 2, 2, 3)
    x = x.repeat(2, axis=1).repeat(2, axis=2)
    k, b = w["conv2d_1"]["kernel"], w["conv2d_1"]["bias"]
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(x.shape[:3] + (2,))
    for i in range(4):
        for j in range(4):
            out[:, i, j] = np.einsum("bhwc,hwco->bo", pad[:, i:i + 3, j:j + 3], k) + b
    bn = w["batch_normalization_1"]
    out = (out - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) * bn["gamma"] + bn["beta"]
    return np.tanh(out)


def test_tiny_file_matches_reference(tmp_path):
    weights = _tiny_weights(np.random.default_rng(0))
    path = tmp_path / "tiny.h5"
    _write_keras_h5(path, weights)
    gen = keras_sequential_generator(path, TINY, latent_dim=4)
    assert gen.output_shape == (4, 4, 2) and gen.name == "tiny"
    z = np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_allclose(np.asarray(gen(jnp.asarray(z, jnp.float32))), _reference(weights, z),
                               rtol=1e-4, atol=1e-5)


def test_mismatched_files_are_rejected(tmp_path):
    weights = _tiny_weights(np.random.default_rng(0))
    path = tmp_path / "tiny.h5"
    _write_keras_h5(path, weights)
    wider = (("dense", {"units": 12, "activation": "relu"}), ("reshape", {"shape": (2, 2, 3)}),
             ("conv2d", {"filters": 5, "kernel_size": 3}), ("batchnorm", {}))
    with pytest.raises(FileFormatError, match=r"conv2d_1/kernel has shape \(3, 3, 3, 2\), expected \(3, 3, 3, 5\)"):
        keras_sequential_generator(path, wider, latent_dim=4)
    with pytest.raises(FileFormatError, match="'conv2d_1', expected a batchnorm"):
        keras_sequential_generator(path, TINY[:3] + TINY[4:], latent_dim=4)
    with pytest.raises(FileFormatError, match="batch_normalization_1 are not part"):
        keras_sequential_generator(path, TINY[:4], latent_dim=4)
    with pytest.raises(FileFormatError, match=r"dense_1/kernel has shape \(4, 12\), expected \(8, 12\)"):
        keras_sequential_generator(path, TINY, latent_dim=8)
    with pytest.raises(FileFormatError, match="needs more"):
        keras_sequential_generator(path, TINY + (("conv2d", {"filters": 1, "kernel_size": 3}),), latent_dim=4)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(FileFormatError, match="junk.h5"):
        read_keras_weights(junk)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FileFormatError, match="no layer_names"):
        read_keras_weights(tmp_path / "plain.h5")
    with pytest.raises(FileFormatError, match="no such file"):
        read_keras_weights(tmp_path / "missing.h5")


# --- the real Keras MNIST DCGAN (skipped without ../shared) -------------------------------------

_generate = jax.jit(lambda gen, z: gen(z))


@functools.cache
def _load(path):
    return load_keras_dcgan_generator(path)


@functools.cache
def _samples(path):
    gen = _load(path)
    z = jax.random.normal(jax.random.PRNGKey(0), (1000, gen.latent_dim))
    return np.asarray(_generate(gen, z))


@pytest.fixture
def dcgan_path(shared):
    return shared("networks", "generative", "keras_dcgan_mnist", "mnist_generator.h5")


@pytest.fixture
def dcgan(dcgan_path):
    return _load(dcgan_path)


@pytest.fixture
def samples(dcgan_path):
    return _samples(dcgan_path)


def test_dcgan_loads(dcgan, dcgan_path):
    names = [name for name, _ in read_keras_weights(dcgan_path)]
    assert names == ["dense_2", "conv2d_5", "batch_normalization_4", "conv2d_6", "batch_normalization_5", "conv2d_7"]
    assert isinstance(dcgan, Generator)
    assert (dcgan.latent_dim, dcgan.output_shape, dcgan.output_range) == (100, (28, 28, 1), (-1.0, 1.0))
    n_params = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(dcgan))
    assert n_params == 100 * 6272 + 6272 + 9 * 128 * 128 + 128 + 4 * 128 + 9 * 128 * 64 + 64 + 4 * 64 + 9 * 64 + 1
    assert len(dcgan.hash) == 16 and dcgan.hash == load_keras_dcgan_generator(dcgan_path).hash
    assert dcgan.arch["keras_sequential"][0] == ["dense", dict(DCGAN_MNIST_GENERATOR[0][1])]


def test_dcgan_shape_range_deterministic(dcgan, samples):
    assert samples.shape == (1000, 28, 28, 1) and samples.dtype == np.float32
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    assert samples.min() < -0.99 and samples.max() > 0.99  # black background, saturated strokes
    z = jax.random.normal(jax.random.PRNGKey(0), (8, 100))
    first = np.asarray(_generate(dcgan, z))
    np.testing.assert_array_equal(first, np.asarray(_generate(dcgan, z)))
    np.testing.assert_allclose(first, samples[:8], atol=1e-5)
    unit = np.asarray(dcgan.to_unit(samples[:8]))
    np.testing.assert_allclose(unit, (samples[:8] + 1) / 2, atol=1e-7)


def test_dcgan_samples_are_digits(samples, shared):
    ort = pytest.importorskip("onnxruntime")
    net = shared("networks", "mnist", "vnncomp2021_mnistfc", "mnist-net_256x2.onnx")
    session = ort.InferenceSession(str(net), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    x = ((samples + 1) / 2).reshape(-1, 1, 784, 1).astype(np.float32)
    pred = np.array([session.run(None, {inp.name: xi})[0].argmax() for xi in x])
    counts = np.bincount(pred, minlength=10)
    assert (counts > 0).all(), counts
    assert counts.max() <= 0.35 * len(pred), counts


def test_dcgan_png_grid(samples, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = samples[:64, ..., 0].reshape(8, 8, 28, 28).transpose(0, 2, 1, 3).reshape(8 * 28, 8 * 28)
    out = tmp_path / "dcgan_samples.png"
    plt.imsave(out, (grid + 1) / 2, cmap="gray", vmin=0.0, vmax=1.0)
    assert out.stat().st_size > 1000
    assert plt.imread(out).shape[:2] == (224, 224)
