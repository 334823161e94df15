"""The ``jaxrobust`` command line: one module per subcommand, each parsing its options and formatting
its results. Every error prints as one line (``--debug`` anywhere on the line shows the traceback), and
every option is checked before a file is created or a progress bar starts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import JaxRobustError
from . import critical_eps, distribution, global_, info, roma, train, verify  # noqa: F401  (register commands)
from .common import COMMANDS, DASH_VALUES
from .global_ import format_global_summary

__all__ = ["build_parser", "format_global_summary", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``jaxrobust SUBCOMMAND: error: ...``) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(prog="jaxrobust", description="Robustness of neural-network classifiers in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"jaxrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (fn, help, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        options(p)
        p.set_defaults(func=fn)
    return parser


def _normalise_argv(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out wherever it stands and join options whose value starts with "-" to it."""
    debug = "--debug" in argv
    words, out, i = [a for a in argv if a != "--debug"], [], 0
    while i < len(words):
        if words[i] in DASH_VALUES and i + 1 < len(words):
            out.append(f"{words[i]}={words[i + 1]}")
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out, debug


def _compilation_cache():
    """Keep compiled XLA programs across runs (one process per query is common) in the cache directory;
    ``JAXROBUST_COMPILE_CACHE=0`` turns it off."""
    import os
    if os.environ.get("JAXROBUST_COMPILE_CACHE", "1") == "0":
        return
    import jax

    from ..data import default_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))


def main(argv=None) -> int:
    argv, debug = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # an option error (one line already printed); --help and --version exit 0
        if e.code:
            return int(e.code)
        raise
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # output files this run would create: removed again if it ends in an error, so it leaves nothing behind
    new = [Path(p) for p in (getattr(args, "out", None), getattr(args, "csv", None)) if p and not Path(p).exists()]
    _compilation_cache()
    try:
        args.func(args)
    except (JaxRobustError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        _remove(new)
        if debug:
            raise
        print(f"jaxrobust {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _remove(paths):
    for p in paths:
        if p.is_file():
            p.unlink()

