"""`workbench strategies --landscapes DIR --synthetic`: compare search strategies on recorded and synthetic tuning
landscapes, per landscape and on average over the development and the held-out landscapes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from triton_workbench.autotune.compare import (HOLDOUT, SUMMARY_GROUPS, against_best_kernel_tuner, compare,
                                               landscape_files, load_kernel_tuner_results, summary_with_errors)
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.commands.tune import add_strategy_option_argument, strategy_options_from
from triton_workbench.workbench.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "strategies", help="compare search strategies on recorded landscapes (Kernel Tuner cache files)",
        description="Replay each strategy on each landscape for every seed and print, per landscape and budget, "
                    "the mean fraction of the optimum found (optimum / best found; 1.0 = optimum) ± its standard "
                    "error over seeds, then per budget the mean over the development landscapes and over the "
                    "held-out ones. Kernel Tuner's best strategy is shown beside them from the baseline shipped "
                    "with the package (triton_workbench/autotune/kernel_tuner_baseline.csv) where it has rows.")  # fmt: skip
    parser.add_argument("--landscapes", type=Path, default=None,
                        help="directory of *.json / *.json.gz cache files (optional with --synthetic)")  # fmt: skip
    parser.add_argument("--synthetic", action="store_true",
                        help="add the synthetic suite (triton_workbench.autotune.synthetic: many parameters, a "
                             "needle, mostly invalid, interactions, noise) to the landscapes")  # fmt: skip
    parser.add_argument("--holdout", default=",".join(HOLDOUT),
                        help="comma-separated landscapes reported apart as held out, those no design choice was "
                             f"made on (default {','.join(HOLDOUT)})")  # fmt: skip
    parser.add_argument("--budgets", default="25,50,100,200,500",
                        help="comma-separated evaluation budgets (default 25,50,100,200,500)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per strategy and landscape (default 20)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first-seed .. first-seed + seeds - 1 (default 0), e.g. to check a result "
                             "on seeds no choice was made on")  # fmt: skip
    parser.add_argument("--strategies", default="auto,random",
                        help="comma-separated strategy names (default auto,random); the first is the one "
                             "compared with Kernel Tuner's best")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="replay in this many processes (default 1); the results do not depend on it")
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
    from triton_workbench.autotune.synthetic import synthetic_suite
    from triton_workbench.database import Database, RunKind, SeriesTable

    budgets = _budgets(args.budgets)
    strategies = [name for name in args.strategies.split(",") if name]
    if args.seeds < 1:
        raise UsageError(f"--seeds: expected a positive int, got {args.seeds}")
    if args.workers < 1:
        raise UsageError(f"--workers: expected a positive int, got {args.workers}")
    if args.first_seed < 0:
        raise UsageError(f"--first-seed: expected a non-negative int, got {args.first_seed}")
    if args.landscapes is None and not args.synthetic:
        raise UsageError("strategies: give --landscapes DIR, --synthetic, or both")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    holdout = [name for name in args.holdout.split(",") if name]
    options = strategy_options_from(args, strategies)
    landscapes = [*(landscape_files(args.landscapes) if args.landscapes is not None else []),
                  *(synthetic_suite() if args.synthetic else [])]  # fmt: skip
    kernel_tuner = None  # read before the replays: a missing file is an error, not rows silently left out
    if str(args.kernel_tuner_csv) != "none":
        kernel_tuner = load_kernel_tuner_results(args.kernel_tuner_csv)  # None: the baseline shipped with the package
    database = Database(args.db)
    names = [item.name for item in landscapes]
    meta = {"landscapes": names, "budgets": budgets, "seeds": seeds, "holdout": holdout}
    if options:
        meta["strategy_options"] = options
    with database.run(RunKind.STRATEGIES, ",".join(strategies), meta=meta) as run_id:
        results = compare(landscapes, strategies, budgets, seeds, strategy_options=options, workers=args.workers)
        frames = [results]
        if kernel_tuner is not None:
            in_run = kernel_tuner["landscape"].isin(set(results["landscape"])) & kernel_tuner["budget"].isin(budgets)
            frames.append(kernel_tuner[in_run])
        combined = pd.concat(frames, ignore_index=True)
        database.append(SeriesTable.STRATEGY_RESULTS, run_id, combined)
    print(comparison_table(combined, strategies, holdout, kernel_tuner is not None))
    print(f"\nfraction = optimum / best found within the budget, mean over seeds ± its standard error; a mean row "
          f"averages each seed over the group's landscapes (held out: {', '.join(holdout) or 'none'}), its best kt is "
          f"the one Kernel Tuner strategy best on the group's mean, and a strategy counts in it only with rows on "
          f"every landscape of the group. Stored as run {run_id} in {database.path} "
          f"(table {SeriesTable.STRATEGY_RESULTS})")  # fmt: skip
    return 0


def comparison_table(results: pd.DataFrame, strategies: list[str], holdout: list[str], kernel_tuner: bool) -> str:
    """Per landscape and budget, then per budget per group of landscapes: each workbench strategy's mean
    fraction ± standard error and, with `kernel_tuner`, the best Kernel Tuner strategy and the first
    strategy's lead over it."""
    summary = summary_with_errors(results, holdout, per_landscape=True)
    summary = summary[summary["source"] == "workbench"]
    cells = summary.assign(cell=[_plus_minus(m, s) for m, s in zip(summary["mean"], summary["se"])])
    table = cells.pivot(index=["group", "budget"], columns="strategy", values="cell")[strategies]
    if kernel_tuner:
        versus = against_best_kernel_tuner(results, strategies[0], holdout)
        versus = pd.DataFrame({
            "best kt": [_plus_minus(m, s) for m, s in zip(versus["best_kt_mean"], versus["best_kt_se"])],
            "kt strategy": versus["best_kt"].to_numpy(),
            f"{strategies[0]} − best": [_plus_minus(m, s, "+.4f") for m, s in
                                        zip(versus["difference"], versus["difference_se"])],
        }, index=pd.MultiIndex.from_frame(versus[["group", "budget"]]))  # fmt: skip
        table = table.join(versus).fillna("")
    landscapes = list(dict.fromkeys(results["landscape"]))
    ordered = [name for name in landscapes if name not in holdout] + [name for name in landscapes if name in holdout]
    budgets = sorted(set(results["budget"]))
    keys = [(name, budget) for name in ordered for budget in budgets]
    keys += [(group, budget) for budget in budgets for group in SUMMARY_GROUPS if (group, budget) in table.index]
    labels = [f"mean ({group})" if group in SUMMARY_GROUPS else f"{group} (held out)" if group in holdout else group
              for group, _ in keys]  # fmt: skip
    table = table.reindex(keys).reset_index()
    table.insert(0, "landscape", labels)
    return format_table(table.drop(columns="group"))


def _plus_minus(mean: float, se: float, spec: str = ".3f") -> str:
    """"0.912 ± 0.004"; the mean alone without a standard error (one seed), "" without a mean."""
    if pd.isna(mean):
        return ""
    return f"{mean:{spec}}" if pd.isna(se) else f"{mean:{spec}} ± {se:{spec.lstrip('+')}}"
