"""Replay on Kernel Tuner cache files: budget counting, failures, absent configs, and the comparison."""

import gzip
import json
import math

import pandas as pd
import pytest

from triton_workbench.autotune.compare import compare, load_kernel_tuner_results, summary_with_errors
from triton_workbench.autotune.replay import replay
from triton_workbench.workbench.cli import main


def write_cache(path, failed=("3,2",), absent=("0,0", "5,1")):
    """A Kernel Tuner cache: time = (a - 4)^2 + b + 1, some configs failed, some absent (restricted)."""
    params = {"a": list(range(6)), "b": [0, 1, 2]}
    cache = {}
    for a in params["a"]:
        for b in params["b"]:
            key = f"{a},{b}"
            if key in absent:
                continue
            time = "RuntimeFailedConfig" if key in failed else float((a - 4) ** 2 + b + 1)
            cache[key] = {"a": a, "b": b, "time": time, "times": [time]}
    data = {"device_name": "test", "kernel_name": "k", "tune_params_keys": ["a", "b"], "tune_params": params,
            "objective": "time", "cache": cache}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as handle:
        json.dump(data, handle)
    return path


def test_exhaustive_replay_visits_each_recorded_config_once(tmp_path):
    path = write_cache(tmp_path / "toy.json.gz")
    trajectory = replay(path, "exhaustive", budget=100, seed=0)
    assert len(trajectory) == 16  # 18 configs in the space, 2 absent: invalid, never asked, never charged
    assert list(trajectory.columns) == ["a", "b", "value", "best_value"]
    assert not ((trajectory["a"] == 0) & (trajectory["b"] == 0)).any()
    failed = trajectory[(trajectory["a"] == 3) & (trajectory["b"] == 2)]
    assert len(failed) == 1 and math.isinf(failed["value"].iloc[0])  # a failure costs an evaluation
    assert trajectory["best_value"].iloc[-1] == 1.0
    assert trajectory["best_value"].is_monotonic_decreasing


def test_budget_and_seed(tmp_path):
    path = write_cache(tmp_path / "toy.json")
    first = replay(path, "random", budget=5, seed=1)
    assert len(first) == 5
    pd.testing.assert_frame_equal(first, replay(path, "random", budget=5, seed=1))
    assert not first.equals(replay(path, "random", budget=5, seed=2))
    with pytest.raises(ValueError, match="budget"):
        replay(path, "random", budget=0)
    with pytest.raises(FileNotFoundError):
        replay(tmp_path / "missing.json", "random", budget=5)


def test_batches_ask_several_configs_before_telling_any(tmp_path, monkeypatch):
    from triton_workbench.autotune.strategies.base import Strategy

    path = write_cache(tmp_path / "toy.json")
    untold_at_ask = []
    ask = Strategy.ask
    monkeypatch.setattr(Strategy, "ask", lambda self: untold_at_ask.append(len(self.pending)) or ask(self))
    trajectory = replay(path, "auto", budget=11, seed=0, batch=4)
    assert len(trajectory) == 11 and not trajectory.duplicated(["a", "b"]).any()
    assert untold_at_ask == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]  # the last batch is cut to the budget
    pd.testing.assert_frame_equal(replay(path, "random", 11, 3, batch=4), replay(path, "random", 11, 3))
    with pytest.raises(ValueError, match="batch"):
        replay(path, "random", budget=5, batch=0)


def test_replay_from_a_frame():
    frame = pd.DataFrame({"x": [1, 2, 3, 4], "y": [0, 0, 1, 1], "time": [4.0, 3.0, math.inf, 1.0]})
    trajectory = replay(frame, "exhaustive", budget=10)
    assert trajectory[["x", "y"]].values.tolist() == [[1, 0], [2, 0], [3, 1], [4, 1]]
    assert trajectory["value"].tolist() == [4.0, 3.0, math.inf, 1.0]
    with pytest.raises(ValueError, match="path_or_frame"):
        replay(frame.drop(columns="time"), "exhaustive", budget=10)


def test_compare_fractions_match_replays(tmp_path):
    path = write_cache(tmp_path / "toy.json.gz")
    results = compare([path], ["random", "auto"], [3, 8], seeds=2, progress=False)
    assert len(results) == 2 * 2 * 2 and set(results["source"]) == {"workbench"}
    for row in results.itertuples():
        best = replay(path, row.strategy, row.budget, row.seed)["value"].min()
        assert row.fraction == pytest.approx(1.0 / best)
    for _, runs in results.groupby(["strategy", "seed"]):
        assert runs.sort_values("budget")["fraction"].is_monotonic_increasing
    table = summary_with_errors(results, holdout=(), per_landscape=True).set_index(["group", "budget", "strategy"])
    assert table.loc[("toy", 8, "random"), "mean"] == pytest.approx(
        results.query("budget == 8 and strategy == 'random'")["fraction"].mean())


def test_compare_in_worker_processes_gives_the_same_rows(tmp_path):
    path = write_cache(tmp_path / "toy.json.gz")
    alone = compare([path], ["random", "auto"], [3, 8], seeds=[0, 5], progress=False)
    pd.testing.assert_frame_equal(compare([path], ["random", "auto"], [3, 8], seeds=[0, 5], progress=False,
                                          workers=2), alone)
    with pytest.raises(ValueError, match="workers"):
        compare([path], ["random"], [3], seeds=1, workers=0)


def test_strategies_command_prints_table_and_stores_rows(tmp_path, capsys):
    from triton_workbench.database import Database

    landscapes = tmp_path / "landscapes"
    landscapes.mkdir()
    write_cache(landscapes / "toy.json.gz")
    kernel_tuner_csv = tmp_path / "kt.csv"
    pd.DataFrame({"landscape": ["toy", "toy"], "budget": [4, 4], "strategy": ["mls", "mls"], "seed": [0, 1],
                  "fraction": [0.5, 0.25]}).to_csv(kernel_tuner_csv, index=False)
    database = tmp_path / "strategies.db"
    assert main(["strategies", "--landscapes", str(landscapes), "--budgets", "4,16", "--seeds", "2",
                 "--strategies", "random,exhaustive", "--kernel-tuner-csv", str(kernel_tuner_csv),
                 "--db", str(database)]) == 0
    output = capsys.readouterr().out
    header, rule, *lines = output.splitlines()[:4]
    assert header.split() == ["landscape", "budget", "random", "exhaustive", "best", "kt", "kt", "strategy",
                              "random", "−", "best"]
    assert len(header) == len(rule) == len(lines[0])  # aligned
    assert lines[0].split()[:2] == ["toy", "4"]
    assert "0.375 ± 0.125  mls" in lines[0]  # Kernel Tuner's mean at budget 4 ± its standard error over 2 seeds
    assert [line.split()[:3] for line in output.splitlines()[4:6]] == [["mean", "(development)", "4"],
                                                                       ["mean", "(development)", "16"]]
    stored = Database(database).read("strategy_results")
    assert len(stored) == 2 * 2 * 2 + 2
    assert set(stored["source"]) == {"workbench", "kernel_tuner"}
    assert stored.query("strategy == 'exhaustive' and budget == 16")["fraction"].eq(1.0).all()
    assert set(stored.query("source == 'workbench'")["seed"]) == {0, 1}

    assert main(["strategies", "--landscapes", str(landscapes), "--budgets", "4", "--seeds", "2", "--first-seed", "5",
                 "--strategies", "random", "--kernel-tuner-csv", "none", "--db", str(database)]) == 0
    later = Database(database).read("strategy_results")
    assert set(later.query("strategy == 'random' and budget == 4")["seed"]) == {0, 1, 5, 6}


def test_strategies_command_rejects_bad_arguments(tmp_path, capsys):
    assert main(["strategies", "--landscapes", str(tmp_path), "--budgets", "4"]) == 2
    assert "no *.json" in capsys.readouterr().err
    write_cache(tmp_path / "toy.json")
    assert main(["strategies", "--landscapes", str(tmp_path), "--budgets", "4,x"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["strategies", "--landscapes", str(tmp_path), "--first-seed", "-1"]) == 2
    assert "--first-seed" in capsys.readouterr().err
    assert main(["strategies", "--landscapes", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_kernel_tuner_results_layout(tmp_path):
    path = tmp_path / "kt.csv"
    pd.DataFrame({"landscape": ["toy"], "budget": [4], "strategy": ["mls"], "seed": [0], "fraction": [0.5]}).to_csv(path)
    frame = load_kernel_tuner_results(path)
    assert frame.iloc[0].to_dict() == {"landscape": "toy", "budget": 4, "strategy": "kt:mls", "seed": 0,
                                       "fraction": 0.5, "source": "kernel_tuner"}
    assert summary_with_errors(frame, holdout=()).iloc[0][["strategy", "source"]].tolist() == ["kt:mls", "kernel_tuner"]


def test_shipped_kernel_tuner_baseline_is_the_default():
    frame = load_kernel_tuner_results()
    assert len(frame) > 100 and set(frame["source"]) == {"kernel_tuner"}
    assert frame["strategy"].str.startswith("kt:").all()


def test_missing_kernel_tuner_csv_is_an_error_not_rows_left_out(tmp_path, capsys, monkeypatch):
    from triton_workbench.autotune import compare as compare_module

    landscapes = tmp_path / "landscapes"
    landscapes.mkdir()
    write_cache(landscapes / "toy.json.gz")
    missing = tmp_path / "nowhere.csv"
    arguments = ["strategies", "--landscapes", str(landscapes), "--budgets", "4", "--seeds", "1",
                 "--strategies", "random", "--db", str(tmp_path / "strategies.db")]
    assert main([*arguments, "--kernel-tuner-csv", str(missing)]) == 2
    assert f"Kernel Tuner baseline {missing} does not exist" in capsys.readouterr().err
    monkeypatch.setattr(compare_module, "kernel_tuner_baseline_csv", lambda: missing)  # an installation without it
    assert main(arguments) == 2
    assert "ships with triton_workbench.autotune" in capsys.readouterr().err
