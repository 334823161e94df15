"""What the subcommands share: the command registry, checked option types, network and data options
(preprocessing, ``--download``, index ranges), output-path checks and the low-accuracy warning."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError

COMMANDS = {}


def command(name: str, help: str, options):
    """Register ``fn(args)`` as subcommand ``name``; ``options(parser)`` adds its arguments."""
    def wrap(fn):
        COMMANDS[name] = (fn, help, options)
        return fn
    return wrap


# --- option types: bad values are argparse errors, raised before anything runs ----------------------
def _number(kind, test, what):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    parse.__name__ = what
    return parse


positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
nonneg_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
open_unit = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
unit = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def float_list(text) -> tuple[float, ...]:
    """``"0.1,0.2"`` -> ``(0.1, 0.2)`` (finite numbers)."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def nonneg_list(text) -> tuple[float, ...]:
    values = float_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"every value must be >= 0, got {text}")
    return values


def domain_type(text) -> tuple[float, float]:
    values = float_list(text)
    if len(values) != 2 or not values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO < HI, got {text!r}")
    return values


# options whose values may start with "-" (negative numbers, open index ranges): "--opt -1,1" is read as "--opt=-1,1"
DASH_VALUES = ("--indices", "--mean", "--std", "--domain")


# --- networks ------------------------------------------------------------------------------------------
def preprocessing_options(p):
    g = p.add_argument_group("preprocessing (default: NET.json next to the network file)")
    g.add_argument("--mean", type=float_list, help="per-channel mean subtracted from raw inputs, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=float_list, help="per-channel standard deviation divided by, e.g. 0.229,0.224,0.225")
    g.add_argument("--domain", type=domain_type, metavar="LO,HI", help="box of valid raw inputs (default 0,1)")


def load_net(spec, args):
    """The network ``spec`` with the preprocessing of ``args`` (over its sidecar file)."""
    from ..loading import load_network
    return load_network(spec, mean=args.mean, std=args.std, domain=args.domain)


# --- data ---------------------------------------------------------------------------------------------
def data_options(p):
    """The data selection shared by the per-input methods."""
    p.add_argument("--dataset", "-d", default="mnist", help="mnist | fashion_mnist | cifar10 | gtsrb, optionally NAME:PATH")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--indices", default="0:100", help="e.g. 0:100, :100, -10:, 3,5,9 or 0:1000:10 (default 0:100)")
    download_option(p)


def download_option(p):
    p.add_argument("--download", action="store_true", help="fetch the dataset into the cache if it is missing")


def load_data(args, split=None):
    from ..data import load_dataset
    return load_dataset(args.dataset, split or args.split, download=args.download)


def selection(net, ds, idx):
    """Network inputs ``(K, *input_shape)`` of dataset positions ``idx``, checked against the network."""
    from ..data import to_network_input
    return net.check_inputs(to_network_input(ds.x[idx], net.input_shape), f"{ds.id} images")


def warn_if_inaccurate(net, x, y, where: str) -> float:
    """Accuracy of ``net`` on ``x, y``; a warning on stderr naming preprocessing when it is below 50 %."""
    from ..training import accuracy
    acc = accuracy(net, x, y)
    if acc < 0.5:
        warn(f"{net.name} classifies only {acc:.1%} of {where} correctly; it probably expects other preprocessing "
             "(--mean, --std, --domain or a NET.json next to the network)")
    return acc


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr)


# --- outputs ------------------------------------------------------------------------------------------
def check_output(path, option: str, *, folder: bool = False):
    """Refuse an output path that cannot be written: a directory where a file is meant (or the reverse),
    or a missing parent directory. Nothing is created."""
    if path is None:
        return
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            raise InputError(f"{option} {path}: exists and is not a directory")
        return
    if p.is_dir():
        raise InputError(f"{option} {path}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise InputError(f"{option} {path}: directory {p.parent} does not exist")


def check_results_file(path, option: str):
    """An output HDF5 file must be new, or an HDF5 file (it is appended to)."""
    if path is None:
        return
    check_output(path, option)
    import h5py
    if Path(path).exists() and not h5py.is_hdf5(path):
        raise InputError(f"{option} {path}: exists and is not an HDF5 results file")


def fmt(v, spec=".4f"):
    return "-" if v is None or v != v else format(v, spec)


def scale_options(p):
    """Where a driver runs (`runner.ResumableRun`): local devices, Ray workers or a running Ray cluster."""
    p.add_argument("--devices", type=positive_int, help="local devices that run chunks side by side (default: all)")
    p.add_argument("--workers", type=positive_int, help="start a local Ray cluster of this many worker processes")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. auto, or HOST:PORT of `ray start --head`)")


def scale(args) -> dict:
    """The keyword options of `scale_options` for a driver's ``run``."""
    return {"devices": args.devices, "workers": args.workers, "ray_address": args.ray_address}
