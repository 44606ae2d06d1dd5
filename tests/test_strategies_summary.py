"""`workbench strategies` summaries: means over groups of landscapes with standard errors over seeds, the
held-out landscapes apart, one best Kernel Tuner strategy per group and budget, the --synthetic suite,
and the regret-over-time figure of the report."""

import math

import numpy as np
import pandas as pd
import pytest

from triton_workbench.autotune.compare import (against_best_kernel_tuner, landscape_groups, seed_means,
                                               summary_with_errors)
from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.autotune.synthetic import synthetic_suite
from triton_workbench.database import Database
from triton_workbench.reports.build import build_sections, write_report
from triton_workbench.reports.strategies import REGRET_FLOOR, regret_figure
from triton_workbench.workbench.cli import build_parser, main

HOLDOUT = ["H"]
# fractions per landscape, strategy and seed (0, 1, 2) at budget 10; L1 and L2 are development, H held out
FRACTIONS = {
    ("L1", "auto", "workbench"): [0.5, 0.6, 0.7],
    ("L2", "auto", "workbench"): [0.7, 0.8, 0.9],
    ("H", "auto", "workbench"): [0.9, 0.9, 0.6],
    ("L1", "kt:a", "kernel_tuner"): [0.9, 0.9, 0.9],  # best on L1 alone ...
    ("L2", "kt:a", "kernel_tuner"): [0.3, 0.3, 0.3],  # ... but not on L1 and L2 together
    ("H", "kt:a", "kernel_tuner"): [0.5, 0.5, 0.5],
    ("L1", "kt:b", "kernel_tuner"): [0.6, 0.7, 0.8],
    ("L2", "kt:b", "kernel_tuner"): [0.7, 0.7, 0.7],
    ("H", "kt:b", "kernel_tuner"): [0.4, 0.4, 0.4],
}


def hand_made(kernel_tuner_seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for (landscape, strategy, source), fractions in FRACTIONS.items():
        seeds = kernel_tuner_seeds if source == "kernel_tuner" else (0, 1, 2)
        rows += [(landscape, 10, strategy, seed, fraction, source) for seed, fraction in zip(seeds, fractions)]
    return pd.DataFrame(rows, columns=["landscape", "budget", "strategy", "seed", "fraction", "source"])


def row(frame: pd.DataFrame, group: str, strategy: str | None = None) -> pd.Series:
    selected = frame[(frame["group"] == group) & ((frame["strategy"] == strategy) if strategy else True)]
    assert len(selected) == 1, selected
    return selected.iloc[0]


def test_landscape_groups_keep_the_held_out_apart():
    assert landscape_groups(["L1", "H", "L2"], HOLDOUT) == {
        "development": ["L1", "L2"], "held out": ["H"], "all": ["L1", "H", "L2"]}
    assert landscape_groups(["L1", "L2"], HOLDOUT) == {"development": ["L1", "L2"]}  # no "all" equal to it
    assert landscape_groups(["H"], HOLDOUT, per_landscape=True) == {"H": ["H"], "held out": ["H"]}
    assert set(landscape_groups(["GEMM_A100", "GEMM_V100", "convolution_TITAN_RTX"])["held out"]) == {
        "GEMM_V100", "convolution_TITAN_RTX"}  # the default holdout


def test_standard_error_is_over_seeds_of_the_mean_over_landscapes():
    summary = summary_with_errors(hand_made(), HOLDOUT)
    assert set(summary["group"]) == {"development", "held out", "all"}
    development = row(summary, "development", "auto")
    # per seed over L1 and L2: 0.6, 0.7, 0.8 -> mean 0.7, std 0.1 (not the std of all six fractions, 0.141)
    assert development["mean"] == pytest.approx(0.7)
    assert development["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert development["seeds"] == 3
    held_out = row(summary, "held out", "auto")  # 0.9, 0.9, 0.6: mean 0.8, std sqrt(0.03)
    assert (held_out["mean"], held_out["se"]) == pytest.approx((0.8, math.sqrt(0.03) / math.sqrt(3)))
    everything = row(summary, "all", "auto")  # per seed 0.7, 0.7667, 0.7333
    assert everything["mean"] == pytest.approx(2.2 / 3)
    assert everything["se"] == pytest.approx(np.std([2.1 / 3, 2.3 / 3, 2.2 / 3], ddof=1) / math.sqrt(3))
    per_landscape = summary_with_errors(hand_made(), HOLDOUT, per_landscape=True)
    assert row(per_landscape, "L1", "auto")["se"] == pytest.approx(0.1 / math.sqrt(3))


def test_a_strategy_counts_in_a_group_only_on_all_its_landscapes_and_seeds():
    extra = pd.DataFrame([("L1", 10, "kt:c", 0, 1.0, "kernel_tuner"),  # kt:c never ran on L2
                          ("L1", 10, "auto", 3, 0.1, "workbench")],  # seed 3 of auto only on L1
                         columns=hand_made().columns)
    results = pd.concat([hand_made(), extra], ignore_index=True)
    per_seed = seed_means(results, landscape_groups(results["landscape"], HOLDOUT, per_landscape=True))
    assert set(per_seed.query("group == 'L1'")["strategy"]) == {"auto", "kt:a", "kt:b", "kt:c"}
    assert "kt:c" not in set(per_seed.query("group == 'development'")["strategy"])
    assert sorted(per_seed.query("group == 'development' and strategy == 'auto'")["seed"]) == [0, 1, 2]
    assert sorted(per_seed.query("group == 'L1' and strategy == 'auto'")["seed"]) == [0, 1, 2, 3]


def test_best_kernel_tuner_is_one_strategy_per_group_and_budget():
    versus = against_best_kernel_tuner(hand_made(), "auto", HOLDOUT)
    assert row(versus, "L1")["best_kt"] == "a"  # per landscape its own best ...
    assert row(versus, "L2")["best_kt"] == "b"
    development = row(versus, "development")
    assert development["best_kt"] == "b"  # ... but one for the group: b (0.7) over a (0.6), not 0.9 and 0.7 mixed
    assert development["best_kt_mean"] == pytest.approx(0.7)
    # independent runs, never paired by seed label: the standard errors add in quadrature
    assert development["difference"] == pytest.approx(0.0, abs=1e-12)
    assert development["difference_se"] == pytest.approx(math.hypot(0.1 / math.sqrt(3), 0.05 / math.sqrt(3)))
    held_out = row(versus, "held out")
    assert (held_out["best_kt"], held_out["difference"]) == ("a", pytest.approx(0.3))


def test_difference_is_the_same_whatever_seeds_kernel_tuner_ran():
    relabelled = against_best_kernel_tuner(hand_made(kernel_tuner_seeds=(10, 11, 12)), "auto", HOLDOUT)
    pd.testing.assert_frame_equal(relabelled, against_best_kernel_tuner(hand_made(), "auto", HOLDOUT))


def test_regret_figure_has_a_panel_per_group_clipped_at_the_floor():
    results = pd.concat([hand_made(), hand_made().query("strategy == 'auto'").assign(strategy="perfect", fraction=1.0)],
                        ignore_index=True)
    fig = regret_figure(results, HOLDOUT)
    titles = [annotation.text for annotation in fig.layout.annotations]
    assert titles == ["development (2 landscapes)", "held out (1 landscape)"]
    traces = {(trace.name, trace.xaxis): trace for trace in fig.data}
    auto = traces[("auto (workbench)", "x")]
    assert list(auto.y) == pytest.approx([0.3]) and list(auto.error_y.array) == pytest.approx([0.1 / math.sqrt(3)])
    assert traces[("kt:b (kernel_tuner)", "x")].line.dash == "dash" and auto.line.dash == "solid"
    perfect = traces[("perfect (workbench)", "x2")]
    assert list(perfect.y) == [REGRET_FLOOR] and list(perfect.error_y.arrayminus) == [0.0]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "log"


def test_report_shows_the_regret_figure(tmp_path):
    db = TuningDatabase(tmp_path / "report.db")
    try:
        run_id = db.start_run("strategies", "strategy study", {"holdout": HOLDOUT})
        db.append("strategy_results", run_id, hand_made())
        db.finish_run(run_id)
        (section,) = [s for s in build_sections(db, [run_id])[0] if s.title == "Search strategies"]
        assert section.figure_count == 2
        page = write_report(db, None, tmp_path / "report.html").read_text(encoding="utf-8")
    finally:
        db.close()
    assert "regret over time, development and held-out landscapes" in page
    assert "held out (1 landscape)" in page
    assert "Regret = 1 − fraction of the optimum found" in page


def test_default_budgets_and_holdout():
    args = build_parser().parse_args(["strategies", "--synthetic"])
    assert (args.budgets, args.holdout) == ("25,50,100,200,500", "GEMM_V100,convolution_TITAN_RTX")


def test_strategies_command_on_the_synthetic_suite(tmp_path, capsys):
    names = [landscape.name for landscape in synthetic_suite()]
    database = tmp_path / "strategies.db"
    assert main(["strategies", "--synthetic", "--budgets", "5,10", "--seeds", "3", "--strategies", "random",
                 "--kernel-tuner-csv", "none", "--holdout", names[1], "--db", str(database)]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split("  ")[0].strip() for line in lines]
    assert labels[2:12] == [name for name in names if name != names[1] for _ in range(2)] + [f"{names[1]} (held out)"] * 2
    assert labels[12:18] == ["mean (development)", "mean (held out)", "mean (all)"] * 2
    stored = Database(database).read("strategy_results")
    assert set(stored["landscape"]) == set(names) and len(stored) == 5 * 2 * 3
    assert Database(database).runs()["meta"].iloc[0]["holdout"] == [names[1]]
    # the mean row: each seed's mean over the four development landscapes, then mean and se over seeds
    per_seed = stored.query(f"budget == 10 and landscape != '{names[1]}'").groupby("seed")["fraction"].mean()
    expected = f"{per_seed.mean():.3f} ± {per_seed.std(ddof=1) / math.sqrt(3):.3f}"
    development = lines[labels.index("mean (development)", 15)]
    assert development.split()[2:] == [str(10), *expected.split()]


def test_strategies_command_needs_landscapes_or_synthetic(capsys):
    assert main(["strategies", "--budgets", "5"]) == 2
    error = capsys.readouterr().err
    assert "--landscapes" in error and "--synthetic" in error
