"""``jaxrobust verify``: complete verification of a VNN-LIB property (sat / unsat / unknown / timeout)."""
from __future__ import annotations

import json
import sys

import numpy as np

from ..errors import InputError
from .common import (
    check_output,
    check_results_file,
    command,
    load_net,
    positive_float,
    positive_int,
    preprocessing_options,
    scale,
    scale_options,
)


def bab_options(p):
    """Budgets of the complete verifier (`verify.VerifyConfig`)."""
    p.add_argument("--max-domains", type=positive_int, default=10 ** 7,
                   help="subdomains bounded per query (default 10^7)")
    p.add_argument("--max-memory", default="1G",
                   help="memory of pending subdomains per query, e.g. 512M or 4G (default 1G)")
    p.add_argument("--branch", default="auto", choices=["auto", "neurons", "inputs"],
                   help="split subdomains on neurons, on the inputs, or auto: inputs for networks with <= 20 inputs")


def bab_config(args) -> dict:
    text = str(args.max_memory).strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
    try:
        size = int(float(text.rstrip("KMGB") or "x") * scale)
    except ValueError:
        raise InputError(f"--max-memory must be a size such as 512M or 4G, got {args.max_memory!r}") from None
    if size < 2 ** 20:
        raise InputError(f"--max-memory must be at least 1M, got {args.max_memory!r}")
    return {"max_domains": args.max_domains, "max_pool_bytes": size, "split": args.branch}


def _options(p):
    p.add_argument("network", help=".onnx file, bundled name or .msgpack weights")
    p.add_argument("property", help="VNN-LIB property (.vnnlib)")
    preprocessing_options(p)
    p.add_argument("--timeout", type=positive_float, default=60.0, help="time limit in seconds (default 60)")
    p.add_argument("--seed", type=int, default=0)
    bab_options(p)
    p.add_argument("--out", "-o", help="also write the VNN-COMP result file (result line + counterexample)")
    p.add_argument("--json", action="store_true", help="print JSON instead")


def check_box_meets_domain(lower, upper, domain):
    """`InputError` naming the first input whose VNN-LIB bounds lie wholly outside the network's domain."""
    lo, hi = domain
    below, above = np.flatnonzero(upper < lo), np.flatnonzero(lower > hi)
    for idx, bound, value, side, edge in ((below, "upper", upper, "below", lo), (above, "lower", lower, "above", hi)):
        if len(idx):
            i = int(idx[0])
            raise InputError(f"the property's box does not meet the network's domain [{lo:g}, {hi:g}]: the {bound} "
                             f"bound of X_{i} ({float(value[i]):g}) lies {side} {edge:g} (so do {len(idx)} of "
                             f"{len(lower)} inputs); give the domain of the property's input space (--domain) or its "
                             "preprocessing (--mean/--std)")


@command("verify", "complete verification of a VNN-LIB property: prints sat / unsat / unknown / timeout", _options)
def verify_cmd(args):
    from .. import vnnlib
    from ..verify import VerifyConfig, verify_property
    check_output(args.out, "--out")
    cfg = VerifyConfig(timeout=args.timeout, seed=args.seed, **bab_config(args))
    net = load_net(args.network, args)
    prop = vnnlib.load(args.property)
    if prop.lower.size == int(np.prod(net.input_shape)):
        check_box_meets_domain(prop.lower, prop.upper, net.domain)
    r = verify_property(net, prop, cfg, progress=not args.json)
    text = r.result
    if r.result == "sat":
        pairs = [f"(X_{i} {v!r})" for i, v in enumerate(r.x.astype(float).tolist())]
        pairs += [f"(Y_{j} {v!r})" for j, v in enumerate(r.y.astype(float).tolist())]
        text += "\n(" + "\n ".join(pairs) + ")"
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(text + "\n")
    if args.json:
        out = {"result": r.result, "time_s": r.time_s, "domains": r.domains, "stage": r.stage}
        if r.result == "sat":
            out["x"], out["y"] = r.x.tolist(), r.y.tolist()
        print(json.dumps(out))
        return
    print(text)
    print(f"{r.result} in {r.time_s:.2f} s ({r.domains} subdomains, decided by {r.stage})", file=sys.stderr)


def _instances_options(p):
    p.add_argument("instances", help="VNN-COMP instances CSV (onnx,vnnlib,timeout per row; paths relative to it)")
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--timeout", type=positive_float, help="cap every row's timeout (seconds)")
    p.add_argument("--seed", type=int, default=0)
    bab_options(p)
    p.add_argument("--resume", action="store_true", help="skip instances already stored with the same budgets")
    p.add_argument("--csv", help="also export the rows of the results file to this CSV")
    scale_options(p)


@command("instances", "verify every row of a VNN-COMP instances CSV, resumable, over devices and Ray workers",
         _instances_options)
def instances_cmd(args):
    from ..instances import CSV_COLUMNS, run
    from ..verify import VerifyConfig
    check_results_file(args.out, "--out")
    check_output(args.csv, "--csv")
    cfg = VerifyConfig(seed=args.seed, **bab_config(args))
    store = run(args.instances, args.out, cfg=cfg, timeout=args.timeout, resume=args.resume, **scale(args))
    rows = store.read(("result",))
    counts = {r: int(np.sum(rows["result"] == r)) for r in ("sat", "unsat", "unknown", "timeout", "error")}
    print(f"{len(store)} rows in {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if args.csv:
        print(f"wrote {store.to_csv(args.csv, CSV_COLUMNS)} rows to {args.csv}")
