"""The per-image results released with Bosman et al. (JAIR 2025) and the soundness check against them.

Their files (``results_*.csv``) hold one row per (network, image): ``epsilon_value`` (largest ε that
αβ-CROWN proved robust, on a grid of step 0.002) and ``smallest_sat_value`` (smallest ε where a
counterexample was found). A sound result of ours never certifies above their counterexample and never
finds a counterexample below their certificate (allowing one grid step).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FileFormatError

GRID_STEP = 0.002


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
