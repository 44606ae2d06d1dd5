"""Compare strategies on recorded landscapes: mean fraction of the optimum found per budget.

The fraction of a run at budget b is optimum / best value among its first b evaluations (1.0 = found
the optimum). The workbench's strategies do not know the budget, so one replay with the largest budget
gives every smaller budget as a prefix, exactly as separate shorter runs would. Kernel Tuner's
strategies do use the budget (their schedules depend on max_fevals); benchmarks/kernel_tuner_baseline.py
runs them once per budget into `autotune/kernel_tuner_baseline.csv`, which ships with the package
(`kernel_tuner_baseline_csv()`) and is read with `load_kernel_tuner_results`.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from triton_workbench.autotune.landscape import Landscape, load_landscape
from triton_workbench.autotune.replay import replay
from triton_workbench.autotune.strategies import strategy_options as strategy_options_for
from triton_workbench.kernels.errors import UsageError

RESULT_COLUMNS = ["landscape", "budget", "strategy", "seed", "fraction", "source"]
KERNEL_TUNER_BASELINE = "kernel_tuner_baseline.csv"  # package data of triton_workbench.autotune


def landscape_files(directory: str | Path) -> list[Path]:
    """The Kernel Tuner cache files (*.json, *.json.gz) in a directory, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"landscapes: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise UsageError(f"landscapes: no *.json or *.json.gz cache files in {directory}")
    return files


def compare(
    landscapes: Sequence[str | Path | Landscape],
    strategies: Sequence[str],
    budgets: Sequence[int],
    seeds: int | Sequence[int],
    progress: bool = True,
    strategy_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """One row per (landscape, budget, strategy, seed) with the fraction of the optimum found.
    `strategy_options` go to every strategy (each must take them: see `make_strategy`)."""
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise UsageError(f"budgets: expected positive ints, got {budgets!r}")
    if not strategies:
        raise UsageError("strategies: expected at least one strategy name")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise UsageError(f"seeds: expected a positive count or a list of seeds, got {seeds!r}")
    for strategy in strategies:  # before any landscape is loaded or replayed
        strategy_options_for(strategy, strategy_options)
    loaded = [item if isinstance(item, Landscape) else load_landscape(item) for item in landscapes]
    rows = []
    runs = [(landscape, strategy, seed) for landscape in loaded for strategy in strategies for seed in seed_list]
    bar = tqdm(runs, desc="strategies", unit="run", disable=not progress)
    for landscape, strategy, seed in bar:
        best = replay(landscape, strategy, max(budgets), seed, strategy_options)["best_value"].to_numpy()
        for budget in budgets:
            fraction = landscape.optimum / best[min(budget, len(best)) - 1] if len(best) else 0.0
            rows.append((landscape.name, budget, strategy, seed, float(fraction), "workbench"))
        bar.set_postfix_str(f"{landscape.name} {strategy}: {rows[-1][4]:.3f} at {max(budgets)}")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def kernel_tuner_baseline_csv() -> Traversable:
    """The Kernel Tuner baseline shipped with the package (written by benchmarks/kernel_tuner_baseline.py)."""
    return resources.files("triton_workbench.autotune") / KERNEL_TUNER_BASELINE


def load_kernel_tuner_results(path: str | Path | Traversable | None = None) -> pd.DataFrame:
    """Rows of a Kernel Tuner baseline CSV (default: the one shipped with the package, see
    `kernel_tuner_baseline_csv`) in the `compare` layout (strategy prefixed "kt:").

    Raises FileNotFoundError naming the file when it does not exist."""
    source = kernel_tuner_baseline_csv() if path is None else path
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
    if not source.is_file():
        why = " (it ships with triton_workbench.autotune: this installation lacks it)" if path is None else ""
        raise FileNotFoundError(f"Kernel Tuner baseline {source} does not exist{why}")
    with source.open("rb") as handle:
        frame = pd.read_csv(handle)
    missing = set(RESULT_COLUMNS[:5]) - set(frame.columns)
    if missing:
        raise UsageError(f"kernel_tuner_csv: {source} lacks columns {sorted(missing)}")
    frame = frame[RESULT_COLUMNS[:5]].copy()
    frame["strategy"] = "kt:" + frame["strategy"]
    frame["source"] = "kernel_tuner"
    return frame


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean fraction per (landscape, budget) and strategy, plus the best Kernel Tuner strategy's mean."""
    table = results.pivot_table(index=["landscape", "budget"], columns="strategy", values="fraction", aggfunc="mean")
    kernel_tuner = [c for c in table.columns if str(c).startswith("kt:")]
    if kernel_tuner:
        table["best_kt"] = table[kernel_tuner].max(axis=1)
        table["best_kt_name"] = [
            str(row.idxmax()).removeprefix("kt:") if row.notna().any() else ""
            for _, row in table[kernel_tuner].iterrows()
        ]
    return table
