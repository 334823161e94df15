"""``jaxrobust critical-eps`` and ``jaxrobust demo``: critical ε per input by batched bisection over an oracle."""
from __future__ import annotations

from .common import (
    check_output,
    check_results_file,
    command,
    data_options,
    load_data,
    load_net,
    nonneg_int,
    positive_float,
    positive_int,
    preprocessing_options,
    scale,
    scale_options,
    selection,
    warn_if_inaccurate,
)
from .distribution import format_summary
from .verify import bab_config, bab_options

ORACLES = ("attack", "ibp", "crown", "alpha-crown", "complete")


def _options(p):
    p.add_argument("--network", "-n", default="mnist-mlp",
                   help="bundled name (mnist-mlp, mnist-mlp-pgd, mnist-certified), .onnx file or .msgpack weights")
    preprocessing_options(p)
    data_options(p)
    p.add_argument("--oracle", default="crown", choices=ORACLES)
    p.add_argument("--norm", default="inf", choices=["inf", "2", "1"],
                   help="norm of the perturbation balls (default inf; 2 and 1: bounds over the ball by its dual "
                        "norm, L2 / L1 attacks, branch and bound over the ball)")
    p.add_argument("--tol", type=positive_float, default=0.001, help="bisection tolerance (default 0.001)")
    p.add_argument("--grid-step", type=positive_float,
                   help="search the grid step, 2·step, ... ≤ eps-max instead (paper: 0.002)")
    p.add_argument("--eps-max", type=positive_float, default=0.5, help="upper end of the search interval")
    p.add_argument("--attack-steps", type=nonneg_int, default=40)
    p.add_argument("--targets", type=nonneg_int, default=9,
                   help="wrong classes tried by the multi-targeted follow-up attack (0 = margin PGD only)")
    p.add_argument("--timeout", type=positive_float, default=60.0,
                   help="per-query time limit of the complete oracle (s)")
    bab_options(p)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--chunk", type=positive_int, default=64, help="inputs per committed chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--resume", action="store_true", help="skip inputs already stored with the same configuration")
    p.add_argument("--csv", help="also export all rows of the results file to this CSV")
    scale_options(p)


def _search_config(args):
    import numpy as np

    from ..critical_eps import SearchConfig
    from ..errors import InputError
    grid = None
    if args.grid_step:
        if args.grid_step > args.eps_max:
            raise InputError(f"--grid-step {args.grid_step} exceeds --eps-max {args.eps_max}")
        grid = tuple(float(v) for v in np.round(np.arange(1, int(args.eps_max / args.grid_step + 1e-9) + 1)
                                                * args.grid_step, 10))
    return SearchConfig(eps_max=args.eps_max, tol=args.tol, grid=grid, seed=args.seed)


@command("critical-eps", "critical ε per input by batched bisection over an oracle, stored in HDF5", _options)
def critical_eps_cmd(args):
    from ..critical_eps import CSV_COLUMNS, run
    from ..data import parse_indices
    check_results_file(args.out, "--out")
    check_output(args.csv, "--csv")
    cfg = _search_config(args)
    options = {"attack_steps": args.attack_steps, "targets": args.targets, "norm": args.norm}
    if args.oracle == "complete":
        options.update(timeout=args.timeout, **bab_config(args))
    net = load_net(args.network, args)
    ds = load_data(args)
    idx = parse_indices(args.indices, len(ds.y))
    warn_if_inaccurate(net, selection(net, ds, idx), ds.y[idx], f"{ds.id} images {args.indices}")
    store = run(net, ds, idx, args.oracle, cfg, args.out, resume=args.resume, chunk=args.chunk,
                batch_size=args.batch_size, oracle_options=options, **scale(args))
    print(f"{len(store)} rows in {args.out}")
    if args.csv:
        print(f"wrote {store.to_csv(args.csv, CSV_COLUMNS)} rows to {args.csv}")


def _demo_options(p):
    p.add_argument("--network", "-n", default="mnist-mlp", help="network (default: the bundled mnist-mlp)")
    p.add_argument("--images", type=positive_int, default=100, help="number of MNIST test images (default 100)")
    p.add_argument("--out", "-o", help="keep the HDF5 results here (default: a temporary file)")


@command("demo", "critical-ε distribution of the bundled MNIST network on bundled test images, end to end",
         _demo_options)
def demo_cmd(args):
    import tempfile
    import time
    from pathlib import Path

    from ..critical_eps import SearchConfig, run
    from ..data import load_dataset
    from ..distributions import summarize
    from ..loading import load_network
    t0 = time.perf_counter()
    check_results_file(args.out, "--out")
    net = load_network(args.network)
    ds = load_dataset("mnist", "test")
    n = min(args.images, len(ds.y))
    acc = warn_if_inaccurate(net, selection(net, ds, slice(None)), ds.y, f"{len(ds.y)} MNIST test images")
    print(f"network {net.name} ({net.num_params:,} parameters, hash {net.hash}); "
          f"accuracy {acc:.4f} on {len(ds.y)} MNIST test images")
    print(f"critical ε of test images 0..{n - 1}: CROWN proofs + PGD counterexamples, bisection to 0.001")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "demo.h5")
        run(net, ds, range(n), "crown", SearchConfig(eps_max=0.3, tol=0.001), out, resume=True,
            oracle_options={"targets": 3})
        print(format_summary(summarize(out, bootstrap=500)))
    print(f"done in {time.perf_counter() - t0:.1f} s")
