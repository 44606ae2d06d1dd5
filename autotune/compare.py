"""Compare strategies on recorded landscapes: mean fraction of the optimum found per budget.

The fraction of a run at budget b is optimum / best value among its first b evaluations (1.0 = found
the optimum). The workbench's strategies do not know the budget, so one replay with the largest budget
gives every smaller budget as a prefix, exactly as separate shorter runs would. Kernel Tuner's
strategies do use the budget (their schedules depend on max_fevals); benchmarks/kernel_tuner_baseline.py
runs them once per budget into `autotune/kernel_tuner_baseline.csv`, which ships with the package
(`kernel_tuner_baseline_csv()`) and is read with `load_kernel_tuner_results`.

Means over several landscapes (`summary_with_errors`) come with a standard error over seeds: each seed's
mean over the landscapes of a group is one sample. The groups keep apart the landscapes held out of every
design choice (`HOLDOUT`) from those the strategies were developed on.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from triton_workbench.autotune.landscape import Landscape, load_landscape
from triton_workbench.autotune.replay import replay
from triton_workbench.autotune.strategies import strategy_options as strategy_options_for
from triton_workbench.kernels.errors import UsageError

RESULT_COLUMNS = ["landscape", "budget", "strategy", "seed", "fraction", "source"]
KERNEL_TUNER_BASELINE = "kernel_tuner_baseline.csv"  # package data of triton_workbench.autotune
HOLDOUT = ("GEMM_V100", "convolution_TITAN_RTX")  # the recorded landscapes no design choice was made on
SUMMARY_GROUPS = ("development", "held out", "all")
SUMMARY_COLUMNS = ["group", "budget", "strategy", "source", "mean", "se", "seeds"]


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
    workers: int = 1,
    batch: int = 1,
) -> pd.DataFrame:
    """One row per (landscape, budget, strategy, seed) with the fraction of the optimum found.
    `strategy_options` go to every strategy (each must take them: see `make_strategy`). `workers` > 1
    replays in that many processes; the rows are the same, each run being determined by its seed.
    `batch`: configs asked before any is told (see `replay`)."""
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise UsageError(f"budgets: expected positive ints, got {budgets!r}")
    if not strategies:
        raise UsageError("strategies: expected at least one strategy name")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise UsageError(f"seeds: expected a positive count or a list of seeds, got {seeds!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise UsageError(f"workers: expected a positive int, got {workers!r}")
    for strategy in strategies:  # before any landscape is loaded or replayed
        strategy_options_for(strategy, strategy_options)
    loaded = [item if isinstance(item, Landscape) else load_landscape(item) for item in landscapes]
    runs = [(index, strategy, seed) for index in range(len(loaded)) for strategy in strategies for seed in seed_list]
    bar = tqdm(total=len(runs), desc="strategies", unit="run", disable=not progress)
    rows = []
    with _replayer(loaded, max(budgets), strategy_options, batch, workers) as replays:
        for (index, strategy, seed), best in zip(runs, replays(runs)):
            landscape = loaded[index]
            for budget in budgets:
                fraction = landscape.optimum / best[min(budget, len(best)) - 1] if len(best) else 0.0
                rows.append((landscape.name, budget, strategy, seed, float(fraction), "workbench"))
            bar.update(1)
            bar.set_postfix_str(f"{landscape.name} {strategy}: {rows[-1][4]:.3f} at {max(budgets)}")
    bar.close()
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _best_values(state: tuple, run: tuple[int, str, int]) -> np.ndarray:
    """The best value after each evaluation of one (landscape index, strategy, seed) run, given the
    (landscapes, budget, strategy_options, batch) of a comparison."""
    landscapes, budget, strategy_options, batch = state
    index, strategy, seed = run
    return replay(landscapes[index], strategy, budget, seed, strategy_options, batch)["best_value"].to_numpy()


_WORKER_STATE: tuple = ()  # the comparison's state in a worker process, set once by its initializer


def _set_worker_state(*state: Any) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def _worker_best_values(run: tuple[int, str, int]) -> np.ndarray:
    return _best_values(_WORKER_STATE, run)


@contextlib.contextmanager
def _replayer(landscapes: list[Landscape], budget: int, strategy_options: Mapping[str, Any] | None, batch: int,
              workers: int):
    """A function mapping runs to their best values, in order: in this process, or in `workers` fresh
    ("spawn") processes that each receive the landscapes once."""
    state = (landscapes, budget, strategy_options, batch)
    if workers == 1:
        yield lambda runs: (_best_values(state, run) for run in runs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_worker_state, initargs=state) as pool:
        yield lambda runs: pool.map(_worker_best_values, runs)


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


def landscape_groups(
    landscapes: Sequence[str], holdout: Sequence[str] = HOLDOUT, per_landscape: bool = False
) -> dict[str, list[str]]:
    """Groups of landscapes to average over: each landscape alone (with `per_landscape`), then "development"
    (those not in `holdout`) and "held out" where they have landscapes, and "all" where both do."""
    names = list(dict.fromkeys(landscapes))
    development = [name for name in names if name not in holdout]
    held_out = [name for name in names if name in holdout]
    groups = {name: [name] for name in names} if per_landscape else {}
    for group, members in (("development", development), ("held out", held_out)):
        if members:
            groups[group] = members
    if development and held_out:
        groups["all"] = names
    return groups


def seed_means(results: pd.DataFrame, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """group, budget, strategy, source, seed, fraction: each seed's mean fraction over a group's landscapes.

    A strategy counts in a group at a budget only if it has rows on every landscape of the group, and then
    only with the seeds it ran on all of them, so that every sample is a mean over the same landscapes."""
    frames = []
    for group, members in groups.items():
        rows = results[results["landscape"].isin(members)]
        if rows.empty:
            continue
        table = rows.pivot_table(index=["budget", "strategy", "source", "seed"], columns="landscape",
                                 values="fraction", aggfunc="mean")
        complete = table.reindex(columns=list(members)).dropna()
        frames.append(complete.mean(axis=1).rename("fraction").reset_index().assign(group=group))
    columns = ["group", "budget", "strategy", "source", "seed", "fraction"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _mean_and_error(samples: pd.Series) -> tuple[float, float]:
    """The mean of `samples` and its standard error, std (ddof=1) / sqrt(n); NaN from a single sample."""
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(len(samples)))


def _with_errors(per_seed: pd.DataFrame) -> pd.DataFrame:
    grouped = per_seed.groupby(SUMMARY_COLUMNS[:4], sort=False)["fraction"]
    rows = [(*key, *_mean_and_error(samples), len(samples)) for key, samples in grouped]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_with_errors(
    results: pd.DataFrame, holdout: Sequence[str] = HOLDOUT, per_landscape: bool = False
) -> pd.DataFrame:
    """group, budget, strategy, source, mean, se, seeds: the mean fraction over the landscapes of each group
    of `landscape_groups` and its standard error over seeds, each seed's mean over the group's landscapes
    being one sample (see `seed_means` for strategies that lack a landscape or a seed)."""
    return _with_errors(seed_means(results, landscape_groups(results["landscape"], holdout, per_landscape)))


def against_best_kernel_tuner(
    results: pd.DataFrame, reference: str, holdout: Sequence[str] = HOLDOUT, per_landscape: bool = True
) -> pd.DataFrame:
    """group, budget, best_kt, best_kt_mean, best_kt_se, difference, difference_se: per group and budget
    (as in `summary_with_errors`), the Kernel Tuner strategy with the highest mean over the group (one for
    the group, not one per landscape; picked after the fact, so its mean is biased upwards and its standard
    error does not count the choice) and `reference` (a workbench strategy) minus it, with standard error
    sqrt(se1² + se2²): the two ran independently (seed i of one shares no randomness with seed i of the
    other), so differences are not paired by seed. No row where Kernel Tuner has none; NaN differences
    where `reference` has none."""
    per_seed = seed_means(results, landscape_groups(results["landscape"], holdout, per_landscape))
    summary = _with_errors(per_seed)
    kernel_tuner = summary[summary["source"] == "kernel_tuner"]
    best = kernel_tuner.loc[kernel_tuner.groupby(["group", "budget"], sort=False)["mean"].idxmax()]

    ours = summary[summary["strategy"] == reference].set_index(["group", "budget"])
    rows = []
    for row in best.itertuples(index=False):
        difference = error = math.nan
        if (row.group, row.budget) in ours.index:
            mine = ours.loc[(row.group, row.budget)]
            difference, error = mine["mean"] - row.mean, math.hypot(mine["se"], row.se)
        rows.append((row.group, row.budget, str(row.strategy).removeprefix("kt:"), row.mean, row.se, difference, error))
    columns = ["group", "budget", "best_kt", "best_kt_mean", "best_kt_se", "difference", "difference_se"]
    return pd.DataFrame(rows, columns=columns)
