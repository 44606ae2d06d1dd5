"""Static ceilings in tuning (issue 11): stored with each compiled trial, shown as static estimates beside
measured times, and `tune --prune-static R` recording configs as 'pruned' instead of measuring them."""

import json
import math
import sqlite3

import numpy as np
import pandas as pd
import pytest

from triton_workbench.autotune import TuningDatabase, TuningKey, tune
from triton_workbench.autotune.pipeline import Pipeline
from triton_workbench.autotune.results import TRIAL_MEASURES
from triton_workbench.database import TRIAL_STATUSES, TrialStatus
from triton_workbench.kernels.ceilings import static_bound_tflops
from triton_workbench.kernels.errors import UsageError
from triton_workbench.reports.tuning import prepare_trials, top_configs_table, choose_metric
from triton_workbench.workbench.cli import main
from tiny_spec import SPEC

# fp16, big enough that the tensor/issue ceiling of small tiles binds (memory ceiling ~0.58 on the H100); the
# default's 128x128 tiles run in the interpreter in about a second, and the small tiles it prunes never run
GEMM_ARGS = ["--shape", "512,512,512", "--dtype", "fp16", "--activation", "none", "--problem", '{"bias": false}']


def test_prune_static_records_pruned_configs_with_both_figures_and_never_picks_one(capsys):
    assert main(["tune", "gemm", *GEMM_ARGS, "--strategy", "exhaustive", "--budget", "5", "--workers", "2",
                 "--prune-static", "1.0"]) == 0
    output = capsys.readouterr().out
    trials = TuningDatabase().trials()
    assert len(trials) == 5 and trials["config"].is_unique
    compiled = trials[trials["status"].isin([TrialStatus.OK, TrialStatus.PRUNED])]
    assert compiled["static_tensor_ceiling"].between(0, 1, inclusive="right").all()  # stored for compiled trials
    assert compiled["static_memory_ceiling"].between(0, 1, inclusive="right").all()
    pruned = trials[trials["status"] == TrialStatus.PRUNED]
    assert len(pruned) >= 1, trials[["config", "status", "static_tensor_ceiling", "reason"]]
    assert pruned["time_ms"].isna().all()  # not measured
    for reason in pruned["reason"]:
        assert "static estimate" in reason and "< 1 x the best so far" in reason
        assert "tensor/issue ceiling" in reason and "memory ceiling" in reason
    ok = trials[trials["status"] == TrialStatus.OK]
    assert json.loads(ok["config"].iloc[0]) == json.loads(trials["config"].iloc[0])  # the default: first, measured
    best_bound = max(static_bound_tflops(t, m, None) for t, m in zip(ok["static_tensor_ceiling"], ok["static_memory_ceiling"]))
    for t, m in zip(pruned["static_tensor_ceiling"], pruned["static_memory_ceiling"]):
        assert static_bound_tflops(t, m, None) < best_bound
    best = TuningDatabase().best_configs("gemm").iloc[0]
    assert best["config"] in set(ok["config"]) and best["config"] not in set(pruned["config"])
    assert "pruned" in output and "static ceiling" in output and "static estimate" in output


def test_without_prune_static_nothing_is_pruned_and_ceilings_are_still_stored():
    assert main(["tune", "gemm", *GEMM_ARGS[2:], "--shape", "128,128,128", "--strategy", "exhaustive", "--budget", "2",
                 "--workers", "2"]) == 0
    trials = TuningDatabase().trials()
    assert (trials["status"] == TrialStatus.OK).all()
    assert trials["static_tensor_ceiling"].notna().all() and trials["static_memory_ceiling"].notna().all()


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_bad_prune_static_values_are_a_clear_error_naming_the_option(value, capsys):
    assert main(["tune", "gemm", "--prune-static", value]) == 2
    error = capsys.readouterr().err
    assert "--prune-static" in error and "0 < R <= 1" in error
    assert TuningDatabase().runs().empty


def test_prune_static_needs_compiling_ahead_and_the_api_checks_its_value(capsys):
    assert main(["tune", "gemm", "--prune-static", "0.5", "--no-compile-ahead"]) == 2
    assert "--prune-static" in capsys.readouterr().err
    for value in (0, 2, True, "0.5"):
        with pytest.raises(UsageError, match="prune_static"):
            tune(SPEC, {"n": 37, "dtype": "fp32"}, prune_static=value, progress=False)


def test_pipeline_copies_the_ceilings_of_a_compile_report_and_pruned_is_a_trial_status():
    assert "pruned" in TRIAL_STATUSES
    report = {"ok": True, "shared_bytes": 0, "registers": 16, "spills": 0, "compile_time_s": 0.1,
              "static_tensor_ceiling": None, "static_memory_ceiling": 0.25, "static_peak_tflops": 67.0}
    trial = Pipeline(SPEC, {"n": 37, "dtype": "fp32"}, interpreter_reps=1).evaluate({"BLOCK": 16, "BROKEN": 0, "HANG": 0}, report)
    assert trial.status == "ok" and math.isnan(trial.static_tensor_ceiling) and trial.static_memory_ceiling == 0.25
    assert static_bound_tflops(None, 0.25, 67.0) == pytest.approx(16.75)
    assert static_bound_tflops(0.5, 0.25, None) == 0.25 and static_bound_tflops(None, None, 1.0) is None


def test_an_older_database_without_the_ceiling_columns_opens_and_gains_them(tmp_path):
    path = tmp_path / "old.db"
    db = TuningDatabase(path)
    key = TuningKey.of(SPEC, {"n": 37, "dtype": "fp32"})
    run = db.start_run("tune", "old")
    db.record_trial(run, key, {"BLOCK": 16}, "ok", time_ms=1.0)
    db.close()
    connection = sqlite3.connect(path)  # as an older version wrote it: no static ceiling columns
    for column in ("static_tensor_ceiling", "static_memory_ceiling"):
        connection.execute(f"ALTER TABLE trials DROP COLUMN {column}")
    connection.commit()
    assert "static_tensor_ceiling" not in {row[1] for row in connection.execute("PRAGMA table_info(trials)")}
    connection.close()
    reopened = TuningDatabase(path)
    trials = reopened.trials()
    assert trials["time_ms"].tolist() == [1.0] and trials["static_tensor_ceiling"].isna().all()
    reopened.record_trial(run, key, {"BLOCK": 32}, "pruned", "static estimate 1 < 1 x the best so far, 2",
                          static_tensor_ceiling=0.5, static_memory_ceiling=0.9)
    stored = reopened.trials().set_index("config")
    assert stored.loc['{"BLOCK":32}', "static_tensor_ceiling"] == 0.5 and stored.loc['{"BLOCK":32}', "status"] == "pruned"
    assert {"static_tensor_ceiling", "static_memory_ceiling"} <= set(TRIAL_MEASURES)


def test_report_trials_table_shows_static_estimates_beside_measured_times():
    trials = pd.DataFrame({
        "trial_id": [1, 2, 3], "run_id": 1, "kernel": "gemm", "problem": '{"M":1}', "timer": "interpreter",
        "config": ['{"BLOCK_M":32}', '{"BLOCK_M":64}', '{"BLOCK_M":128}'], "status": ["ok", "ok", "pruned"],
        "reason": ["", "", "static estimate"], "time_ms": [2.0, 1.0, np.nan], "time_ms_p20": [1.9, 0.9, np.nan],
        "time_ms_p80": [2.1, 1.1, np.nan], "tflops": np.nan, "gbps": np.nan, "energy_j_per_call": np.nan,
        "registers": 80.0, "spills": 0.0, "shared_bytes": 4096.0,
        "static_tensor_ceiling": [0.13, 0.19, 0.1], "static_memory_ceiling": [0.29, 0.29, 0.29]})
    frame, _ = prepare_trials(trials)
    table = top_configs_table(frame, choose_metric(frame))
    columns = list(table.columns)
    assert columns.index("tensor/issue ceiling (static estimate)") == columns.index("p20-p80 (ms)") + 1
    assert table["tensor/issue ceiling (static estimate)"].tolist() == [0.19, 0.13]
    assert table["memory ceiling (static estimate)"].tolist() == [0.29, 0.29]
    older = top_configs_table(frame.drop(columns=["static_tensor_ceiling", "static_memory_ceiling"]), choose_metric(frame))
    assert not any("static" in column for column in older.columns)  # an older file: nothing to show
