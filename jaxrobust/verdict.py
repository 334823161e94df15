"""The one verdict vocabulary of jaxrobust: every query is ROBUST (a proof), VIOLATED (a counterexample that a
plain forward pass confirms) or UNKNOWN (with the reason it was not decided).

Statuses are small integers (``int8`` arrays, as stored) that name themselves: ``Status(s).name``.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Status(enum.IntEnum):
    VIOLATED = -1
    UNKNOWN = 0
    ROBUST = 1


ROBUST, UNKNOWN, VIOLATED = Status.ROBUST, Status.UNKNOWN, Status.VIOLATED


class Verdicts(NamedTuple):
    """Verdicts of a batch: ``status (B,) int8`` (`Status` values), ``counterexample (B, *shape) float32``
    (NaN unless VIOLATED), ``reason (B,) str`` why each was decided or not (e.g. ``"attack"``,
    ``"crown"``, ``"bab"``, ``"timeout"``; empty where the source gives none)."""
    status: np.ndarray
    counterexample: np.ndarray
    reason: np.ndarray | None = None


def status_names(status) -> np.ndarray:
    """``(B,)`` names (``"ROBUST"``, ``"VIOLATED"``, ``"UNKNOWN"``) of ``status`` values."""
    return np.array([Status(int(s)).name for s in np.asarray(status).reshape(-1)], dtype=object)
