"""The training power-limit optimiser: pure logic against the fake workload's model, then wired through
the training's energy windows to a fake GPU that enforces the limit it is given."""

from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import replace

import pytest
import torch

from fake_pynvml import FakeClock, FakeGpu, make_pynvml
from fake_workload import Workload
from triton_workbench import profiler
from triton_workbench.autotune.distributed import Distributed
from triton_workbench.database import SeriesTable
from triton_workbench.kernels.errors import UsageError
from triton_workbench.profiler.device_settings import DeviceKnobs
from triton_workbench.profiler.power_limit_optimizer import PowerLimitOptimizer, step_cost
from triton_workbench.workbench import training
from triton_workbench.workbench.train_config import TrainConfig, power_limit_eta
from triton_workbench.workbench.train_energy import EnergyWindows

LIMITS = [200, 367, 533, 700]
CALLS_PER_STEP = 40


def model_step(model: Workload, limit_w: float) -> tuple[float, float]:
    """(seconds, joules) of one training step of CALLS_PER_STEP block-64 calls at `limit_w`, by the model."""
    seconds, watts = model.predict(64, limit_w, model.top_mhz)
    return CALLS_PER_STEP * seconds, CALLS_PER_STEP * seconds * watts


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_choice_is_the_limit_with_the_lowest_cost_by_the_model(eta):
    model = Workload(FakeGpu(clock=FakeClock()), FakeClock())
    optimizer = PowerLimitOptimizer(LIMITS, eta=eta, warmup_steps=2, steps_per_limit=3, settle_steps=1)
    asked = []
    for step in range(2 + 4 * len(LIMITS)):
        limit_w = optimizer.limit_for_step()
        asked.append(limit_w)
        settling = step >= 2 and (step - 2) % 4 == 0  # the first step at each limit is not the limit's doing
        choice = optimizer.observe(*((60.0, 1e6) if settling else model_step(model, limit_w)))
    assert asked == [700, 700] + [w for w in (700, 533, 367, 200) for _ in range(4)]  # warm-up, then high to low
    expected = min(LIMITS, key=lambda w: step_cost(eta, 700, *model_step(model, w)))
    assert choice is not None and choice.power_limit_w == expected
    assert [p.steps for p in choice.profile] == [3, 3, 3, 3]
    assert min(choice.profile, key=lambda p: p.cost).power_limit_w == expected
    assert optimizer.limit_for_step() == expected and optimizer.observe(1.0, 1.0) is None  # held from now on


def test_the_extremes_trade_time_against_energy():
    model = Workload(FakeGpu(clock=FakeClock()), FakeClock())
    chosen = {}
    for eta in (0.0, 1.0):
        optimizer = PowerLimitOptimizer(LIMITS, eta=eta, warmup_steps=0, steps_per_limit=1, settle_steps=0)
        while optimizer.choice is None:
            optimizer.observe(*model_step(model, optimizer.limit_for_step()))
        chosen[eta] = optimizer.choice.power_limit_w
    assert chosen == {0.0: 700, 1.0: 200}  # fastest at the top limit, least energy at the bottom one


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="eta"):
        PowerLimitOptimizer(LIMITS, eta=1.5)
    with pytest.raises(ValueError, match="limits_w"):
        PowerLimitOptimizer([])
    with pytest.raises(ValueError, match="steps_per_limit"):
        PowerLimitOptimizer(LIMITS, steps_per_limit=0)
    with pytest.raises(Exception, match="--power-limit"):
        TrainConfig(out_dir=".", power_limit="auto:2").validate()
    with pytest.raises(Exception, match="--power-limit"):
        TrainConfig(out_dir=".", power_limit="300").validate()
    assert power_limit_eta("auto") == 0.5 and power_limit_eta("auto:0.8") == 0.8 and power_limit_eta(None) is None


def test_power_limit_is_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setattr(training, "init_distributed", lambda kernels: Distributed(rank=0, world_size=2))
    with pytest.raises(UsageError, match="--power-limit sets this process's GPU only"):
        training.train(TrainConfig(out_dir=str(tmp_path), power_limit="auto"))


class Recorder:
    def __init__(self):
        self.tables = {}

    def append(self, table, frame):
        self.tables[table] = frame


@pytest.fixture
def gpu(monkeypatch) -> tuple[FakeGpu, FakeClock]:
    """A fake GPU on a fake clock, which the training's sampler reads too (no real waiting)."""
    clock = FakeClock()
    gpu = FakeGpu(clock=clock)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(profiler, "NvmlSampler", functools.partial(profiler.NvmlSampler, clock=clock, sleep=clock.sleep))
    return gpu, clock


def run_step(windows: EnergyWindows, step: int, model: Workload, gpu: FakeGpu, clock: FakeClock) -> float:
    """One training step by the model at the limit the fake GPU enforces now; returns that limit."""
    with windows.step(step):
        limit_w = gpu.power_limit_w
        seconds, joules = model_step(model, limit_w)
        gpu.set_power(joules / seconds)
        clock.advance(seconds)
        gpu.set_power(60.0)
    return limit_w


@pytest.mark.parametrize("eta, expected_w", [(0.0, 700), (0.8, 200)])
def test_training_windows_drive_the_optimiser_on_a_gpu_that_enforces_the_limit(gpu, eta, expected_w):
    gpu, clock = gpu
    model = Workload(gpu, clock)
    windows = EnergyWindows(True, torch.device("cpu"), power_limit_eta=eta)
    limits_seen = [run_step(windows, step, model, gpu, clock) for step in range(1, 2 + 4 * 4 + 3)]
    recorder = Recorder()
    windows.close(recorder)
    profile = recorder.tables[SeriesTable.POWER_LIMIT_PROFILE]
    assert sorted(profile["power_limit_w"]) == LIMITS and profile["chosen"].sum() == 1
    chosen = profile.loc[profile["chosen"], "power_limit_w"].item()
    assert chosen == profile.loc[profile["cost"].idxmin(), "power_limit_w"] == expected_w
    assert profile.loc[profile["chosen"], "time_s"].item() == pytest.approx(model_step(model, expected_w)[0])
    assert limits_seen[-2:] == [expected_w] * 2  # held after choosing (step 18 was the last profiled)
    assert gpu.settings == gpu.default_settings()  # the GPU's own limit is back


def test_a_step_without_energy_abandons_the_optimiser_and_training_goes_on(gpu, monkeypatch, capsys):
    gpu, clock = gpu
    model = Workload(gpu, clock)
    windows = EnergyWindows(True, torch.device("cpu"), power_limit_eta=0.5)
    for step in range(1, 4):  # warm-up and the first settling step
        run_step(windows, step, model, gpu, clock)
    real = windows.sampler.window_stats
    monkeypatch.setattr(windows.sampler, "window_stats", lambda record: replace(real(record), energy_j=math.nan))
    run_step(windows, 4, model, gpu, clock)  # a profiled step: NVML gave no energy
    assert "not choosing a limit" in capsys.readouterr().out and windows.optimizer is None
    assert gpu.settings == gpu.default_settings()  # put back at once, not at the end of the run
    assert run_step(windows, 5, model, gpu, clock) == 700  # training goes on at the GPU's own limit
    recorder = Recorder()
    windows.close(recorder)
    assert SeriesTable.POWER_LIMIT_PROFILE not in recorder.tables and SeriesTable.WINDOWS in recorder.tables


def test_a_failure_to_take_the_knobs_stops_the_sampler(gpu, monkeypatch):
    def busy(self):
        raise RuntimeError("another process holds the settings")

    monkeypatch.setattr(DeviceKnobs, "__enter__", busy)
    with pytest.raises(RuntimeError, match="another process"):
        EnergyWindows(True, torch.device("cpu"), power_limit_eta=0.5)
    assert not any(thread.name == "nvml-sampler" for thread in threading.enumerate())
