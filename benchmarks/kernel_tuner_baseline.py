"""Kernel Tuner 1.5.0's strategies replayed on recorded landscapes, for comparison with `autotune`.

Runs each Kernel Tuner strategy in its simulation mode (`kernel_tuner.interface.tune_cache`, which is
`tune_kernel(..., simulation_mode=True, cache=FILE)` with the restriction "the config is in the
cache") with `strategy_options={"max_fevals": budget}`, and writes one row per
(landscape, budget, strategy, seed) with `fraction` = optimum time / best time found (1.0 = optimum)
to autotune/kernel_tuner_baseline.csv (by default), which ships with the package and is what
`workbench strategies` shows beside its own strategies.
Kernel Tuner counts a budget unit per first visit of a cached config; configs outside the cache are
invalid and free. `autotune.replay` counts the same way, so the two are compared evaluation for
evaluation.

Kernel Tuner is not a dependency of the workbench: run this with the interpreter of a separate venv,
    python3 -m venv /tmp/ktvenv && /tmp/ktvenv/bin/pip install kernel_tuner==1.5.0 pandas
    /tmp/ktvenv/bin/python benchmarks/kernel_tuner_baseline.py --landscapes ../shared/landscapes --seeds 20
    .venv/bin/python benchmarks/write_synthetic_landscapes.py /tmp/synthetic   # the synthetic suite as cache files
    /tmp/ktvenv/bin/python benchmarks/kernel_tuner_baseline.py --landscapes /tmp/synthetic --seeds 11
Kernel Tuner's strategies draw from the global `random` and `numpy.random` generators (its `seed`
argument is not used by them), so each run seeds both. Rows are appended to the CSV as they finish and
finished (landscape, budget, strategy, seed) rows are skipped on a rerun, so an interrupted run loses
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gzip
import io
import json
import math
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

STRATEGIES = (
    "dual_annealing",
    "genetic_algorithm",
    "simulated_annealing",
    "greedy_ils",
    "mls",
    "bayes_opt",
    "random_sample",
)
FIELDS = ("landscape", "budget", "strategy", "seed", "fraction", "evaluations", "wall_s")


def plain_cache_file(path: Path, directory: Path) -> tuple[Path, list[str], float]:
    """An un-gzipped copy of a cache file that Kernel Tuner accepts, its parameter names, and the optimum.

    Kernel Tuner needs `problem_size` to infer the tune_kernel arguments; the recorded files lack it,
    so a placeholder is added (simulation mode never launches a kernel). Failed configs keep their
    error string ("RuntimeFailedConfig", ...), which Kernel Tuner's reader turns into its error objects.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    data.setdefault("problem_size", [1])
    data["cache"] = data.pop("cache")  # Kernel Tuner's reader expects the cache last: the file ends "}}}"
    times = [entry["time"] for entry in data["cache"].values() if isinstance(entry["time"], (int, float))]
    target = directory / (path.name.removesuffix(".gz").removesuffix(".json") + ".json")
    target.write_text(json.dumps(data))
    return target, list(data["tune_params_keys"]), min(times)


def memoise_cache_reads() -> None:
    """Read each cache file once per process instead of twice per run (Kernel Tuner re-parses it in
    `tune_cache` and again in `process_cache`). Simulation mode only copies the entries it serves."""
    from kernel_tuner import util

    read_cache = functools.lru_cache(maxsize=None)(util.read_cache)
    util.read_cache = lambda cachefile, open_cache=True: read_cache(cachefile, open_cache)


def run_one(cache_file: Path, param_names: list[str], strategy: str, budget: int, seed: int) -> tuple[float, int]:
    """Best time among the first `budget` distinct configs one simulated run visited, and their count.

    Some strategies overshoot `max_fevals` slightly (they check it between batches of evaluations); only
    the first `budget` distinct cached configs count, as in `autotune.replay`.
    """
    from kernel_tuner.interface import tune_cache

    random.seed(seed)
    np.random.seed(seed)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        results, _ = tune_cache(
            str(cache_file), strategy=strategy, strategy_options={"max_fevals": budget}, quiet=True, seed=seed
        )
    first_times: dict[tuple, float] = {}
    for result in results:
        if not result:
            continue
        key = tuple(result[name] for name in param_names)
        if key not in first_times and len(first_times) < budget:
            time_value = result.get("time")
            first_times[key] = float(time_value) if isinstance(time_value, (int, float)) else math.inf
    return min(first_times.values(), default=math.inf), len(first_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "landscapes"
    parser.add_argument("--landscapes", type=Path, default=beside_checkout)
    parser.add_argument("--budgets", default="25,50,100,200,500")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    # package data of triton_workbench.autotune (read through importlib.resources by autotune.compare)
    shipped = Path(__file__).resolve().parents[1] / "autotune" / "kernel_tuner_baseline.csv"
    parser.add_argument("--out", type=Path, default=shipped)
    args = parser.parse_args()
    memoise_cache_reads()
    budgets = [int(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    done: set[tuple[str, int, str, int]] = set()
    if args.out.exists():
        with open(args.out) as handle:
            done = {(r["landscape"], int(r["budget"]), r["strategy"], int(r["seed"])) for r in csv.DictReader(handle)}
    new_file = not args.out.exists()
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a", newline="") as out:
        writer = csv.DictWriter(out, FIELDS)
        if new_file:
            writer.writeheader()
        paths = sorted(args.landscapes.glob("*.json*"))
        landscapes = {path.name.split(".json")[0]: plain_cache_file(path, Path(tmp)) for path in paths}
        for seed in range(args.seeds):  # seeds outermost: a run cut short still covers every landscape
            for landscape, (cache_file, param_names, optimum) in landscapes.items():
                for strategy in strategies:
                    for budget in budgets:
                        if (landscape, budget, strategy, seed) in done:
                            continue
                        started = time.perf_counter()
                        best, evaluations = run_one(cache_file, param_names, strategy, budget, seed)
                        wall_s = time.perf_counter() - started
                        writer.writerow(dict(landscape=landscape, budget=budget, strategy=strategy, seed=seed,
                                             fraction=optimum / best, evaluations=evaluations, wall_s=round(wall_s, 2)))
                        out.flush()
                        print(f"{landscape} {strategy} budget={budget} seed={seed}: {optimum / best:.3f} "
                              f"({evaluations} evals, {wall_s:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
