"""The per-image results released with Bosman et al. (JAIR 2025) and the soundness check against them.

Their files (``results_*.csv``) hold one row per (network, image): ``epsilon_value`` (largest ε that
αβ-CROWN proved robust, on a grid of step 0.002; 0.0039 for CIFAR-10) and ``smallest_sat_value`` (smallest ε
where a counterexample was found). A sound result of ours never certifies above their counterexample and never
finds a counterexample below their certificate (allowing one grid step).

A CIFAR-10 ``image_id`` is a position in the authors' class-balanced sample of 100 images per split, not an
index into the test set: `jair_cifar_image` finds the image (see ``benchmarks/jair_cifar_sample.py``).
"""
from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FileFormatError, InputError

GRID_STEP = 0.002
CIFAR_GRID_STEP = 0.0039


class Reference(NamedTuple):
    certified: float         # epsilon_value (NaN where the file leaves it empty)
    counterexample: float    # smallest_sat_value
    time_s: float            # total_time
    label: int               # original_label, -1 where empty


def load_jair(path, network: str, split: str = "test") -> dict[int, Reference]:
    """Rows of one network (file name as in ``network_path``, e.g. ``mnist-net_256x2.onnx``) and split, by image id."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"no JAIR results file {path}")
    out = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["network_path"].strip() == network and r["split"].strip() == split:
                out[int(r["image_id"])] = Reference(_num(r["epsilon_value"]), _num(r["smallest_sat_value"]),
                                                    _num(r["total_time"]), int(_num(r["original_label"], -1)))
    return out


def _num(text: str, missing=float("nan")) -> float:
    """A CSV number; empty cells (the released files have a few) become ``missing``."""
    text = text.strip()
    return float(text) if text else missing


def violations(ref: dict[int, Reference], ids, eps_lower, eps_upper, tol: float = GRID_STEP) -> dict:
    """Count unsound results: ``eps_lower`` above their counterexample, or ``eps_upper`` below their certificate
    (each beyond ``tol``). NaN values are skipped. Returns counts and the offending image ids."""
    lower_bad, upper_bad = [], []
    for i, lo, up in zip(ids, eps_lower, eps_upper):
        r = ref.get(int(i))
        if r is None:
            continue
        if np.isfinite(lo) and lo > r.counterexample + tol:
            lower_bad.append(int(i))
        if np.isfinite(up) and up < r.certified - tol:
            upper_bad.append(int(i))
    checked = sum(int(i) in ref for i in ids)
    return {"checked": checked, "lower_above_their_counterexample": lower_bad,
            "upper_below_their_certificate": upper_bad, "violations": len(lower_bad) + len(upper_bad)}


@functools.lru_cache(maxsize=1)
def _cifar_sample() -> dict:
    return json.loads((Path(__file__).parent / "_data" / "jair_cifar_sample.json").read_text())


def jair_cifar_image(image_id: int, split: str, labels) -> int | None:
    """Index of the image behind the JAIR CIFAR-10 ``image_id`` (``split``: test or train) among images in the
    official CIFAR-10 order whose labels are ``labels (N,)`` (the whole split or a prefix of it, such as the
    first 100 test images); None when they do not include it. The sample holds ``(class, rank within class)``
    per id."""
    if split not in ("test", "train"):
        raise InputError(f"split must be test or train, got {split!r}")
    pairs = _cifar_sample()[split]
    if not 0 <= int(image_id) < len(pairs):
        raise InputError(f"JAIR CIFAR image ids run from 0 to {len(pairs) - 1}, got {image_id}")
    c, k = pairs[int(image_id)]
    hits = np.flatnonzero(np.asarray(labels) == c)
    return int(hits[k]) if k < len(hits) else None
