"""The evaluation pipeline: correctness check, failures as outcomes, resource limits, watchdog, timing."""

import dataclasses
import json
import math
import multiprocessing
import os
import time

import pytest
import torch

from triton_workbench.autotune.objectives import objective_value
from triton_workbench.autotune.pipeline import Pipeline, Trial, over_limits, relative_error
from triton_workbench.autotune.timing import measure
from triton_workbench.kernels import runtime
from triton_workbench.profiler import EnergyStats
from tiny_spec import SPEC

PROBLEM = {"n": 37, "dtype": "fp32"}  # prime, not a multiple of any block
UNMEASURED = EnergyStats(*[math.nan] * 6, None, math.nan, 1, math.nan, math.nan)  # what a meter without NVML gives


def test_good_config_is_ok_timed_and_counted():
    pipeline = Pipeline(SPEC, PROBLEM, interpreter_reps=2)
    trial = pipeline.evaluate({"BLOCK": 16, "BROKEN": 0, "HANG": 0})
    assert trial.status == "ok", trial.reason
    assert trial.timer == runtime.timer_name()
    assert 0 < trial.time_ms_p20 <= trial.time_ms <= trial.time_ms_p80
    assert trial.gbps == pytest.approx(2 * 37 * 4 / (trial.time_ms / 1e3) / 1e9)
    assert trial.compile_time_s > 0


def test_wrong_result_is_recorded_as_wrong_and_never_wins():
    trial = Pipeline(SPEC, PROBLEM).evaluate({"BLOCK": 32, "BROKEN": 1, "HANG": 0})
    assert trial.status == "wrong" and "exceeds tolerance" in trial.reason
    assert math.isnan(trial.time_ms)
    assert objective_value("time", trial.time_ms, math.nan, trial.status) == math.inf


def test_kernel_that_fails_to_build_is_an_outcome_not_an_exception():
    trial = Pipeline(SPEC, PROBLEM).evaluate({"BLOCK": 24, "BROKEN": 0, "HANG": 0})  # arange needs a power of 2
    assert trial.status in ("compile_error", "runtime_error")
    assert "power of 2" in trial.reason


def test_hanging_config_is_stopped_by_the_watchdog():
    started = time.perf_counter()
    trial = Pipeline(SPEC, PROBLEM, timeout_s=0.5).evaluate({"BLOCK": 16, "BROKEN": 0, "HANG": 1})
    assert trial.status == "timeout" and "0.5 s" in trial.reason
    assert time.perf_counter() - started < 5


def test_compile_reports_reject_before_running():
    pipeline = Pipeline(SPEC, PROBLEM, timeout_s=2)
    config = {"BLOCK": 16, "BROKEN": 0, "HANG": 1}  # would hang if it ran: rejection must come first
    failed = pipeline.evaluate(config, {"ok": False, "reason": "CompilationError: at 3:4 bad", "compile_time_s": 0.2})
    assert failed.status == "compile_error" and "bad" in failed.reason and failed.compile_time_s == 0.2
    too_big = pipeline.evaluate(config, {"ok": True, "shared_bytes": 300_000, "registers": 40, "spills": 0})
    assert too_big.status == "out_of_resources" and "300000 bytes of shared memory" in too_big.reason
    assert too_big.shared_bytes == 300_000 and too_big.registers == 40
    registers = pipeline.evaluate({**config, "num_warps": 16}, {"ok": True, "shared_bytes": 0, "registers": 200})
    assert registers.status == "out_of_resources" and "registers" in registers.reason


def test_over_limits_is_silent_within_limits():
    limits = {"shared_bytes": 1000, "registers_per_thread": 255, "registers_per_sm": 65536}
    assert over_limits({"shared_bytes": 1000, "registers": 128}, {"num_warps": 4}, limits) == ""
    assert over_limits({"shared_bytes": 1001}, {}, limits)
    assert over_limits({"registers": 129}, {"num_warps": 16}, limits)  # 129 * 512 > 65536


def test_energy_meter_is_called_and_objectives_use_it():
    calls = []

    def meter(name, fn):
        fn()
        calls.append(name)
        return dataclasses.replace(UNMEASURED, energy_j_per_call=0.5, avg_power_w=100.0, throttled=False)

    trial = Pipeline(SPEC, PROBLEM, energy_meter=meter, interpreter_reps=1).evaluate({"BLOCK": 64, "BROKEN": 0, "HANG": 0})
    assert trial.status == "ok" and len(calls) == 1 and "tiny_scale" in calls[0]
    measures = trial.measures()
    assert measures["energy_j_per_call"] == 0.5 and math.isnan(measures["peak_power_w"])
    assert measures["throttled"] is False and trial.energy_j_per_call == 0.5
    assert math.isnan(Trial(config={}).energy_j_per_call) and math.isnan(Trial(config={}).measures()["avg_power_w"])
    assert objective_value("energy", trial.time_ms, 0.5) == 0.5
    assert objective_value("edp", 2.0, 0.5) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="objective"):
        objective_value("speed", 1.0, 1.0)


def test_relative_error_and_harness_edges():
    reference = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert relative_error(torch.tensor([1.0, -2.1]), reference) == pytest.approx(0.05)
    assert relative_error(torch.tensor([1.0]), reference) == math.inf
    assert relative_error(torch.tensor([float("nan"), 1.0]), reference) == math.inf
    timing = measure(lambda: time.sleep(0.002), interpreter_reps=3)
    if timing.timer == "interpreter":
        assert 2.0 <= timing.time_ms < 50
    with pytest.raises(TypeError, match="fn"):
        measure(3)
    assert Trial(config={}).measures()["timer"] is None


# ---------------------------------------------------------------- sweeps of the tiny kernel (autotune.tune)
from triton_workbench.autotune import TuningDatabase, TuningKey, tune  # noqa: E402
from triton_workbench.kernels import tuned  # noqa: E402


def _block_energy(name, fn):
    """A stand-in energy meter: bigger blocks cost less energy per call, whatever their time."""
    fn()
    block = int(name.split("'BLOCK': ")[1].split(",")[0])
    return dataclasses.replace(UNMEASURED, energy_j_per_call=1.0 / block, avg_power_w=10.0 * block,
                               peak_power_w=20.0 * block, start_temp_c=40.0, end_temp_c=41.0, mean_sm_clock_mhz=1500.0,
                               throttled=False)  # fmt: skip


def test_energy_objective_measures_stored_time_trials_again_and_picks_by_energy():
    first = tune(SPEC, PROBLEM, strategy="exhaustive", budget=8, progress=False, interpreter_reps=1)
    assert first["energy_j_per_call"].isna().all()
    trials = tune(SPEC, PROBLEM, strategy="exhaustive", budget=8, progress=False, interpreter_reps=1,
                  objective="energy", energy_meter=_block_energy)  # fmt: skip
    assert trials.attrs["run_id"] == 2 and len(trials) == 11  # run 2 measured the 3 ok configs again, with energy
    kept = trials[trials["run_id"] == 1]  # and run 1's trials stay as they were: no run replaces another's
    assert kept[["trial_id", "config", "status", "started_at"]].equals(first[["trial_id", "config", "status", "started_at"]])
    ok = trials[trials["run_id"] == 2].sort_values("energy_j_per_call", ascending=False)  # the default runs first
    assert (ok["status"] == "ok").all() and ok["config"].is_unique
    assert ok["energy_j_per_call"].tolist() == pytest.approx([1 / 16, 1 / 32, 1 / 64])
    assert ok["peak_power_w"].tolist() == [320.0, 640.0, 1280.0] and (ok["throttled"] == 0).all()
    best = TuningDatabase().best_configs("tiny_scale").iloc[0]
    assert json.loads(best["config"])["BLOCK"] == 64 and best["objective"] == "energy"
    assert tuned.config_for(SPEC, PROBLEM)["BLOCK"] == 64
    with pytest.raises(ValueError, match="energy meter"):
        tune(SPEC, PROBLEM, objective="edp", budget=2, progress=False)


def test_ctrl_c_marks_the_run_interrupted_and_the_next_sweep_finishes_it():
    seen = []

    def interrupt_after_two(trial):
        seen.append(trial)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(SPEC, PROBLEM, strategy="exhaustive", budget=8, progress=False, interpreter_reps=1, on_trial=interrupt_after_two)
    db = TuningDatabase()
    assert db.runs()["status"].tolist() == ["interrupted"] and len(db.trials()) == 2
    assert db.died_running(TuningKey.of(SPEC, PROBLEM)) == {}
    trials = tune(SPEC, PROBLEM, strategy="exhaustive", budget=8, progress=False, interpreter_reps=1)
    assert len(trials) == 8 and trials["config"].is_unique
    assert db.runs()["status"].tolist() == ["interrupted", "done"]


def _claim_and_exit(config):
    db = TuningDatabase()
    run = db.start_run("tune", "a sweep that dies")
    assert db.claim(run, TuningKey.of(SPEC, PROBLEM), config).state == "taken"
    os._exit(0)  # no trial stored, claim not released: as a kill -9 during the trial


def _die_measuring(config):
    """A process claims `config` to measure it and dies without storing a trial."""
    process = multiprocessing.get_context("fork").Process(target=_claim_and_exit, args=(config,))
    process.start()
    process.join(60)
    assert process.exitcode == 0


def test_config_whose_process_died_twice_is_recorded_as_timeout_not_run_again():
    key = TuningKey.of(SPEC, PROBLEM)
    hang = {"BLOCK": 16, "BROKEN": 0, "HANG": 0}  # runs fine, so only the deaths can make it a timeout
    retry = {"BLOCK": 32, "BROKEN": 0, "HANG": 0}
    db = TuningDatabase()
    for _ in range(2):
        _die_measuring(hang)
    _die_measuring(retry)  # died once: could have been a kill -9, so it runs again
    assert db.died_running(key) == {'{"BLOCK":16,"BROKEN":0,"HANG":0}': 2, '{"BLOCK":32,"BROKEN":0,"HANG":0}': 1}
    assert db.runs()["status"].tolist() == ["interrupted"] * 3  # their processes are gone
    live = {"BLOCK": 64, "BROKEN": 0, "HANG": 0}
    assert db.claim(db.start_run("tune", "alive"), key, live).state == "taken"  # this live process's own claim
    assert db.died_running(key) == {'{"BLOCK":16,"BROKEN":0,"HANG":0}': 2, '{"BLOCK":32,"BROKEN":0,"HANG":0}': 1}
    trials = tune(SPEC, PROBLEM, strategy="exhaustive", budget=8, progress=False, interpreter_reps=1).set_index("config")
    assert trials.loc['{"BLOCK":16,"BROKEN":0,"HANG":0}', "status"] == "timeout"
    assert "died twice" in trials.loc['{"BLOCK":16,"BROKEN":0,"HANG":0}', "reason"]
    assert trials.loc['{"BLOCK":32,"BROKEN":0,"HANG":0}', "status"] == "ok"
    assert trials.loc['{"BLOCK":64,"BROKEN":0,"HANG":0}', "status"] == "ok"  # a live owner's claim is no death
    assert db.died_running(key) == {} and db.claims(key).empty


def test_a_sweep_measures_the_heuristic_default_first():
    trials = tune(SPEC, PROBLEM, strategy="random", budget=1, progress=False, interpreter_reps=1)
    assert [json.loads(c) for c in trials["config"]] == [SPEC.default_config(PROBLEM)]


def test_tune_names_a_wrong_spec_or_problem():
    with pytest.raises(TypeError, match="spec must be"):
        tune("gemm", PROBLEM, progress=False)
    with pytest.raises(TypeError, match="problem must be"):
        tune(SPEC, "n=37", progress=False)
