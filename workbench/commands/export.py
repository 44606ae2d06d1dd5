"""`workbench export -o FILE`: write the database's best configs as JSON (for `workbench import`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the best tuned configs to a JSON file",
                                   description="Write every stored best config (or one kernel's) as JSON.")
    parser.add_argument("-o", "--output", required=True, help="JSON file to write ('-' for standard output)")
    parser.add_argument("--kernel", default=None, help="only this kernel's configs")
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triton_workbench.autotune.results import TuningDatabase
    from triton_workbench.autotune.transfer import export_best

    database = TuningDatabase(args.db)
    document = export_best(database, args.kernel)
    text = json.dumps(document, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        path = Path(args.output)
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text(text)
        temporary.replace(path)  # never a half-written file under the final name
        print(f"exported {len(document['configs'])} best configs from {database.path} to {path}")
    return 0
