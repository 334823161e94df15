"""Batch verification of a VNN-COMP instances file: one `verify.verify_property` query per row, resumable.

An instances file (``instances.csv`` of VNN-COMP) has rows ``onnx,vnnlib,timeout`` with paths relative
to the file. `run` verifies every row through `runner.ResumableRun` and stores one row per instance in
the table ``instances``: the result (``sat`` / ``unsat`` / ``unknown`` / ``timeout``, or ``error`` with
its message when the network or property cannot be handled), time, subdomains, the deciding stage and,
for ``sat``, the VNN-COMP witness text. Rows are keyed by the network file's content hash, the property
file's content hash, the instances file's name and the row number, so a renamed copy resumes.

Per-instance times range from milliseconds to hours, so each work unit is ``chunk`` instances (default
1) and Ray workers take them from a dynamic queue; each worker keeps the networks it has loaded (and
their compiled programs) across instances and runs its queries on its first device. The files must be
readable at the same paths on every worker (a shared file system on a cluster).
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FileFormatError, InputError, JaxRobustError
from .verify import VerifyConfig

TABLE = "instances"
COLUMNS = {"onnx": ("str", ()), "vnnlib": ("str", ()), "timeout": ("f8", ()), "result": ("str", ()),
           "time_s": ("f8", ()), "domains": ("i8", ()), "stage": ("str", ()), "witness": ("str", ()),
           "error": ("str", ())}
CSV_COLUMNS = ("index", "onnx", "vnnlib", "timeout", "result", "time_s", "domains", "stage")


class Instance(NamedTuple):
    """One row of an instances file: its row number, absolute paths, the timeout (s) and the files' hashes."""
    row: int
    onnx: str
    vnnlib: str
    timeout: float
    onnx_hash: str
    vnnlib_hash: str


def read_instances(path) -> list[Instance]:
    """The rows of an instances CSV (``onnx,vnnlib,timeout``; paths relative to it);
    every file must exist. Raises `InputError` / `FileFormatError` naming the row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no instances file {path}")
    out, hashes = [], {}
    with open(path, newline="") as fh:
        for row, fields in enumerate(csv.reader(fh)):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != 3:
                raise FileFormatError(f"{path} row {row + 1}: expected onnx,vnnlib,timeout, got {fields}")
            onnx, prop = (path.parent / f.strip() for f in fields[:2])
            try:
                timeout = float(fields[2])
            except ValueError:
                raise FileFormatError(f"{path} row {row + 1}: timeout {fields[2]!r} is not a number") from None
            if not timeout > 0:
                raise FileFormatError(f"{path} row {row + 1}: timeout must be > 0, got {timeout}")
            for f in (onnx, prop):
                if not f.is_file():
                    raise InputError(f"{path} row {row + 1}: no file {f}")
                if f not in hashes:
                    hashes[f] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
            out.append(Instance(row, str(onnx.resolve()), str(prop.resolve()), timeout, hashes[onnx], hashes[prop]))
    if not out:
        raise InputError(f"{path} lists no instances")
    return out


def witness(x: np.ndarray, y: np.ndarray) -> str:
    """The VNN-COMP counterexample text of a ``sat`` result: inputs ``x (n_0,)`` and outputs ``y (n_L,)``."""
    pairs = [f"(X_{i} {v!r})" for i, v in enumerate(np.asarray(x, float).tolist())]
    pairs += [f"(Y_{j} {v!r})" for j, v in enumerate(np.asarray(y, float).tolist())]
    return "(" + "\n ".join(pairs) + ")"


class _Task:
    """``compute(instances) -> {TABLE: rows}`` of `run`; networks are loaded once per process."""

    def __init__(self, cfg: VerifyConfig, timeout: float | None, split: str, devices):
        self.cfg, self.timeout, self.split, self.devices, self._nets = cfg, timeout, split, devices, {}

    def __getstate__(self):
        return {**self.__dict__, "_nets": {}}

    def _net(self, path: str):
        from .weights import load_network
        if path not in self._nets:
            self._nets[path] = load_network(path)
        return self._nets[path]

    def __call__(self, chunk: list[Instance]) -> dict:
        import jax

        from . import vnnlib
        from .runner import local_devices
        from .verify import verify_property
        rows = {k: [] for k in ("network", "dataset", "split", "index", *COLUMNS)}
        for inst in chunk:
            timeout = inst.timeout if self.timeout is None else min(inst.timeout, self.timeout)
            try:
                with jax.default_device(local_devices(self.devices)[0]):
                    r = verify_property(self._net(inst.onnx), vnnlib.load(inst.vnnlib), self.cfg._replace(
                        timeout=timeout))
                out = (r.result, r.time_s, r.domains, r.stage, witness(r.x, r.y) if r.result == "sat" else "", "")
            except JaxRobustError as e:  # this instance cannot be verified; the others can
                out = ("error", np.nan, 0, "", "", f"{type(e).__name__}: {e}")
            for k, v in zip(("network", "dataset", "split", "index", "onnx", "vnnlib", "timeout"),
                            (inst.onnx_hash, inst.vnnlib_hash, self.split, inst.row, inst.onnx, inst.vnnlib, timeout)):
                rows[k].append(v)
            for k, v in zip(("result", "time_s", "domains", "stage", "witness", "error"), out):
                rows[k].append(v)
        return {TABLE: rows}


def run(instances, out, *, cfg: VerifyConfig | None = None, timeout: float | None = None, resume: bool = False,
        chunk: int = 1, progress: bool = True, devices: int | None = None, workers: int | None = None,
        ray_address: str | None = None):
    """Verify every row of the instances file ``instances`` and append one row per instance to the HDF5 ``out``.

    ``cfg``: the verifier's budgets (its ``timeout`` is replaced by each row's); ``timeout`` caps every row's
    timeout (seconds). ``chunk`` instances per work unit; ``devices``: devices per process (queries run on the
    first); ``workers`` / ``ray_address``: Ray workers (see `runner`). Returns the `ResultStore`.
    """
    from .runner import ResumableRun, check_scale
    from .verify import check_config

    check_scale(devices, workers, ray_address)
    cfg = VerifyConfig() if cfg is None else cfg
    check_config(cfg)
    if timeout is not None and not timeout > 0:
        raise InputError(f"timeout must be > 0, got {timeout}")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    rows = read_instances(instances)
    split = Path(instances).name
    options = {"verify": {k: v for k, v in cfg._asdict().items() if k != "timeout"}, "timeout": timeout}
    run = ResumableRun(out, {TABLE: COLUMNS}, options, resume=resume, progress=progress, desc=f"verify {split}",
                       devices=devices, workers=workers, ray_address=ray_address)
    todo = [r for r, t in zip(rows, run.pending([(r.onnx_hash, r.vnnlib_hash, split, r.row) for r in rows])) if t]
    counts: dict[str, int] = {}

    def tally(done):
        for r in done[TABLE]["result"]:
            counts[r] = counts.get(r, 0) + 1
        return counts

    run.map([todo[s:s + chunk] for s in range(0, len(todo), chunk)], _Task(cfg, timeout, split, devices),
            done=len(rows) - len(todo), after=tally)
    return run.stores[TABLE]
