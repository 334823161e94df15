"""Loading a network with its preprocessing: ``NET.onnx`` (or ``NET.msgpack``) plus an optional sidecar
``NET.json`` that records, once per study, what the network expects of raw pixels::

    {"mean": [0.485, 0.456, 0.406], "std": [0.225], "domain": [0, 1]}

Arguments given explicitly override the sidecar key by key. The normalisation becomes part of the
network function (`network.with_preprocessing`), so radii stay in the domain's (pixel) space.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FileFormatError, InputError
from .network import Network, with_preprocessing
from .weights import load_network as _load_file

KEYS = ("mean", "std", "domain")


def sidecar_path(spec) -> Path | None:
    """The ``.json`` file next to a network file, or None for bundled names."""
    p = Path(str(spec))
    return p.with_suffix(".json") if p.suffix.lower() in (".onnx", ".msgpack", ".jrnet") else None


def read_sidecar(spec) -> dict:
    """The preprocessing recorded next to network ``spec`` (``{}`` when there is no sidecar)."""
    path = sidecar_path(spec)
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{path}: not a readable JSON preprocessing file ({e})") from None
    if not isinstance(record, dict) or set(record) - set(KEYS):
        extra = sorted(set(record) - set(KEYS)) if isinstance(record, dict) else type(record).__name__
        raise FileFormatError(f"{path}: unknown preprocessing keys {extra} (allowed: {', '.join(KEYS)})")
    return record


def write_sidecar(spec, *, mean=None, std=None, domain=None) -> Path | None:
    """Record the given preprocessing next to network file ``spec``; None (nothing written) when all are None."""
    record = {k: list(v) if isinstance(v, (list, tuple)) else v
              for k, v in (("mean", mean), ("std", std), ("domain", domain)) if v is not None}
    path = sidecar_path(spec)
    if not record or path is None:
        return None
    path.write_text(json.dumps(record) + "\n")
    return path


def load_network(spec: str | os.PathLike, *, mean=None, std=None, domain=None) -> Network:
    """A bundled name, ``.onnx`` or ``.msgpack`` file as a `Network` over raw inputs in ``domain``.

    ``mean``, ``std`` (scalars or per channel) and ``domain`` (``(lo, hi)``) default to the sidecar
    ``NET.json``; without either, the network is loaded as it is (known public ONNX networks get their
    published normalisation, see `onnx_import.KNOWN_NORMALIZATION`).
    """
    given = {k: v for k, v in (("mean", mean), ("std", std), ("domain", domain)) if v is not None}
    pre = {**read_sidecar(spec), **given}
    normalise = "mean" in pre or "std" in pre
    if normalise and str(spec).lower().endswith(".onnx"):
        net = _load_file(spec, mean=0.0, std=1.0)  # no built-in normalisation under the one given
    else:
        net = _load_file(spec)
    try:
        return with_preprocessing(net, **pre)
    except InputError as e:
        raise InputError(f"{spec}: {e}") from None
