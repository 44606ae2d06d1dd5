"""A sweep over block sizes x power limits x SM clocks on the fake GPU (tests/fake_workload.py): for each
objective it must find what the model says is optimal, flag power-capped trials, and leave the GPU as it was."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import Future

import pytest

from fake_pynvml import FakeClock, FakeGpu, make_pynvml
from fake_workload import Workload, best, clock_timer, workload_spec
from triton_workbench.autotune import tune
from triton_workbench.autotune.objectives import Objective
from triton_workbench.autotune.pipeline import CompilePool
from triton_workbench.autotune.results import TuningDatabase
from triton_workbench.profiler import NvmlSampler, energy_meter
from triton_workbench.profiler.device_settings import DeviceKnobs

PROBLEM = {"n": 64, "dtype": "fp32"}
COSTS = {  # the model's own ranking of (seconds, joules, watts) per objective
    "time": lambda s, j, w: s,
    "energy": lambda s, j, w: j,
    "edp": lambda s, j, w: s * j,
    "time:power<=300": lambda s, j, w: s if w <= 300 else math.inf,
}


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    """Run one exhaustive sweep (measured once; later objectives reuse the stored trials)."""
    clock = FakeClock()
    gpu = FakeGpu(clock=clock)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    model = Workload(gpu, clock)
    spec, db = workload_spec(model), TuningDatabase(tmp_path / "knobs.db")
    sampler = NvmlSampler(clock=clock, sleep=clock.sleep)
    meter = energy_meter(sampler, min_window_s=0.05, idle_s=0.0, warmup_s=0.0)

    def run(objective: str, with_knobs: bool = True, compile_ahead=False):
        """(trials, knobs) of a sweep with the device knobs; without them, (trials, None)."""
        with DeviceKnobs(power_limits=4 if with_knobs else 0, sm_clocks=3 if with_knobs else 0,
                         record_dir=tmp_path / "records") as knobs:  # fmt: skip
            trials = tune(spec, PROBLEM, strategy="exhaustive", budget=100, db=db, objective=objective,
                          energy_meter=meter, compile_ahead=compile_ahead, progress=False,
                          device_knobs=knobs if with_knobs else None, timer=clock_timer(clock))  # fmt: skip
        return trials, knobs if with_knobs else None

    return run, model, gpu, db, spec


def optimal(model: Workload, knobs: DeviceKnobs, cost) -> set[tuple]:
    """Every (block, limit, clock) whose model cost is the lowest (ties included)."""
    blocks, limits, clocks = sorted(model.shapes), knobs.params["power_limit_w"], knobs.params["sm_clock_mhz"]
    value = lambda b, l, c: cost(*_seconds_joules_watts(model, b, l, c))  # noqa: E731
    lowest = value(*best(model, blocks, limits, clocks, cost))
    return {(b, l, c) for b in blocks for l in limits for c in clocks if value(b, l, c) <= lowest * (1 + 1e-6)}


def _seconds_joules_watts(model, block, limit_w, clock):
    seconds, watts = model.predict(block, limit_w, model.top_mhz if clock is None else clock)
    return seconds, seconds * watts, watts


def winner(trials, objective: str) -> tuple:
    config = json.loads(trials.loc[Objective.parse(objective).values(trials).idxmin(), "config"])
    return config["BLOCK"], config["power_limit_w"], config["sm_clock_mhz"]


def test_sweep_finds_the_models_optimum_for_every_objective(sweep):
    run, model, gpu, db, spec = sweep
    trials, knobs = run("time")
    assert len(trials) == 3 * 4 * 4 and (trials["status"] == "ok").all()
    assert gpu.settings == gpu.default_settings()  # restored after the sweep
    # measured time and power are the model's, through the real timing and energy paths
    row = trials.iloc[0]
    config = json.loads(row["config"])
    seconds, joules, watts = _seconds_joules_watts(model, config["BLOCK"], config["power_limit_w"], config["sm_clock_mhz"])
    assert row["time_ms"] == pytest.approx(seconds * 1e3) and row["avg_power_w"] == pytest.approx(watts, rel=1e-4)
    found = {}
    for objective, cost in COSTS.items():
        trials, knobs = run(objective)  # nothing measured again: the same 48 trials
        assert len(trials) == 48
        found[objective] = winner(trials, objective)
        assert found[objective] in optimal(model, knobs, cost), objective
        stored = json.loads(db.best_configs("fake_workload")["config"].iloc[0])
        assert stored == {"BLOCK": found[objective][0]}  # the kernel's part: what a launch can use
    fastest = min(_seconds_joules_watts(model, *k)[0] for k in optimal(model, knobs, COSTS["time"]))
    slack = lambda s, j, w: j if s <= 1.1 * fastest else math.inf  # noqa: E731
    trials, knobs = run("energy:time<=10%")
    assert winner(trials, "energy:time<=10%") in optimal(model, knobs, slack)
    assert json.loads(db.best_configs("fake_workload")["config"].iloc[0])["BLOCK"] == winner(trials, "energy:time<=10%")[0]
    # the objectives disagree, so finding each one's optimum means something
    assert len({found["time"], found["energy"], found["edp"], found["time:power<=300"]}) == 4


def test_power_capped_trials_are_flagged_with_their_reasons(sweep):
    run, model, gpu, db, spec = sweep
    trials, _ = run("energy")
    configs = trials["config"].map(json.loads)
    capped = configs.map(lambda c: c["BLOCK"] == 64 and c["power_limit_w"] == 200 and c["sm_clock_mhz"] != 855)
    assert (trials.loc[capped, "throttle_reasons"] == 0x4).all() and trials.loc[capped, "throttled"].all()
    free = configs.map(lambda c: c["BLOCK"] == 64 and c["power_limit_w"] == 700 and c["sm_clock_mhz"] == 855)
    assert (trials.loc[free, "throttle_reasons"] == 0).all()


def test_a_setting_the_gpu_refuses_mid_sweep_is_a_failed_trial(sweep):
    run, model, gpu, db, spec = sweep
    original = gpu.change

    def change(setting, value):
        if setting == "power_limit" and value == 367_000:
            from fake_pynvml import NVMLError_NoPermission
            raise NVMLError_NoPermission()
        original(setting, value)

    gpu.change = change
    trials, _ = run("time")
    refused = trials["config"].map(lambda c: json.loads(c)["power_limit_w"] == 367)
    assert (trials.loc[refused, "status"] == "runtime_error").all() and (trials.loc[~refused, "status"] == "ok").all()
    assert gpu.settings == gpu.default_settings()


def test_report_pareto_front_spans_kernel_and_device_parameters(sweep):
    from triton_workbench.reports.build import build_sections
    from triton_workbench.reports.tuning import pareto_table

    run, model, gpu, db, spec = sweep
    trials, _ = run("edp")
    front = pareto_table(trials)
    assert front["time (ms)"].is_monotonic_increasing and front["energy/call (J)"].is_monotonic_decreasing
    assert set(front["kernel parameters"]) <= {"BLOCK=32", "BLOCK=64", "BLOCK=128"}
    assert front["device settings"].str.contains("power limit .* W, SM clock", regex=True).all()
    assert front["device settings"].nunique() > 1 and front["kernel parameters"].nunique() > 1  # both kinds move
    assert front["time (ms)"].iloc[0] == pytest.approx(trials["time_ms"].min())
    assert set(front["throttled"]) == {"no", "power"}  # held at a power cap on purpose: said so, not plain "yes"
    sections, _ = build_sections(db)
    assert "The Pareto front, kernel parameters and device settings apart" in str([vars(s) for s in sections])


def stored_best(db: TuningDatabase):
    row = db.best_configs("fake_workload").iloc[0]
    return json.loads(row["config"]), row["run_id"]


def test_a_plain_sweep_after_a_knob_sweep_measures_its_own_configs(sweep):
    run, model, gpu, db, spec = sweep
    run("time")
    plain, _ = run("time", with_knobs=False)
    assert len(plain) == 3 and plain.attrs["run_id"] is not None  # measured, not taken from the knob trials
    assert all(set(json.loads(c)) == {"BLOCK"} for c in plain["config"])
    config, run_id = stored_best(db)
    assert config == {"BLOCK": 64} and run_id == plain.attrs["run_id"]


def test_a_knob_sweep_after_a_plain_sweep_ranks_only_its_own_trials(sweep):
    run, model, gpu, db, spec = sweep
    plain, _ = run("time", with_knobs=False)
    trials, _ = run("time")
    assert len(trials) == 48 and all("power_limit_w" in json.loads(c) for c in trials["config"])
    # block 64 at the GPU's own settings ties with the plain sweep's block 64; the winner is a knob trial
    assert stored_best(db)[1] == trials.attrs["run_id"]


def test_each_kernel_config_is_compiled_once_whatever_device_settings_run_it(sweep, monkeypatch):
    run, model, gpu, db, spec = sweep

    class CountingPool(CompilePool):
        def __init__(self):
            self.workers, self.submitted = 4, []

        def submit(self, spec, problem, config):
            self.submitted.append(config)
            future = Future()
            future.set_result({"ok": True})
            return future

    monkeypatch.setattr(CompilePool, "supports", staticmethod(lambda spec: True))
    pool = CountingPool()
    trials, _ = run("time", compile_ahead=pool)
    assert len(trials) == 48 and (trials["status"] == "ok").all()
    assert sorted(config["BLOCK"] for config in pool.submitted) == [32, 64, 128]
