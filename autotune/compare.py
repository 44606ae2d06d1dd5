"""Compare strategies on recorded landscapes: mean fraction of the optimum found per budget.

The fraction of a run at budget b is optimum / best value among its first b evaluations (1.0 = found
the optimum). The workbench's strategies do not know the budget, so one replay with the largest budget
gives every smaller budget as a prefix, exactly as separate shorter runs would. Kernel Tuner's
strategies do use the budget (their schedules depend on max_fevals); benchmarks/kernel_tuner_baseline.py
runs them once per budget and its CSV is read with `load_kernel_tuner_results`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from triton_workbench.autotune.landscape import Landscape, load_landscape
from triton_workbench.autotune.replay import replay

RESULT_COLUMNS = ["landscape", "budget", "strategy", "seed", "fraction", "source"]


def landscape_files(directory: str | Path) -> list[Path]:
    """The Kernel Tuner cache files (*.json, *.json.gz) in a directory, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"landscapes: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise ValueError(f"landscapes: no *.json or *.json.gz cache files in {directory}")
    return files


def compare(
    landscapes: Sequence[str | Path | Landscape],
    strategies: Sequence[str],
    budgets: Sequence[int],
    seeds: int | Sequence[int],
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (landscape, budget, strategy, seed) with the fraction of the optimum found."""
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"budgets: expected positive ints, got {budgets!r}")
    if not strategies:
        raise ValueError("strategies: expected at least one strategy name")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError(f"seeds: expected a positive count or a list of seeds, got {seeds!r}")
    loaded = [item if isinstance(item, Landscape) else load_landscape(item) for item in landscapes]
    rows = []
    runs = [(landscape, strategy, seed) for landscape in loaded for strategy in strategies for seed in seed_list]
    bar = tqdm(runs, desc="strategies", unit="run", disable=not progress)
    for landscape, strategy, seed in bar:
        best = replay(landscape, strategy, max(budgets), seed)["best_value"].to_numpy()
        for budget in budgets:
            fraction = landscape.optimum / best[min(budget, len(best)) - 1] if len(best) else 0.0
            rows.append((landscape.name, budget, strategy, seed, float(fraction), "workbench"))
        bar.set_postfix_str(f"{landscape.name} {strategy}: {rows[-1][4]:.3f} at {max(budgets)}")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def load_kernel_tuner_results(path: str | Path) -> pd.DataFrame:
    """Rows of benchmarks/kernel_tuner_baseline.csv in the `compare` layout (strategy prefixed "kt:")."""
    frame = pd.read_csv(path)
    missing = set(RESULT_COLUMNS[:5]) - set(frame.columns)
    if missing:
        raise ValueError(f"kernel_tuner_csv: {path} lacks columns {sorted(missing)}")
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
