"""Ablations behind `auto`'s design: each variant is `auto` with some options changed, replayed on the
development landscapes (the recorded ones not in `compare.HOLDOUT`, and the synthetic suite), never on
the held-out ones.

    python benchmarks/strategy_ablation.py --variants defaults,split-0.3 --seeds 2 --workers 2

Rows (the `compare` layout, the variant in the strategy column) are appended to
benchmarks/results/strategy_ablation.csv per (variant, seed) as they finish, and finished ones are
skipped on a rerun, so an interrupted run loses nothing (a file written for other landscapes or budgets
is refused; change a variant's options under a new name -- and rename the "defaults" rows when the
defaults change, or they are kept as finished). The table printed at the end is the mean
fraction of the optimum over the landscapes per budget, ± its standard error over seeds
(`compare.summary_with_errors`: each seed's mean over the landscapes is one sample).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from triton_workbench.autotune.compare import HOLDOUT, compare, landscape_files, summary_with_errors
from triton_workbench.autotune.landscape import load_landscape
from triton_workbench.autotune.synthetic import synthetic_suite

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [25, 50, 100, 200, 500]

# Each variant: the options that differ from `auto`'s defaults (ForestOptions); "batch" is not an option but
# the replay's batch (configs asked before any is told, as `tune` asks a batch to compile ahead).
VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "one-basin": {"basins": 1},  # the previous defaults: refinement around the best config only
    "basins-8": {"basins": 8},
    "basins-at-once": {"basin_stagnation": 0},  # spread over the basins from the first refining ask
    "batch-4": {"batch": 4},  # compile-ahead: 4 configs asked before any is told
    # tried against the previous defaults (one basin); stagnation > 0 replaces the basins by the elite in turn
    "offspring+stagnation": {"offspring": 400, "stagnation": 40},
    "split-0.3": {"split_features": 0.3, "basins": 1},  # 1.8x faster fits
    "split-0.3+offspring": {"split_features": 0.3, "offspring": 400, "basins": 1},
    "split-0.3+stagnation": {"split_features": 0.3, "stagnation": 40},
    "split-0.3+offspring+stagnation": {"split_features": 0.3, "offspring": 400, "stagnation": 40},
    "split-0.3+offspring+stagnation-no-spread": {"split_features": 0.3, "offspring": 400, "stagnation": 40,
                                                 "explore_every": 0},
    "one-basin+batch-4": {"batch": 4, "basins": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--landscapes", type=Path, default=ROOT.parent / "shared" / "landscapes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "strategy_ablation.csv")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    recorded = [load_landscape(path) for path in landscape_files(args.landscapes)]
    landscapes = [landscape for landscape in recorded if landscape.name not in HOLDOUT] + synthetic_suite()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(args.out) if args.out.exists() else pd.DataFrame(columns=["landscape", "budget", "strategy", "seed"])
    if len(done) and (set(done["landscape"]) != {l.name for l in landscapes} or set(done["budget"]) != set(BUDGETS)):
        parser.error(f"--out: {args.out} holds rows for other landscapes or budgets; give another file")
    finished = set(zip(done["strategy"], done["seed"]))
    for seed in range(args.seeds):  # seeds outermost: a run cut short still compares every variant
        for variant in variants:
            if (variant, seed) in finished:
                continue
            options = dict(VARIANTS[variant])
            batch = options.pop("batch", 1)
            rows = compare(landscapes, ["auto"], BUDGETS, [seed], progress=False, strategy_options=options,
                           workers=args.workers, batch=batch).assign(strategy=variant)
            rows.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
            print(f"{variant} seed {seed}: {rows.query('budget == 500')['fraction'].mean():.4f} at 500", flush=True)
    frame = pd.read_csv(args.out)
    frame = frame[frame["strategy"].isin(variants) & frame["seed"].lt(args.seeds)]
    summary = summary_with_errors(frame, holdout=())
    cells = summary.assign(cell=[f"{m:.4f} ± {s:.4f} ({n})" for m, s, n in
                                 zip(summary["mean"], summary["se"], summary["seeds"])])  # fmt: skip
    print(cells.pivot(index="strategy", columns="budget", values="cell").reindex(variants).to_string())


if __name__ == "__main__":
    main()
