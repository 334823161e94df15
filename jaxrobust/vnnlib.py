"""VNN-LIB properties: an input box and an unsafe output region (as in VNN-COMP).

Supported subset (that of the VNN-COMP classification benchmarks): ``declare-const X_i / Y_j Real``;
input ``assert``s bounding single ``X_i`` by constants; output ``assert``s that are linear comparisons
of ``Y`` variables and constants, combined with ``and`` / ``or``. The unsafe region is held in
disjunctive normal form: ``y`` is unsafe iff for some disjunct ``d`` every row holds ``A[d] @ y <= b[d]``.
The property is *sat* (violated) iff some input in the box maps into the unsafe region.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FileFormatError

_TOKEN = re.compile(r"\(|\)|[^\s()]+")


class Property(NamedTuple):
    lower: np.ndarray              # (n_inputs,) input box
    upper: np.ndarray              # (n_inputs,)
    disjuncts: list                # [(A (k, n_outputs), b (k,))]: unsafe iff any A @ y <= b holds row-wise
    n_outputs: int

    def robustness_label(self) -> int | None:
        """The label ``y`` when the unsafe region is exactly ``∪_{j≠y} {Y_j >= Y_y}``, else None."""
        ys = set()
        for a, b in self.disjuncts:
            if a.shape[0] != 1 or b[0] != 0 or np.count_nonzero(a[0]) != 2 or sorted(a[0][a[0] != 0]) != [-1, 1]:
                return None
            ys.add(int(np.flatnonzero(a[0] == 1)[0]))
        others = {int(np.flatnonzero(a[0] == -1)[0]) for a, _ in self.disjuncts}
        if len(ys) == 1 and others == set(range(self.n_outputs)) - ys:
            return ys.pop()
        return None


def parse(text: str, source: str = "<string>") -> Property:
    """Parse VNN-LIB text; errors name the source and the offending expression."""
    tokens = _TOKEN.findall(re.sub(r";[^\n]*", "", text))
    exprs, pos = [], 0
    while pos < len(tokens):
        e, pos = _read(tokens, pos, source)
        exprs.append(e)
    xs, ys = {}, {}
    for e in exprs:
        if isinstance(e, list) and e and e[0] == "declare-const":
            name = e[1]
            m = re.fullmatch(r"([XY])_(\d+)", name)
            if not m:
                raise FileFormatError(f"{source}: unsupported variable {name!r} (expected X_i or Y_j)")
            (xs if m.group(1) == "X" else ys)[name] = int(m.group(2))
    if not xs or not ys:
        raise FileFormatError(f"{source}: no X_i / Y_j variables declared")
    lo, hi = np.full(len(xs), -np.inf), np.full(len(xs), np.inf)
    dnf = [([], [])]  # conjunction of all output asserts, kept in DNF
    for e in exprs:
        if not (isinstance(e, list) and e and e[0] == "assert"):
            continue
        body = e[1]
        if _is_input_bound(body, xs):
            op, a, b = body
            if a in xs:
                i, c, is_upper = xs[a], float(b), op == "<="
            else:
                i, c, is_upper = xs[b], float(a), op == ">="
            if is_upper:
                hi[i] = min(hi[i], c)
            else:
                lo[i] = max(lo[i], c)
        else:
            terms = _dnf(body, ys, source)
            dnf = [(ra + rb, ca + cb) for ra, ca in dnf for rb, cb in terms]
    if np.any(~np.isfinite(lo)) or np.any(~np.isfinite(hi)) or np.any(lo > hi):
        raise FileFormatError(f"{source}: every input X_i needs finite bounds with lower <= upper")
    disjuncts = [(np.array(rows, float).reshape(-1, len(ys)), np.array(cs, float)) for rows, cs in dnf if rows]
    if not disjuncts:
        raise FileFormatError(f"{source}: no output constraint")
    return Property(lo, hi, disjuncts, len(ys))


def load(path) -> Property:
    """Read a ``.vnnlib`` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileFormatError(f"cannot read property {path}: {e.strerror}") from None
    return parse(text, str(path))


def _read(tokens, pos, source):
    t = tokens[pos]
    if t == "(":
        out, pos = [], pos + 1
        while pos < len(tokens) and tokens[pos] != ")":
            e, pos = _read(tokens, pos, source)
            out.append(e)
        if pos >= len(tokens):
            raise FileFormatError(f"{source}: unbalanced parentheses")
        return out, pos + 1
    if t == ")":
        raise FileFormatError(f"{source}: unexpected ')'")
    return t, pos + 1


def _is_input_bound(e, xs) -> bool:
    return (isinstance(e, list) and len(e) == 3 and e[0] in ("<=", ">=")
            and ((e[1] in xs and _is_number(e[2])) or (e[2] in xs and _is_number(e[1]))))


def _is_number(t) -> bool:
    try:
        float(t)
        return isinstance(t, str)
    except (TypeError, ValueError):
        return False


def _linear(e, ys, source) -> np.ndarray:
    """Coefficients (n_outputs + 1,) of a linear term over Y (last entry: constant)."""
    v = np.zeros(len(ys) + 1)
    if isinstance(e, str):
        if e in ys:
            v[ys[e]] = 1.0
        elif _is_number(e):
            v[-1] = float(e)
        else:
            raise FileFormatError(f"{source}: unknown term {e!r} in an output constraint")
        return v
    if e and e[0] in ("+", "-") and len(e) >= 2:
        parts = [_linear(t, ys, source) for t in e[1:]]
        return -parts[0] if e[0] == "-" and len(parts) == 1 else (
            sum(parts) if e[0] == "+" else parts[0] - sum(parts[1:]))
    if e and e[0] == "*" and len(e) == 3 and _is_number(e[1]):
        return float(e[1]) * _linear(e[2], ys, source)
    raise FileFormatError(f"{source}: unsupported output term {_show(e)}")


def _dnf(e, ys, source) -> list:
    """DNF of an output formula: list of (rows, consts) with ``rows @ y <= consts``."""
    if isinstance(e, list) and e and e[0] in ("<=", ">=") and len(e) == 3:
        d = _linear(e[1], ys, source) - _linear(e[2], ys, source)  # lhs - rhs
        if e[0] == ">=":
            d = -d  # lhs >= rhs  <=>  rhs - lhs <= 0
        return [([d[:-1].tolist()], [-d[-1]])]
    if isinstance(e, list) and e and e[0] == "and":
        out = [([], [])]
        for sub in e[1:]:
            out = [(ra + rb, ca + cb) for ra, ca in out for rb, cb in _dnf(sub, ys, source)]
        return out
    if isinstance(e, list) and e and e[0] == "or":
        return [d for sub in e[1:] for d in _dnf(sub, ys, source)]
    raise FileFormatError(f"{source}: unsupported output constraint {_show(e)}")


def _show(e) -> str:
    s = e if isinstance(e, str) else "(" + " ".join(_show(t) for t in e) + ")"
    return s if len(s) < 80 else s[:77] + "..."
