"""`workbench report`: write one self-contained HTML report (works offline) from the database.

    workbench report [--run ID ... | --all] [--db PATH] [-o FILE.html]

Sections appear only where their data exists: environment, tuning runs (config heatmaps, top
configs, best so far, time/energy Pareto front, roofline, power/thermal timeline), baselines
against PyTorch, training runs, and search-strategy comparisons. An empty database gives a
report that says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.reports import write_report
from triton_workbench.workbench.paths import existing_database


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write a self-contained HTML report from the database",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", type=int, nargs="+", metavar="ID", dest="run_ids", help="report these runs only")
    which.add_argument("--all", action="store_true", help="report every run (the default)")
    parser.add_argument("--db", type=Path, default=None, metavar="PATH",
                        help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"), metavar="FILE.html",
                        help="the HTML file to write (default: report.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existing_database(args.db)
    db = TuningDatabase(args.db)
    try:
        path = write_report(db, None if args.all else args.run_ids, args.output)
    finally:
        db.close()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
