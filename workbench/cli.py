"""`workbench`: the command line. Subcommands live one per module in `workbench.commands`.

Before a command runs, its database (`--db`, else $WORKBENCH_DB, else the user cache) becomes the
kernels' config source (`autotune.use_database`): every kernel the command launches, here or in a
process it starts with the same arguments (torchrun ranks), uses the best configs stored there.

Errors: a mistake in what was asked (`UsageError`: an argument, a problem, a file or path that cannot be
used) and an OSError (the environment: a file, a disk, a permission) are one line naming the argument or
path, and exit status 2; anything else is a bug and shows its traceback. `--debug` shows one always.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

from triton_workbench.autotune.config_source import use_database
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench import commands


def build_parser() -> argparse.ArgumentParser:
    """A parser with every module in `workbench.commands` registered as a subcommand."""
    parser = argparse.ArgumentParser(
        prog="workbench", description="Autotune, train with, profile and report fused Triton conv, GEMM and "
                                      "activation kernels.")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, expected ones too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    use_database(getattr(args, "db", None))  # one database for the command and its kernels' tuned configs
    try:
        return int(args.func(args) or 0)
    except (UsageError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"workbench {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError's names its file ("No space left on device: x.db")."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
