"""workbench tune / export / import / bench, and sweeps that are re-run, killed and resumed."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from triton_workbench import kernels
from triton_workbench.autotune import TuningDatabase, TuningKey, tune
from triton_workbench.database import DatabaseFileError
from triton_workbench.kernels import GEMM_SPEC, tuned
from triton_workbench.workbench.cli import main

GEMM_PROBLEM_ARGS = ["--shape", "19,9,13", "--dtype", "fp32", "--activation", "gelu"]  # odd, below every block
TESTS = Path(__file__).parent


def _gemm_problem():
    problem = dict(next(p for p in GEMM_SPEC.example_problems if p["dtype"] == "fp32"))
    return {**problem, "M": 19, "N": 9, "K": 13, "activation": "gelu"}


def test_gemm_sweep_stores_every_trial_kernels_use_the_winner_and_rerun_evaluates_nothing(capsys):
    assert main(["tune", "gemm", *GEMM_PROBLEM_ARGS, "--budget", "3", "--workers", "1"]) == 0
    output = capsys.readouterr().out
    assert "interpreter" in output and "top 3 of 3 correct configs by time" in output
    assert "not GPU performance" in output and "vs torch CPU" in output
    db = TuningDatabase()
    trials = db.trials()
    assert len(trials) == 3 and trials["config"].is_unique and (trials["status"] == "ok").all()
    assert (trials["timer"] == "interpreter").all() and (trials["time_ms"] > 0).all()
    assert trials["shared_bytes"].notna().all() and trials["registers"].notna().all()  # compiled ahead for sm_90
    problem = _gemm_problem()
    assert set(trials["problem"]) == {json.dumps(problem, sort_keys=True, separators=(",", ":"))}
    winner = json.loads(trials.loc[trials["time_ms"].idxmin(), "config"])
    tuned.clear_cache()
    assert tuned.config_for(GEMM_SPEC, problem) == winner
    assert db.runs()["status"].tolist() == ["done"]

    started = time.perf_counter()
    assert main(["tune", "gemm", *GEMM_PROBLEM_ARGS, "--budget", "3"]) == 0
    assert time.perf_counter() - started < 10
    again = db.trials()
    assert again[["trial_id", "config", "time_ms", "started_at"]].equals(trials[["trial_id", "config", "time_ms", "started_at"]])
    assert len(db.runs()) == 1  # nothing to do: no new run, nothing evaluated


# A sweep that stops after its third stored trial, announces it in a marker file and waits there, so
# the test kills it at a known point however fast the machine is.
_KILLABLE_SWEEP = textwrap.dedent("""
    import pathlib, sys, time
    from triton_workbench.autotune import tune
    from tiny_spec import SPEC
    stored = []
    def wait_after_three(trial):
        stored.append(trial)
        if len(stored) == 3:
            pathlib.Path(sys.argv[1]).touch()
            time.sleep(600)
    tune(SPEC, {"n": 37, "dtype": "fp32"}, strategy="exhaustive", budget=8, progress=False, on_trial=wait_after_three)
""")


def test_sweep_killed_with_sigkill_resumes_without_loss_or_duplicates(tmp_path):
    from tiny_spec import SPEC

    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    marker = tmp_path / "three-trials-stored"
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE_SWEEP, str(marker)], env=environment)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not marker.exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    db = TuningDatabase()
    before = db.trials()
    assert marker.exists() and len(before) == 3, "the sweep should have been killed after its third trial"
    runs = db.runs()  # killed, it could not say so: its process is gone, so it reads as interrupted
    assert runs["status"].tolist() == ["interrupted"] and "ended without finishing" in runs["meta"][0]["reason"]

    trials = tune(SPEC, {"n": 37, "dtype": "fp32"}, strategy="exhaustive", budget=8, progress=False)
    assert len(trials) == 8 and trials["config"].is_unique
    kept = trials.set_index("trial_id").loc[before["trial_id"]]
    assert kept["started_at"].tolist() == before["started_at"].tolist()  # earlier trials untouched
    by_status = trials.groupby("status")["config"].apply(lambda c: sorted(json.loads(x)["BLOCK"] for x in c)).to_dict()
    assert by_status["wrong"] == [16, 32, 64] and by_status["ok"] == [16, 32, 64]  # BROKEN=1: wrong, never chosen
    assert by_status["runtime_error"] == [24, 24]  # not a power of 2
    assert json.loads(TuningDatabase().best_configs("tiny_scale")["config"][0])["BROKEN"] == 0
    assert TuningDatabase().died_running(TuningKey.of(SPEC, {"n": 37, "dtype": "fp32"})) == {}


def test_export_import_round_trip_and_validation(tmp_path, capsys):
    problem = _gemm_problem()
    config = GEMM_SPEC.default_config(problem)
    source = TuningDatabase(tmp_path / "source.db")
    source.set_best(TuningKey.of(GEMM_SPEC, problem), config, "time", 1.25, 1.25, None)
    exported = tmp_path / "best.json"
    assert main(["export", "-o", str(exported), "--db", str(source.path)]) == 0
    document = json.loads(exported.read_text())
    assert document["configs"][0]["config"] == config and document["configs"][0]["problem"] == problem

    assert main(["import", str(exported)]) == 0
    assert "imported 1 best configs" in capsys.readouterr().out
    tuned.clear_cache()
    assert tuned.config_for(GEMM_SPEC, problem) == config
    assert TuningDatabase().best_configs()["value"].tolist() == [1.25]

    invalid = next(c for c in _all_gemm_configs() if not GEMM_SPEC.is_valid(c, problem))
    bad_entries = {
        "unknown kernel 'nope'": {"kernel": "nope"},
        "must have exactly the parameters": {"config": {k: v for k, v in config.items() if k != "BLOCK_M"}},
        "is not a candidate": {"config": {**config, "BLOCK_M": 3}},
        "is invalid for gemm": {"config": invalid},
    }
    target = tmp_path / "target.db"
    for message, change in bad_entries.items():
        broken = {**document, "configs": [document["configs"][0], {**document["configs"][0], **change}]}
        exported.write_text(json.dumps(broken))
        assert main(["import", str(exported), "--db", str(target)]) == 2
        error = capsys.readouterr().err
        assert message in error and "configs[1]" in error and str(exported) in error
    assert TuningDatabase(target).best_configs().empty  # one bad entry rejects the whole file
    exported.write_text("{not json")
    assert main(["import", str(exported), "--db", str(target)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    exported.write_text(json.dumps({"format": "something else"}))
    assert main(["import", str(exported), "--db", str(target)]) == 2


def _all_gemm_configs():
    import itertools

    names = list(GEMM_SPEC.params)
    for values in itertools.product(*GEMM_SPEC.params.values()):
        yield dict(zip(names, values))


def test_the_db_option_is_also_where_the_kernels_look_their_tuned_configs_up(tmp_path):
    from triton_workbench.autotune import Space

    problem = _gemm_problem()
    default = GEMM_SPEC.default_config(problem)
    config = next(c for c in Space.from_spec(GEMM_SPEC, problem) if c != default)
    elsewhere = TuningDatabase(tmp_path / "elsewhere.db")
    elsewhere.set_best(TuningKey.of(GEMM_SPEC, problem), config, "time", 1.0, 1.0, None)
    assert main(["export", "-o", str(tmp_path / "best.json"), "--db", str(elsewhere.path)]) == 0
    tuned.clear_cache()
    assert tuned.config_for(GEMM_SPEC, problem) == config


def test_damaged_database_and_bad_arguments_are_clear_errors(tmp_path, capsys):
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"\x00garbage" * 512)
    assert main(["export", "-o", str(tmp_path / "x.json"), "--db", str(damaged)]) == 2
    assert str(damaged) in capsys.readouterr().err
    with pytest.raises(DatabaseFileError):
        tune(GEMM_SPEC, _gemm_problem(), db=damaged, budget=1, compile_ahead=False, progress=False)
    for arguments, message in (
        (["tune", "gemm", "--shape", "4,4"], "needs 3 positive sizes"),
        (["tune", "nope"], "unknown kernel 'nope'"),
        (["tune", "gemm", "--objective", "energy"], "needs --profile"),
        (["tune", "gemm", "--problem", "[1]"], "JSON object"),
    ):
        assert main(arguments) == 2
        assert message in capsys.readouterr().err


def test_bench_says_it_needs_a_gpu_and_its_measuring_path_stores_baselines(capsys):
    from tiny_spec import SPEC
    from triton_workbench.workbench.commands import bench

    assert main(["bench", "gemm", "--shapes", "64,64,64"]) == 0
    output = capsys.readouterr().out
    if kernels.runtime.INTERPRETER:
        assert "needs a GPU" in output and TuningDatabase().runs().empty
    else:
        assert "vs torch" in output and "64,64,64" in output
    bench.bench(SPEC, [{"n": 37, "dtype": "fp32"}, {"n": 100, "dtype": "fp32"}], None)  # the GPU path, also here
    stored = TuningDatabase().read("baselines").query("kernel == 'tiny_scale'")
    assert len(stored) == 2 and (stored["time_ms"] > 0).all()
    assert stored["ratio"].tolist() == pytest.approx((stored["baseline_time_ms"] / stored["time_ms"]).tolist())
    assert not any(math.isnan(v) for v in stored["baseline_time_ms"])


def test_profile_without_nvml_an_energy_objective_is_refused(capsys):
    from triton_workbench.profiler import NvmlSampler

    if NvmlSampler().available:
        pytest.skip("NVML is present here: the no-NVML message is for machines without it")
    assert main(["tune", "gemm", "--objective", "edp", "--profile", "--shape", "4,4,4"]) == 2
    assert "needs NVML on a GPU" in capsys.readouterr().err


def test_profile_stores_energy_per_trial_and_the_power_trace_beside_the_trials(monkeypatch, capsys):
    # profiler and autotune joined by the command: a fake GPU drawing 120 W, energy as the objective
    from fake_pynvml import FakeGpu, make_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([FakeGpu(power_w=120.0)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["tune", "gemm", "--shape", "8,8,8", "--budget", "1", "--profile", "--objective", "energy",
                 "--no-compile-ahead"]) == 0
    trials = TuningDatabase().trials()
    assert len(trials) == 1 and trials["status"].iloc[0] == "ok"
    assert trials["energy_j_per_call"].iloc[0] > 0 and trials["avg_power_w"].iloc[0] == pytest.approx(120.0, rel=0.05)
    run_id = int(trials["run_id"].iloc[0])
    assert len(TuningDatabase().read("samples", run_id)) > 10 and len(TuningDatabase().read("windows", run_id)) >= 1
    assert "J/call" in capsys.readouterr().out
