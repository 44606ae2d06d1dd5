"""`workbench strategies --landscapes DIR`: compare search strategies on recorded tuning landscapes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.commands.tune import add_strategy_option_argument, strategy_options_from


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "strategies", help="compare search strategies on recorded landscapes (Kernel Tuner cache files)",
        description="Replay each strategy on each landscape for every seed and print, per landscape and budget, "
                    "the mean fraction of the optimum found (optimum / best found; 1.0 = optimum). Kernel Tuner's "
                    "strategies are shown beside them from the baseline shipped with the package "
                    "(triton_workbench/autotune/kernel_tuner_baseline.csv) where it has rows.")  # fmt: skip
    parser.add_argument("--landscapes", required=True, type=Path, help="directory of *.json / *.json.gz cache files")
    parser.add_argument("--budgets", default="25,50,100,200", help="comma-separated evaluation budgets")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per strategy and landscape (default 20)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first-seed .. first-seed + seeds - 1 (default 0), e.g. to check a result "
                             "on seeds no choice was made on")  # fmt: skip
    parser.add_argument("--strategies", default="auto,random",
                        help="comma-separated strategy names (default auto,random)")  # fmt: skip
    add_strategy_option_argument(parser)  # applied to every strategy of --strategies
    parser.add_argument("--kernel-tuner-csv", type=Path, default=None,
                        help="Kernel Tuner baseline rows to show alongside (default: the baseline shipped with the "
                             "package; 'none' to leave them out)")  # fmt: skip
    parser.add_argument("--db", default=None, help="database file (default: $WORKBENCH_DB or the user cache)")
    parser.set_defaults(func=run)


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--budgets: expected comma-separated positive ints, got {text!r}") from None
    if any(b < 1 for b in budgets):
        raise UsageError(f"--budgets: expected positive ints, got {text!r}")
    return budgets


def run(args: argparse.Namespace) -> int:
    from triton_workbench.autotune.compare import compare, landscape_files, load_kernel_tuner_results, summarise
    from triton_workbench.database import Database, RunKind, SeriesTable
    from triton_workbench.workbench.tables import format_table

    budgets = _budgets(args.budgets)
    strategies = [name for name in args.strategies.split(",") if name]
    if args.seeds < 1:
        raise UsageError(f"--seeds: expected a positive int, got {args.seeds}")
    if args.first_seed < 0:
        raise UsageError(f"--first-seed: expected a non-negative int, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    options = strategy_options_from(args, strategies)
    files = landscape_files(args.landscapes)
    kernel_tuner = None  # read before the replays: a missing file is an error, not rows silently left out
    if str(args.kernel_tuner_csv) != "none":
        kernel_tuner = load_kernel_tuner_results(args.kernel_tuner_csv)  # None: the baseline shipped with the package
    database = Database(args.db)
    meta = {"landscapes": [f.name for f in files], "budgets": budgets, "seeds": seeds}
    if options:
        meta["strategy_options"] = options
    with database.run(RunKind.STRATEGIES, ",".join(strategies), meta=meta) as run_id:
        results = compare(files, strategies, budgets, seeds, strategy_options=options)
        frames = [results]
        if kernel_tuner is not None:
            landscapes = set(results["landscape"])
            frames.append(kernel_tuner[kernel_tuner["landscape"].isin(landscapes) & kernel_tuner["budget"].isin(budgets)])
        combined = pd.concat(frames, ignore_index=True)
        database.append(SeriesTable.STRATEGY_RESULTS, run_id, combined)
    print(format_table(summarise(combined).reset_index(), float_format="{:.3f}"))
    print(f"\nfraction = optimum / best found within the budget, mean over seeds; stored as run {run_id} "
          f"in {database.path} (table {SeriesTable.STRATEGY_RESULTS})")  # fmt: skip
    return 0
