"""`workbench export -o FILE`: write the database's best configs as JSON (for `workbench import`)."""

from __future__ import annotations

import argparse
import json
import sys

from triton_workbench.workbench.paths import existing_database, writable_file, written_whole


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

    existing_database(args.db)
    path = None if args.output == "-" else writable_file(args.output, "-o")
    database = TuningDatabase(args.db)
    document = export_best(database, args.kernel)
    text = json.dumps(document, indent=2) + "\n"
    if path is None:
        sys.stdout.write(text)
    else:
        with written_whole(path) as temporary:  # never a half-written file under the final name, nor a .partial
            temporary.write_text(text)
        print(f"exported {len(document['configs'])} best configs from {database.path} to {path}")
    return 0
