"""The training power-limit optimiser: pure logic against the fake workload's model, then wired through
the training's energy windows to a fake GPU that enforces the limit it is given."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from fake_pynvml import FakeClock, FakeGpu, make_pynvml
from fake_workload import Workload
from triton_workbench.database import SeriesTable
from triton_workbench.profiler.power_limit_optimizer import PowerLimitOptimizer, step_cost
from triton_workbench.workbench.train_config import TrainConfig
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
    optimizer = PowerLimitOptimizer(LIMITS, eta=eta, warmup_steps=2, steps_per_limit=3)
    asked = []
    for _ in range(2 + 3 * len(LIMITS)):
        limit_w = optimizer.limit_for_step()
        asked.append(limit_w)
        choice = optimizer.observe(*model_step(model, limit_w))
    assert asked == [700, 700] + [w for w in (700, 533, 367, 200) for _ in range(3)]  # warm-up, then high to low
    expected = min(LIMITS, key=lambda w: step_cost(eta, 700, *model_step(model, w)))
    assert choice is not None and choice.power_limit_w == expected
    assert [p.steps for p in choice.profile] == [3, 3, 3, 3]
    assert min(choice.profile, key=lambda p: p.cost).power_limit_w == expected
    assert optimizer.limit_for_step() == expected and optimizer.observe(1.0, 1.0) is None  # held from now on


def test_the_extremes_trade_time_against_energy():
    model = Workload(FakeGpu(clock=FakeClock()), FakeClock())
    chosen = {}
    for eta in (0.0, 1.0):
        optimizer = PowerLimitOptimizer(LIMITS, eta=eta, warmup_steps=0, steps_per_limit=1)
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
    assert TrainConfig(out_dir=".", power_limit="auto").power_limit_eta == 0.5


class Recorder:
    def __init__(self):
        self.tables = {}

    def append(self, table, frame):
        self.tables[table] = frame


@pytest.mark.parametrize("eta, expected_w", [(0.0, 700), (0.8, 200)])
def test_training_windows_drive_the_optimiser_on_a_gpu_that_enforces_the_limit(monkeypatch, eta, expected_w):
    gpu = FakeGpu()  # real clock: a step sleeps for the model's time, drawing the model's power meanwhile
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    model = Workload(gpu, FakeClock())
    windows = EnergyWindows(True, torch.device("cpu"), power_limit_eta=eta)
    limits_seen = []
    for step in range(1, 2 + 3 * 4 + 3):
        with windows.step(step):
            limits_seen.append(gpu.power_limit_w)  # what the fake GPU enforces during this step
            seconds, joules = model_step(model, gpu.power_limit_w)
            gpu.set_power(joules / seconds)
            time.sleep(seconds)
            gpu.set_power(60.0)
    recorder = Recorder()
    windows.close(recorder)
    profile = recorder.tables[SeriesTable.POWER_LIMIT_PROFILE]
    assert sorted(profile["power_limit_w"]) == LIMITS and profile["chosen"].sum() == 1
    chosen = profile.loc[profile["chosen"], "power_limit_w"].item()
    assert chosen == profile.loc[profile["cost"].idxmin(), "power_limit_w"] == expected_w
    assert limits_seen[-2:] == [expected_w] * 2  # held after choosing (step 14 was the last profiled)
    assert gpu.settings == gpu.default_settings()  # the GPU's own limit is back
