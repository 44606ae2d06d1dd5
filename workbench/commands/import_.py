"""`workbench import FILE`: store best configs from a JSON file written by `workbench export`, validated first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from triton_workbench.kernels.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import", help="store best configs from a JSON file (validated against the kernels first)",
        description="Validate every entry (kernel known, parameters and values its own, config valid for the "
                    "problem), then store them all; one bad entry rejects the file and stores nothing.")  # fmt: skip
    parser.add_argument("file", help="JSON file written by `workbench export`")
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triton_workbench.autotune.results import TuningDatabase
    from triton_workbench.autotune.transfer import import_best
    from triton_workbench.database import DatabaseFileError

    path = Path(args.file)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not a JSON text file: {error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise UsageError(f"{path} is nested too deeply to be a best-configs file") from None
    try:
        counts = import_best(TuningDatabase(args.db), document)
    except DatabaseFileError:
        raise
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    print(f"imported {counts['stored']} best configs from {path}")
    if counts["stale"]:
        print(f"{counts['stale']} of them were tuned for another version of the kernel source: "
              "they are used only if that source comes back")
    return 0
