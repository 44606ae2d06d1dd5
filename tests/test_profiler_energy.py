"""Energy per call (measure_energy) and cool-down, on a fake GPU with a fake clock: exact and instant."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest

from fake_pynvml import FakeClock, FakeGpu, make_pynvml
from triton_workbench.profiler import (ENERGY_RESULT_KEYS, EnergyStats, NvmlSampler, cool_down, energy_meter,
                                      measure_energy)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def setup(monkeypatch, clock: FakeClock, **gpu_options) -> tuple[FakeGpu, NvmlSampler]:
    gpu = FakeGpu(clock=clock, **gpu_options)
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return gpu, NvmlSampler(clock=clock, sleep=clock.sleep)


class Kernel:
    """A fake kernel: while it runs the fake GPU draws busy_w; each call takes seconds_per_call."""

    def __init__(self, gpu: FakeGpu, clock: FakeClock, busy_w: float, seconds_per_call: float):
        self.gpu, self.clock, self.busy_w, self.seconds_per_call = gpu, clock, busy_w, seconds_per_call
        self.calls = self.syncs = 0

    def __call__(self) -> None:
        if self.gpu.power_at(self.clock.now) != self.busy_w:
            self.gpu.set_power(self.busy_w)
        self.clock.advance(self.seconds_per_call)
        self.calls += 1

    def synchronize(self) -> None:
        self.syncs += 1


def test_energy_per_call_idle_power_and_temperatures(monkeypatch, clock):
    start = clock.now
    gpu, sampler = setup(monkeypatch, clock, power_w=60.0, temp_c=lambda t: 40 + (t - start))
    kernel = Kernel(gpu, clock, busy_w=300.0, seconds_per_call=0.001)
    result = measure_energy(kernel, sampler, "gemm", min_window_s=1.0, idle_s=0.5, warmup_s=0.1,
                            synchronize=kernel.synchronize)  # fmt: skip
    assert isinstance(result, EnergyStats) and [f.name for f in dataclasses.fields(result)] == list(ENERGY_RESULT_KEYS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.calls = 0
    assert result.energy_j_per_call == pytest.approx(300.0 * 0.001, rel=1e-6)
    assert result.avg_power_w == pytest.approx(300.0, rel=1e-6) and result.peak_power_w == 300.0
    assert result.idle_power_w == pytest.approx(60.0, rel=1e-6)
    assert result.window_s >= 1.0 and result.calls == pytest.approx(result.window_s / 0.001)
    assert result.energy_j == pytest.approx(result.energy_j_per_call * result.calls)
    # idle 0.5 s, warm-up 0.1 s, then the window: temperatures at its edges, not somewhere else
    assert result.start_temp_c == round(40 + 0.6) and result.end_temp_c == round(40 + 0.6 + result.window_s)
    assert result.mean_sm_clock_mhz == 1755.0 and result.throttled is False
    warmup_calls = kernel.calls - result.calls
    assert warmup_calls == pytest.approx(100, abs=1)
    batches = kernel.syncs - warmup_calls  # warm-up synchronises every call, the trial every ~50 ms batch
    assert batches == pytest.approx(result.calls / 50, rel=0.05)
    names = sampler.windows()["name"].tolist()
    assert names == ["gemm/idle", "gemm"]


def test_window_is_at_least_min_window_and_slow_calls_still_count(monkeypatch, clock):
    gpu, sampler = setup(monkeypatch, clock)
    kernel = Kernel(gpu, clock, busy_w=250.0, seconds_per_call=0.3)  # slower than a batch
    result = measure_energy(kernel, sampler, "slow", min_window_s=1.0, idle_s=0.0, warmup_s=0.0)
    assert result.calls == 4 and result.window_s == pytest.approx(1.2)
    assert result.energy_j_per_call == pytest.approx(250.0 * 0.3, rel=1e-6)


def test_cooldown_waits_fixed_time_then_until_near_idle_temperature(monkeypatch, clock):
    start = clock.now
    gpu, sampler = setup(monkeypatch, clock, temp_c=lambda t: max(45.0, 80.0 - 5.0 * (t - start)))
    kernel = Kernel(gpu, clock, busy_w=200.0, seconds_per_call=0.01)
    result = measure_energy(kernel, sampler, "k", min_window_s=0.5, idle_s=0.2, cooldown_s=2.0, cooldown_temp_c=50.0)
    idle = sampler.windows().set_index("name").loc["k/idle"]
    assert idle["start_s"] == pytest.approx(6.0, abs=0.11)  # 80 - 5 t <= 50 at t = 6 s (polled every 0.1 s)
    assert result.start_temp_c <= 50.0


def test_cool_down_gives_up_after_timeout_and_copes_without_temperature(monkeypatch, clock):
    gpu, sampler = setup(monkeypatch, clock, temp_c=lambda t: 90.0)
    assert cool_down(sampler, target_temp_c=50.0, timeout_s=3.0) == 90.0
    assert sampler.now_s() == pytest.approx(3.0, abs=0.11)
    gpu.unsupported.add("gpu_temp")
    assert math.isnan(cool_down(NvmlSampler(clock=clock, sleep=clock.sleep), 50.0))


@pytest.mark.parametrize(
    "options",
    [{"min_window_s": 0}, {"min_window_s": -1}, {"idle_s": -0.1}, {"batch_s": 0}, {"cooldown_s": "long"}],
)
def test_bad_arguments_are_rejected(monkeypatch, clock, options):
    gpu, sampler = setup(monkeypatch, clock)
    with pytest.raises(ValueError, match=next(iter(options))):
        measure_energy(lambda: None, sampler, "x", **options)
    with pytest.raises(TypeError):
        measure_energy("not callable", sampler, "x")



def test_energy_meter_binds_sampler_and_options(monkeypatch, clock):
    gpu, sampler = setup(monkeypatch, clock, power_w=50.0)
    kernel = Kernel(gpu, clock, busy_w=150.0, seconds_per_call=0.002)
    meter = energy_meter(sampler, min_window_s=0.5, idle_s=0.1, synchronize=kernel.synchronize)
    result = meter("conv", kernel)
    assert result.energy_j_per_call == pytest.approx(150.0 * 0.002, rel=1e-6) and result.window_s < 0.6
    assert kernel.syncs > 0 and sampler.windows()["name"].tolist() == ["conv/idle", "conv"]
    with pytest.raises(TypeError, match="min_window"):
        energy_meter(sampler, min_window=1.0)


def test_thermally_throttled_trial_is_flagged_and_remeasured_after_cooling(monkeypatch, clock):
    start = clock.now
    hot_until = start + 1.2  # hot and throttled by heat (SW thermal, 0x20) for the first 1.2 s only
    gpu, sampler = setup(monkeypatch, clock, temp_c=lambda t: 90.0 if t < hot_until else 45.0,
                         clock_events=lambda t: 0x20 if t < hot_until else 0)  # fmt: skip
    kernel = Kernel(gpu, clock, busy_w=300.0, seconds_per_call=0.001)
    plain = energy_meter(sampler, min_window_s=0.5, idle_s=0.0, warmup_s=0.0)("hot", kernel)
    assert plain.throttled and plain.throttle_reasons == 0x20 and not plain.remeasured
    assert clock.now < hot_until  # still hot: the next trial starts throttled
    result = energy_meter(sampler, remeasure_below_c=50, min_window_s=0.5, idle_s=0.0, warmup_s=0.0)("hot", kernel)
    assert result.remeasured and result.throttle_reasons == 0 and result.throttled is False
    assert result.start_temp_c == 45.0 and sampler.windows()["name"].tolist()[-1] == "hot (remeasured)"
    with pytest.raises(ValueError, match="remeasure_below_c"):
        energy_meter(sampler, remeasure_below_c="hot")
