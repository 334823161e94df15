"""Image classification datasets as NHWC float32 arrays in [0, 1].

``load_dataset(spec, split)`` reads MNIST, Fashion-MNIST, CIFAR-10 or GTSRB from

* an explicit path, ``spec = "NAME:PATH"``: an ``.npz`` file (keys ``x_train/y_train/x_test/y_test``,
  optional ``class_names``), or a directory holding the official IDX files
  (``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, ...), the CIFAR-10 python
  batches (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``) or an ``.npz``;
* the cache directory ``<cache>/NAME/`` (``<cache>`` is ``cache_dir``, else ``$JAXROBUST_CACHE``,
  else ``~/.cache/jaxrobust``), filled by ``download=True`` from the official sources with
  checksum verification (GTSRB has no download);
* for ``mnist`` / ``test`` only, when neither exists: the bundled sample of the first 1000 MNIST
  test images (``jaxrobust/_data/mnist_test_1000.npz``). The default commands run on this sample;
  ``Dataset.source`` says so and a warning is logged.

Image ``i`` of a dataset is always image ``i`` of its split (the sample is a prefix of the test
set); ``Dataset.indices`` keeps these ids through `select`.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import FileFormatError, InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
BUNDLED_SAMPLE = Path(__file__).with_name("_data") / "mnist_test_1000.npz"
BUNDLED_SOURCE = "bundled sample: first 1000 MNIST test images"


@dataclasses.dataclass(frozen=True)
class Resource:
    """One downloadable file: tried at each mirror in turn, kept only if its checksum matches."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    extract: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a known dataset; ``image_shape`` entries of None are free."""

    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, int | None, int]
    resources: tuple[Resource, ...] = ()


def _idx_resources(mirrors: Sequence[str], md5s: dict[str, str]) -> tuple[Resource, ...]:
    return tuple(Resource(f, tuple(m + f for m in mirrors), md5=h) for f, h in md5s.items())


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, tuple(str(i) for i in range(10)), (28, 28, 1), _idx_resources(_MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"})),
    "fashion_mnist": DatasetInfo(
        10, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"), (28, 28, 1), _idx_resources(_FASHION_MIRRORS, {
                 "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                 "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                 "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"})),
    "cifar10": DatasetInfo(
        10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (32, 32, 3), (Resource("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                               md5="c58f30108f718f92721af3b95e74349a", extract=True),)),
    "gtsrb": DatasetInfo(43, (
        "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
        "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
        "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 t",
        "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
        "Vehicles over 3.5 t prohibited", "No entry", "General caution", "Dangerous curve to the left",
        "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road",
        "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians", "Children crossing",
        "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing",
        "End of all speed and passing limits", "Turn right ahead", "Turn left ahead", "Ahead only",
        "Go straight or right", "Go straight or left", "Keep right", "Keep left", "Roundabout mandatory",
        "End of no passing", "End of no passing by vehicles over 3.5 t"), (None, None, 3)),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images of one split.

    Attributes:
      x: ``(N, H, W, C)`` float32 images in [0, 1].
      y: ``(N,)`` int32 labels in ``[0, num_classes)``.
      name: dataset name (``mnist``, ``fashion_mnist``, ``cifar10``, ``gtsrb`` or a custom name).
      split: ``train`` or ``test``.
      num_classes: number of classes.
      class_names: one name per class.
      source: where the data came from (a path, or `BUNDLED_SOURCE` for the bundled sample).
      indices: ``(N,)`` int64 position of each image in its split (image ids in results).
      id: dataset id used in results: ``NAME/SPLIT``, with ``:FILENAME`` appended for explicit paths.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    split: str
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    indices: np.ndarray
    id: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    @property
    def is_bundled_sample(self) -> bool:
        return self.source == BUNDLED_SOURCE


def default_cache_dir() -> Path:
    """``$JAXROBUST_CACHE`` if set, else ``~/.cache/jaxrobust``."""
    return Path(os.environ.get("JAXROBUST_CACHE") or Path.home() / ".cache" / "jaxrobust").expanduser()


def load_dataset(spec: str, split: str = "test", *, cache_dir=None, download: bool = False) -> Dataset:
    """Load ``spec`` (``NAME`` or ``NAME:PATH``) / ``split`` as a validated `Dataset`.

    Raises `InputError` for an unknown name or split, `FileFormatError` for missing, corrupt or
    malformed data (naming the file and how to obtain it).
    """
    name, path = _parse_spec(spec)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    info = DATASETS[name]
    if path is not None:
        path = Path(path).expanduser()
        return _from_raw(*_read_path(path, name, split), name, split, str(path), f"{name}/{split}:{path.name}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / name
    if _locate(folder, name, split) is None and download:
        download_dataset(name, cache_dir=root)
    if _locate(folder, name, split) is not None:
        return _from_raw(*_read_path(folder, name, split), name, split, str(folder), f"{name}/{split}")
    if name == "mnist" and split == "test":
        log.warning("full MNIST not found in %s; using the bundled sample of the first 1000 test images "
                    "(download=True or --download fetches all 10000)", folder)
        x, y, _ = _read_npz(BUNDLED_SAMPLE, split)
        return _from_raw(x, y, None, name, split, BUNDLED_SOURCE, f"{name}/{split}")
    how = (f"pass download=True (CLI --download) to fetch it into {folder}, or "
           if info.resources else "it cannot be downloaded; ")
    raise FileFormatError(f"{name} {split} data not found in {folder}; {how}"
                          f"use the spec {name}:PATH with a local .npz file or directory")


def from_arrays(x, y, name: str, split: str = "test", *, num_classes: int | None = None,
                class_names: Sequence[str] | None = None, source: str = "arrays") -> Dataset:
    """Validate user arrays ``x: (N,H,W[,C])`` (uint8 0..255 or float in [0,1]), ``y: (N,)`` into a `Dataset`.

    ``name`` is a known dataset (its metadata is used) or a custom name with ``num_classes`` given.
    Raises `InputError` on invalid arrays.
    """
    if name not in DATASETS and num_classes is None:
        raise InputError(f"custom dataset {name!r} needs num_classes")
    info = DATASETS.get(name)
    n_cls = int(num_classes if num_classes is not None else info.num_classes)
    names = tuple(class_names) if class_names is not None else (
        info.class_names if info and info.num_classes == n_cls else tuple(str(i) for i in range(n_cls)))
    shape = info.image_shape if info else (None, None, None)
    xa, ya = _validate(np.asarray(x), np.asarray(y), n_cls, shape, source, InputError)
    if len(names) != n_cls:
        raise InputError(f"{source}: {len(names)} class names for {n_cls} classes")
    return Dataset(xa, ya, name, split, n_cls, names, source, np.arange(len(ya), dtype=np.int64),
                   f"{name}/{split}")


def _parse_spec(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec:
        raise InputError(f"dataset spec must be a non-empty string, got {spec!r}")
    name, sep, path = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    name = {"cifar_10": "cifar10", "fmnist": "fashion_mnist"}.get(name, name)
    if name not in DATASETS:
        raise InputError(f"unknown dataset {spec!r}; use NAME or NAME:PATH with NAME one of {', '.join(DATASETS)}")
    if sep and not path:
        raise InputError(f"dataset spec {spec!r} has an empty path")
    return name, (path if sep else None)


def _from_raw(x, y, class_names, name, split, source, did) -> Dataset:
    info = DATASETS[name]
    xa, ya = _validate(x, y, info.num_classes, info.image_shape, source, FileFormatError)
    names = info.class_names
    if class_names is not None:
        names = tuple(str(c) for c in np.asarray(class_names).ravel())
        if len(names) != info.num_classes:
            raise FileFormatError(f"{source}: {len(names)} class names, expected {info.num_classes} for {name}")
    return Dataset(xa, ya, name, split, info.num_classes, names, source,
                   np.arange(len(ya), dtype=np.int64), did)


def _validate(x: np.ndarray, y: np.ndarray, num_classes: int, image_shape, where: str, err):
    """Check images/labels; return ``(float32 (N,H,W,C) in [0,1], int32 (N,))`` or raise ``err``."""
    if x.dtype.kind not in "uif":
        raise err(f"{where}: images have dtype {x.dtype}, expected uint8 or float")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise err(f"{where}: images have shape {x.shape}, expected (N, H, W) or (N, H, W, C)")
    if any(e is not None and e != s for e, s in zip(image_shape, x.shape[1:])):
        want = "(N, " + ", ".join("?" if e is None else str(e) for e in image_shape) + ")"
        raise err(f"{where}: images have shape {x.shape}, expected {want} (channels last)")
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise err(f"{where}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise err(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise err(f"{where}: the dataset is empty")
    if y.min() < 0 or y.max() >= num_classes:
        raise err(f"{where}: labels range over [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]")
    if x.dtype.kind in "ui":
        if x.min() < 0 or x.max() > 255:
            raise err(f"{where}: integer pixels range over [{x.min()}, {x.max()}], expected [0, 255]")
        xf = x.astype(np.float32) / np.float32(255.0)
    else:
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all():
            raise err(f"{where}: images contain NaN or inf")
        if xf.min() < -1e-6 or xf.max() > 1 + 1e-6:
            raise err(f"{where}: float pixels range over [{xf.min():.4g}, {xf.max():.4g}], expected [0, 1]")
        xf = np.clip(xf, 0.0, 1.0)
    return np.ascontiguousarray(xf), y.astype(np.int32)


# --- readers ---------------------------------------------------------------------------------

def _read_path(path: Path, name: str, split: str):
    """Return ``(x, y, class_names or None)`` from a file or directory."""
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".npz":
            return _read_npz(path, split)
        raise FileFormatError(f"{path}: unsupported file type; expected an .npz file or a directory "
                              "with IDX files or CIFAR-10 python batches")
    found = _locate(path, name, split)
    if found is None:
        raise FileFormatError(f"{path}: no {name} {split} data found (expected an .npz file, IDX files "
                              "such as t10k-images-idx3-ubyte.gz, or cifar-10-batches-py/)")
    reader, arg = found
    return reader(arg, split)


def _locate(folder: Path, name: str, split: str):
    """Find ``(reader, argument)`` for ``split`` in ``folder``, or None if it holds no such data."""
    if not folder.is_dir():
        return None
    for d in (folder / "cifar-10-batches-py", folder):
        if (d / ("test_batch" if split == "test" else "data_batch_1")).is_file():
            return _read_cifar, d
    images = _find_idx(folder, split, "images", 3)
    if images is not None:
        return _read_idx_pair, (images, folder)
    npzs = sorted(folder.glob("*.npz"))
    if (folder / f"{name}.npz").is_file():
        return _read_npz, folder / f"{name}.npz"
    if len(npzs) == 1:
        return _read_npz, npzs[0]
    if len(npzs) > 1:
        raise FileFormatError(f"{folder}: several .npz files ({', '.join(p.name for p in npzs)}); "
                              f"name one with {name}:PATH")
    return None


def _read_npz(path: Path, split: str):
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if f"x_{split}" not in keys or f"y_{split}" not in keys:
                raise FileFormatError(f"{path}: no x_{split}/y_{split} arrays (keys: {', '.join(sorted(keys))})")
            names = f["class_names"] if "class_names" in keys else None
            return f[f"x_{split}"], f[f"y_{split}"], names
    except FileFormatError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise FileFormatError(f"{path}: not a readable .npz file ({e})") from None


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _find_idx(folder: Path, split: str, kind: str, ndim: int) -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    return None


def _read_idx_pair(arg, split: str):
    images, folder = arg
    labels = _find_idx(folder, split, "labels", 1)
    if labels is None:
        raise FileFormatError(f"{folder}: found {images.name} but no matching labels file "
                              f"({'train' if split == 'train' else 't10k'}-labels-idx1-ubyte[.gz])")
    return read_idx(images), read_idx(labels), None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into an array of the declared shape and dtype."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise FileFormatError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FileFormatError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FileFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise FileFormatError(f"{path}: IDX data has {len(raw) - header} bytes but the header declares "
                              f"shape {dims} ({expected} bytes); the file is truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches are pickles; never run other code)."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module, name):
        if module == "_codecs" and name == "encode":  # how Python 3 pickles bytes at protocol < 3
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            if module.startswith("numpy.core") and hasattr(np, "_core"):
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise FileFormatError(f"{path}: not a readable CIFAR-10 python batch ({e})") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar(folder: Path, split: str):
    files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise FileFormatError(f"{path}: missing CIFAR-10 batch")
        batch = _load_pickle(path)
        if "data" not in batch or "labels" not in batch:
            raise FileFormatError(f"{path}: batch lacks 'data' or 'labels' (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise FileFormatError(f"{path}: data has shape {data.shape} dtype {data.dtype}, "
                                  "expected (N, 3072) uint8")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    names = None
    if (folder / "batches.meta").is_file():
        meta = _load_pickle(folder / "batches.meta")
        if "label_names" in meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    return np.concatenate(xs), np.concatenate(ys), names


# --- downloads -------------------------------------------------------------------------------

def download_dataset(name: str, cache_dir=None) -> Path:
    """Fetch ``name`` into ``<cache>/name/`` from its official sources; return that folder.

    Files already present with the right checksum are kept. Raises `InputError` for datasets without
    a download (GTSRB) and `FileFormatError` when no mirror delivers a file with the right checksum.
    """
    name, _ = _parse_spec(name)
    info = DATASETS[name]
    if not info.resources:
        raise InputError(f"{name} has no download; use {name}:PATH with a local .npz file "
                         "(keys x_test/y_test, NHWC uint8)")
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    for res in info.resources:
        dest = folder / res.filename
        if not (dest.is_file() and _checksum_error(dest, res.md5, res.sha256) is None):
            fetch_verified(res.urls, dest, md5=res.md5, sha256=res.sha256)
        if res.extract:
            _extract_tar(dest, folder)
    return folder


def fetch_verified(urls: Sequence[str], dest, *, md5: str | None = None, sha256: str | None = None) -> Path:
    """Download the first of ``urls`` whose content matches the checksum(s) to ``dest`` (atomically).

    Raises `FileFormatError` listing each URL's failure (network error or checksum mismatch).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        os.close(fd)
        tmp = Path(tmp)
        try:
            _fetch(url, tmp)
            problem = _checksum_error(tmp, md5, sha256)
            if problem is None:
                os.replace(tmp, dest)
                return dest
            failures.append(f"{url}: {problem}")
        except OSError as e:  # urllib errors are OSErrors
            failures.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise FileFormatError(f"could not download {dest.name}: " + "; ".join(failures))


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _checksum_error(path: Path, md5: str | None, sha256: str | None) -> str | None:
    """None if ``path`` matches the given digests, else a description of the mismatch."""
    hashers = {k: hashlib.new(k) for k, v in (("md5", md5), ("sha256", sha256)) if v}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    for kind, want in (("md5", md5), ("sha256", sha256)):
        if want and hashers[kind].hexdigest() != want.lower():
            return f"{kind} checksum mismatch (got {hashers[kind].hexdigest()}, expected {want})"
    return None


def _extract_tar(archive: Path, folder: Path) -> None:
    """Extract the regular files of ``archive`` into ``folder``, refusing paths that leave it."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                target = (folder / member.name).resolve()
                if not member.isfile():
                    continue
                if folder.resolve() not in target.parents:
                    raise FileFormatError(f"{archive}: member {member.name!r} escapes the target folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise FileFormatError(f"{archive}: cannot extract ({e})") from None


# --- selection and layouts -------------------------------------------------------------------

def parse_indices(spec, n: int) -> np.ndarray:
    """Parse ``"0:100"``, ``":100"``, ``"-10:"``, ``"3,5,-1"``, ``"0:1000:10"``, ``"all"`` (or ints) into ``(K,)``
    int64 positions.

    Ranges are ``start:stop[:step]`` as Python slices: stop exclusive, either end open, negative values count
    from the end (``-10:`` is the last ten); single indices may be negative too. Raises `InputError` for
    malformed specs, indices outside ``[-n, n)``, empty selections and duplicates.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("", "all", ":"):
            return np.arange(n, dtype=np.int64)
        parts = []
        for part in text.split(","):
            part = part.strip()
            fields = part.split(":")
            if len(fields) == 1:
                i = _parse_int(fields[0], spec)
                parts.append(np.array([i + n if i < 0 else i], dtype=np.int64))
                continue
            if len(fields) > 3:
                raise InputError(f"bad index spec {spec!r}: {part!r} is not an integer or start:stop[:step]")
            start = _parse_int(fields[0], spec, 0)
            stop = _parse_int(fields[1], spec, n)
            step = _parse_int(fields[2], spec, 1) if len(fields) == 3 else 1
            if step <= 0:
                raise InputError(f"index range {part!r}: step must be positive")
            start, stop = (v + n if v < 0 else v for v in (start, stop))
            if start < 0 or stop > n or start >= stop:
                raise InputError(f"index range {part!r} is empty or outside [0, {n}) for a dataset of {n} images")
            parts.append(np.arange(start, stop, step, dtype=np.int64))
        idx = np.concatenate(parts)
    else:
        idx = np.asarray(spec).reshape(-1)
        if idx.dtype.kind not in "ui" and idx.size:
            raise InputError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
    if idx.size == 0:
        raise InputError("the index selection is empty")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise InputError(f"index {int(bad[0])} is out of range for a dataset of {n} images")
    if len(np.unique(idx)) != len(idx):
        raise InputError(f"the index selection {spec!r} contains duplicates")
    return idx


def _parse_int(text: str, spec, default: int | None = None) -> int:
    text = text.strip()
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"bad index spec {spec!r}: {text!r} is not an integer") from None


def select(dataset: Dataset, indices) -> Dataset:
    """Subset of ``dataset`` at ``indices`` (a `parse_indices` spec, ints or slice); keeps the image ids."""
    if isinstance(indices, slice):
        indices = np.arange(len(dataset))[indices]
    idx = parse_indices(indices, len(dataset))
    return dataclasses.replace(dataset, x=dataset.x[idx], y=dataset.y[idx], indices=dataset.indices[idx])


def to_network_input(x, input_shape):
    """Images ``(N, H, W, C)`` -> network inputs ``(N, *input_shape)`` (numpy or JAX arrays).

    Single-channel images are reshaped to any input shape of the same size (``(784,)``, ``(784, 1)``,
    ``(1, 28, 28)``, ...); multi-channel images map to ``(H, W, C)`` or, transposed, ``(C, H, W)``.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if x.ndim != 4:
        raise InputError(f"images must have shape (N, H, W, C), got {tuple(x.shape)}")
    n, h, w, c = x.shape
    if input_shape == (h, w, c):
        return x
    if c == 1 and math.prod(input_shape) == h * w:
        return x.reshape((n,) + input_shape)
    if input_shape == (c, h, w):
        return x.transpose(0, 3, 1, 2)
    raise InputError(f"cannot map images of shape {(h, w, c)} to network input shape {input_shape}")


def from_network_input(x, image_shape):
    """Inverse of `to_network_input`: ``(N, *input_shape)`` -> images ``(N, H, W, C)``."""
    h, w, c = (int(d) for d in image_shape)
    n, input_shape = x.shape[0], tuple(x.shape[1:])
    if input_shape == (h, w, c):
        return x
    if c == 1 and math.prod(input_shape) == h * w:
        return x.reshape((n, h, w, 1))
    if input_shape == (c, h, w):
        return x.transpose(0, 2, 3, 1)
    raise InputError(f"cannot map network inputs of shape {input_shape} to images of shape {(h, w, c)}")
