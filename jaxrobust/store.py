"""Append-only result tables in HDF5, safe to kill at any moment and resume.

A table is a group of equally long, resizable column datasets. Rows are keyed by
(network hash, dataset, split, index, config hash). HDF5 files are not crash-safe when a writer is
killed mid-write, so every change is a transaction: the file is copied, the copy is changed, synced
and atomically renamed over the original. A killed run therefore loses at most the batch it was
writing, the file on disk is always valid, and a resumed run skips every committed key: no row is
lost or duplicated. One writer per file at a time.
The configuration of each run is stored once, as JSON, under ``configs/<config hash>``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from .errors import FileFormatError, InputError

KEY = ("network", "dataset", "split", "index", "config")
STR = h5py.string_dtype()


def config_hash(config: Mapping) -> str:
    """16-hex-digit hash of a JSON-able configuration dict."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """One table of an HDF5 results file.

    ``columns`` maps a column name to ``(dtype, shape)``: ``"str"``, ``"i8"``, ``"f8"``, ``"f4"``, ``"bool"``
    with per-row shape ``()`` for scalars or e.g. ``(28, 28, 1)`` for a counterexample. The key columns
    (network, dataset, split, config: str; index: i8) are always present.
    """

    def __init__(self, path, table: str, columns: Mapping[str, tuple]):
        self.path, self.table = Path(path), table
        self.columns = {"network": ("str", ()), "dataset": ("str", ()), "split": ("str", ()),
                        "index": ("i8", ()), "config": ("str", ()), **columns}
        if self.path.exists():
            with self._open("r") as f:
                g = f.get(table)
                todo = g is None or any(name not in g for name in self.columns)
                for name, (_, shape) in self.columns.items():
                    if g is not None and name in g and g[name].shape[1:] != tuple(shape):
                        raise FileFormatError(f"{self.path}: column {table}/{name} has row shape "
                                              f"{g[name].shape[1:]}, expected {tuple(shape)}")
        if not self.path.exists() or todo:
            with self._transaction() as f:
                g = f.require_group(table)
                n = len(g["index"]) if "index" in g else 0
                for name, (dtype, shape) in self.columns.items():
                    if name not in g:
                        g.create_dataset(name, shape=(n, *shape), maxshape=(None, *shape),
                                         dtype=STR if dtype == "str" else dtype, chunks=(64, *shape),
                                         fillvalue=_fill(dtype))

    @contextlib.contextmanager
    def _open(self, mode: str):
        try:
            f = h5py.File(self.path, mode)
        except OSError as e:
            raise FileFormatError(f"cannot open results file {self.path}: {e}") from None
        with f:
            yield f

    @contextlib.contextmanager
    def _transaction(self):
        """Change a copy of the file and atomically replace the original with it."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        else:
            tmp.unlink(missing_ok=True)
        try:
            f = h5py.File(tmp, "a")
        except OSError as e:
            raise FileFormatError(f"cannot write results file {self.path}: {e}") from None
        with f:
            yield f
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        with self._open("r") as f:
            return len(f[self.table]["index"])

    def save_config(self, config: Mapping) -> str:
        """Store ``config`` (JSON) under its hash, once; return the hash."""
        h = config_hash(config)
        if h not in self.configs():
            with self._transaction() as f:
                f.require_group("configs").attrs[h] = json.dumps(config, sort_keys=True, default=str)
        return h

    def configs(self) -> dict[str, dict]:
        with self._open("r") as f:
            g = f.get("configs")
            return {} if g is None else {k: json.loads(v) for k, v in g.attrs.items()}

    def done(self, network: str, dataset: str, split: str, config: str) -> set[int]:
        """Indices already stored for this (network, dataset, split, config)."""
        d = self.read(("network", "dataset", "split", "index", "config"))
        m = (d["network"] == network) & (d["dataset"] == dataset) & (d["split"] == split) & (d["config"] == config)
        return set(d["index"][m].tolist())

    def pending(self, network: str, dataset, positions, config: str, resume: bool) -> np.ndarray:
        """The positions in ``dataset`` whose image ids (``dataset.indices``) have no row yet for
        (network, dataset, split, config). Raises when rows exist and ``resume`` is False."""
        done = self.done(network, dataset.name, dataset.split, config)
        if done and not resume:
            raise InputError(f"{self.path} already holds {len(done)} of these rows (same network, data and "
                             "configuration); pass --resume to continue or choose another --out")
        return np.array([p for p in np.asarray(positions, dtype=int) if int(dataset.indices[p]) not in done], dtype=int)

    def append(self, rows: Mapping[str, Iterable]) -> None:
        """Append a batch of rows (every column, equal lengths) and commit it."""
        commit([(self, rows)])

    def _checked(self, rows: Mapping[str, Iterable]) -> tuple[dict[str, np.ndarray], int]:
        missing = set(self.columns) - set(rows)
        if missing:
            raise InputError(f"rows for table {self.table!r} lack columns {sorted(missing)}")
        arrays = {k: np.asarray(rows[k]) for k in self.columns}
        m = {len(a) for a in arrays.values()}
        if len(m) != 1:
            raise InputError(f"rows for table {self.table!r} have unequal lengths {sorted(m)}")
        return arrays, m.pop()

    def _write(self, f: h5py.File, arrays: Mapping[str, np.ndarray], m: int) -> None:
        g = f[self.table]
        n = len(g["index"])
        for name, a in arrays.items():
            dtype, _ = self.columns[name]
            g[name].resize(n + m, axis=0)
            g[name][n:] = a.astype(object) if dtype == "str" else a

    def log_run(self, record: Mapping) -> None:
        """Keep a JSON ``record`` of a run (its configuration hash, devices, workers) in the file's ``runs`` group."""
        with self._transaction() as f:
            g = f.require_group("runs")
            g.attrs[f"{len(g.attrs):06d}"] = json.dumps(record, sort_keys=True, default=str)

    def runs(self) -> list[dict]:
        """The records of `log_run`, oldest first."""
        with self._open("r") as f:
            g = f.get("runs")
            return [] if g is None else [json.loads(g.attrs[k]) for k in sorted(g.attrs)]

    def read(self, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Committed rows as numpy arrays (strings decoded)."""
        with self._open("r") as f:
            g = f[self.table]
            n = len(g["index"])
            out = {}
            for name in (columns or self.columns):
                d = g[name]
                out[name] = d.asstr()[:n] if self.columns[name][0] == "str" else d[:n]
            return out

    def to_csv(self, path, columns: Iterable[str]) -> int:
        """Write the scalar ``columns`` of all committed rows to CSV; return the row count."""
        cols = list(columns)
        d = self.read(cols)
        n = len(d[cols[0]]) if cols else 0
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for i in range(n):
                w.writerow([_csv_value(d[c][i]) for c in cols])
        return n


def commit(batches: Iterable[tuple[ResultStore, Mapping[str, Iterable]]]) -> None:
    """Append rows to one or more tables of one file in a single transaction: all of them are stored, or none."""
    checked = [(store, *store._checked(rows)) for store, rows in batches]
    checked = [(store, arrays, m) for store, arrays, m in checked if m]
    if not checked:
        return
    if len({store.path for store, _, _ in checked}) != 1:
        raise InputError("commit appends to the tables of one file only")
    with checked[0][0]._transaction() as f:
        for store, arrays, m in checked:
            store._write(f, arrays, m)


def _fill(dtype: str):
    return {"str": b"", "bool": False, "i8": -1}.get(dtype, np.nan)


def _csv_value(v):
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else repr(float(v))
    return v.item() if isinstance(v, np.generic) else v
