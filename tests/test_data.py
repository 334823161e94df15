"""Dataset loaders, validation, index parsing, layout conversion and verified downloads."""
import dataclasses
import gzip
import hashlib
import io
import logging
import pickle
import struct
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust import data
from jaxrobust.data import (
    Dataset,
    fetch_verified,
    from_arrays,
    from_network_input,
    load_dataset,
    parse_indices,
    read_idx,
    select,
    to_network_input,
)
from jaxrobust.errors import FileFormatError, InputError

RNG = np.random.default_rng(0)


def _images(n, shape=(28, 28)):
    return RNG.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n, k=10):
    return RNG.integers(0, k, size=n).astype(np.uint8)


def _write_idx(path, arr, gz):
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(
        arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _write_idx_dir(folder, gz=True, n_train=6, n_test=4):
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    arrays = {"train": (_images(n_train), _labels(n_train)), "test": (_images(n_test), _labels(n_test))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", arrays[split][0], gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", arrays[split][1], gz)
    return arrays


def _write_cifar_dir(folder, n=3):
    """Synthetic ``cifar-10-batches-py`` (pickle protocol 2, bytes keys, like the official files)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n).tolist()
        with open(folder / fname, "wb") as fh:
            pickle.dump({b"batch_label": fname.encode(), b"data": d, b"labels": labels}, fh, protocol=2)
        batches[fname] = (d, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh, protocol=2)
    return batches


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXROBUST_CACHE", str(cache))
    return cache


# --- loaders -----------------------------------------------------------------------------------

def test_npz_loader(tmp_path):
    xtr, ytr, xte, yte = _images(5), _labels(5), _images(3), _labels(3)
    path = tmp_path / "m.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_dataset(f"mnist:{path}", "train")
    assert isinstance(ds, Dataset) and len(ds) == 5
    assert ds.x.shape == (5, 28, 28, 1) and ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    np.testing.assert_allclose(ds.x[..., 0], xtr / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.y, ytr)
    assert (ds.name, ds.split, ds.num_classes, ds.class_names[3]) == ("mnist", "train", 10, "3")
    assert ds.id == "mnist/train:m.npz" and ds.source == str(path) and not ds.is_bundled_sample
    np.testing.assert_array_equal(ds.indices, np.arange(5))
    assert len(load_dataset(f"mnist:{path}", "test")) == 3


def test_npz_float_nhwc_and_class_names(tmp_path):
    x = RNG.random((4, 32, 32, 3), dtype=np.float32)
    path = tmp_path / "c.npz"
    names = np.array([f"c{i}" for i in range(10)])
    np.savez_compressed(path, x_test=x, y_test=np.arange(4), class_names=names)
    ds = load_dataset(f"cifar10:{path}")
    np.testing.assert_array_equal(ds.x, x)
    assert ds.class_names == tuple(names)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader(tmp_path, gz):
    arrays = _write_idx_dir(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(f"fashion_mnist:{tmp_path / 'fm'}", split)
        np.testing.assert_allclose(ds.x[..., 0] * 255, arrays[split][0], atol=1e-4)
        np.testing.assert_array_equal(ds.y, arrays[split][1])
    assert ds.class_names[0] == "T-shirt/top"


def test_read_idx_errors(tmp_path):
    good = _write_idx(tmp_path / "a-idx3-ubyte", _images(2), gz=False)
    truncated = tmp_path / "t-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(FileFormatError, match="t-idx3-ubyte.*truncated"):
        read_idx(truncated)
    bad_magic = tmp_path / "b-idx3-ubyte"
    bad_magic.write_bytes(b"\x01\x02\x03\x04" + good.read_bytes()[4:])
    with pytest.raises(FileFormatError, match="bad magic"):
        read_idx(bad_magic)
    bad_gz = tmp_path / "c-idx3-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(good.read_bytes())[:40])
    with pytest.raises(FileFormatError, match="c-idx3-ubyte.gz"):
        read_idx(bad_gz)


def test_idx_missing_labels(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", _images(2), gz=True)
    with pytest.raises(FileFormatError, match="no matching labels file"):
        load_dataset(f"mnist:{tmp_path}")


def test_cifar_batches(tmp_path):
    batches = _write_cifar_dir(tmp_path / "cifar-10-batches-py")
    test = load_dataset(f"cifar10:{tmp_path}", "test")
    d, labels = batches["test_batch"]
    assert test.x.shape == (3, 32, 32, 3)
    i, r, c, ch = 1, 5, 7, 2  # channel planes of 1024 row-major pixels
    assert test.x[i, r, c, ch] == pytest.approx(d[i, ch * 1024 + r * 32 + c] / 255.0)
    np.testing.assert_array_equal(test.y, labels)
    train = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "train")
    assert len(train) == 15 and train.class_names[-1] == "truck"


def test_cifar_refuses_foreign_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("not executed",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(FileFormatError, match="refusing to load .*print"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cache_lookup(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _write_idx_dir(cache / "mnist")
    ds = load_dataset("mnist", "train", cache_dir=cache)
    assert ds.source == str(cache / "mnist") and ds.id == "mnist/train" and len(ds) == 6
    monkeypatch.setenv("JAXROBUST_CACHE", str(cache))
    assert len(load_dataset("mnist", "test")) == 4


def test_bundled_sample(empty_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxrobust.data"):
        ds = load_dataset("mnist", "test")
    assert ds.is_bundled_sample and ds.source == data.BUNDLED_SOURCE and ds.id == "mnist/test"
    assert ds.x.shape == (1000, 28, 28, 1) and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert np.bincount(ds.y, minlength=10).min() > 50
    assert "bundled sample" in caplog.text


def test_bundled_sample_matches_shared(shared, empty_cache):
    full = np.load(shared("data", "mnist.npz"))
    ds = load_dataset("mnist")
    np.testing.assert_array_equal(ds.y, full["y_test"][:1000])
    np.testing.assert_array_equal(np.rint(ds.x[..., 0] * 255).astype(np.uint8), full["x_test"][:1000])


def test_missing_data_errors(empty_cache, tmp_path):
    with pytest.raises(FileFormatError, match="download=True"):
        load_dataset("mnist", "train")
    with pytest.raises(FileFormatError, match="fashion_mnist test data not found"):
        load_dataset("fashion_mnist")
    with pytest.raises(FileFormatError, match="cannot be downloaded"):
        load_dataset("gtsrb")
    with pytest.raises(InputError, match="gtsrb has no download"):
        load_dataset("gtsrb", download=True)
    with pytest.raises(FileFormatError, match="no such file"):
        load_dataset(f"mnist:{tmp_path / 'nope.npz'}")
    with pytest.raises(FileFormatError, match="no mnist test data found"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(InputError, match="unknown split"):
        load_dataset("mnist", "val")


@pytest.mark.parametrize("arrays, match", [
    (dict(x_test=_images(3), y_test=_labels(4)), "3 images but 4 labels"),
    (dict(x_test=_images(3), y_test=np.array([0, 1, 10])), r"labels range over \[0, 10\]"),
    (dict(x_test=_images(3), y_test=np.array([0.0, 1.0, 2.0])), "1-D integer array"),
    (dict(x_test=_images(2, (32, 32)), y_test=_labels(2)), r"expected \(N, 28, 28, 1\)"),
    (dict(x_test=_images(2, (1, 28, 28)), y_test=_labels(2)), r"expected \(N, 28, 28, 1\)"),
    (dict(x_test=np.full((2, 28, 28), 2.0, np.float32), y_test=_labels(2)), r"expected \[0, 1\]"),
    (dict(x_test=np.full((2, 28, 28), np.nan, np.float32), y_test=_labels(2)), "NaN"),
    (dict(x_test=np.full((2, 28, 28), 300, np.int32), y_test=_labels(2)), r"expected \[0, 255\]"),
    (dict(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)), "empty"),
    (dict(x_train=_images(2), y_train=_labels(2)), "no x_test/y_test"),
])
def test_validation_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(FileFormatError, match=match) as info:
        load_dataset(f"mnist:{path}")
    assert str(path) in str(info.value)


def test_corrupt_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x_test=_images(50), y_test=_labels(50))
    for name, content in (("trunc.npz", good.read_bytes()[:300]), ("junk.npz", b"not a zip file at all")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FileFormatError, match=name):
            load_dataset(f"mnist:{tmp_path / name}")


def test_from_arrays():
    ds = from_arrays(_images(3, (5, 5)), [0, 1, 2], "toy", num_classes=3)
    assert ds.x.shape == (3, 5, 5, 1) and ds.class_names == ("0", "1", "2")
    with pytest.raises(InputError, match="labels range"):
        from_arrays(_images(2), [0, 11], "mnist")
    with pytest.raises(InputError, match="needs num_classes"):
        from_arrays(_images(2), [0, 1], "toy")


# --- indices and layouts -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("0:5", [0, 1, 2, 3, 4]), ("3,5,9", [3, 5, 9]), ("0:20:5", [0, 5, 10, 15]), (":3", [0, 1, 2]),
    ("18:", [18, 19]), ("1:3, 7", [1, 2, 7]), ("all", list(range(20))), ([4, 2], [4, 2]), (7, [7]),
    ("-3:", [17, 18, 19]), ("-1", [19]), ("-5:-3", [15, 16]), (":-18", [0, 1]), ("0,-1", [0, 19]),
])
def test_parse_indices(spec, expected):
    np.testing.assert_array_equal(parse_indices(spec, 20), expected)


@pytest.mark.parametrize("spec, match", [
    ("0:21", "outside"), ("20", "out of range"), ("-21", "out of range"), ("-21:", "outside"),
    ("-1,19", "duplicates"), ([-1], "out of range"), ("5:5", "empty"),
    ("0:10:0", "step must be positive"), ("a:b", "not an integer"), ("1,x", "not an integer"),
    ("1:2:3:4", "start:stop"), ("1,1", "duplicates"), ([], "empty"), ([0.5], "integers"),
])
def test_parse_indices_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_indices(spec, 20)


def test_select_keeps_image_ids():
    ds = from_arrays(_images(10), np.arange(10) % 10, "mnist")
    sub = select(select(ds, "2:10:2"), "1,3")
    np.testing.assert_array_equal(sub.indices, [4, 8])
    np.testing.assert_array_equal(sub.x, ds.x[[4, 8]])
    np.testing.assert_array_equal(select(ds, slice(7, None)).indices, [7, 8, 9])


@pytest.mark.parametrize("image_shape, input_shape", [
    ((28, 28, 1), (784,)), ((28, 28, 1), (784, 1)), ((28, 28, 1), (1, 28, 28)), ((28, 28, 1), (28, 28, 1)),
    ((32, 32, 3), (3, 32, 32)), ((32, 32, 3), (32, 32, 3)),
])
def test_layout_round_trip(image_shape, input_shape):
    x = RNG.random((2, *image_shape), dtype=np.float32)
    y = to_network_input(x, input_shape)
    assert y.shape == (2, *input_shape)
    np.testing.assert_array_equal(from_network_input(y, image_shape), x)
    if input_shape == (3, 32, 32):
        assert y[1, 2, 4, 5] == x[1, 4, 5, 2]
    if input_shape == (784,):
        assert y[0, 28 * 3 + 5] == x[0, 3, 5, 0]
    np.testing.assert_array_equal(to_network_input(jnp.asarray(x), input_shape), y)


def test_layout_errors():
    with pytest.raises(InputError, match="cannot map images"):
        to_network_input(np.zeros((1, 32, 32, 3)), (3072,))
    with pytest.raises(InputError, match="cannot map images"):
        to_network_input(np.zeros((1, 28, 28, 1)), (785,))
    with pytest.raises(InputError, match=r"\(N, H, W, C\)"):
        to_network_input(np.zeros((28, 28, 1)), (784,))
    with pytest.raises(InputError, match="cannot map network inputs"):
        from_network_input(np.zeros((1, 3072)), (32, 32, 3))


# --- verified downloads (local file:// URLs only) ----------------------------------------------

def test_fetch_verified_checksums(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"payload" * 100)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "payload.bin"
    with pytest.raises(FileFormatError, match="md5 checksum mismatch"):
        fetch_verified([src.as_uri()], dest, md5="0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with pytest.raises(FileFormatError, match="sha256 checksum mismatch"):
        fetch_verified([src.as_uri()], dest, md5=md5, sha256="f" * 64)
    missing = (tmp_path / "missing.bin").as_uri()
    assert fetch_verified([missing, src.as_uri()], dest, md5=md5, sha256=sha) == dest
    assert dest.read_bytes() == src.read_bytes()


def _serve(monkeypatch, name, files, extract=False):
    """Point ``name``'s resources at local files (URL = file://)."""
    res = tuple(data.Resource(p.name, (p.as_uri(),), md5=hashlib.md5(p.read_bytes()).hexdigest(), extract=extract)
                for p in files)
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(data.DATASETS[name], resources=res))


def test_download_idx(tmp_path, monkeypatch):
    arrays = _write_idx_dir(tmp_path / "mirror")
    _serve(monkeypatch, "mnist", sorted((tmp_path / "mirror").iterdir()))
    ds = load_dataset("mnist", "test", cache_dir=tmp_path / "cache", download=True)
    assert not ds.is_bundled_sample and ds.source == str(tmp_path / "cache" / "mnist")
    np.testing.assert_array_equal(ds.y, arrays["test"][1])
    # a corrupted mirror file fails the checksum and leaves nothing behind
    (tmp_path / "mirror" / "train-images-idx3-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        load_dataset("mnist", "train", cache_dir=tmp_path / "cache2", download=True)
    assert not (tmp_path / "cache2" / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_download_cifar_tarball(tmp_path, monkeypatch):
    batches = _write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _serve(monkeypatch, "cifar10", [tarball], extract=True)
    ds = load_dataset("cifar10", "test", cache_dir=tmp_path / "cache", download=True)
    np.testing.assert_array_equal(ds.y, batches["test_batch"][1])


def test_extract_refuses_escaping_members(tmp_path):
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(FileFormatError, match="escapes"):
        data._extract_tar(tarball, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


# --- real files (skipped without ../shared) ----------------------------------------------------

def test_shared_mnist_and_fashion(shared):
    for name in ("mnist", "fashion_mnist"):
        ds = load_dataset(f"{name}:{shared('data', name + '.npz')}", "test")
        assert ds.x.shape == (10000, 28, 28, 1) and set(np.unique(ds.y)) == set(range(10))


def test_shared_cifar_and_gtsrb(shared):
    cifar = load_dataset(f"cifar10:{shared('data', 'cifar10', 'cifar10_test_first100_lossless.npz')}")
    assert cifar.x.shape == (100, 32, 32, 3) and cifar.class_names[0] == "airplane"
    with pytest.raises(FileFormatError, match="several .npz files"):
        load_dataset(f"cifar10:{shared('data', 'cifar10')}")
    gtsrb = load_dataset(f"gtsrb:{shared('data', 'gtsrb')}")
    assert gtsrb.x.shape == (2000, 32, 32, 3) and gtsrb.num_classes == 43 and gtsrb.y.max() <= 42
