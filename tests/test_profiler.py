"""The NVML sampler against a scripted fake GPU (fake clock: exact, no sleeps) and, where present, real NVML."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from triton_workbench.profiler import SAMPLE_COLUMNS, WINDOW_COLUMNS, NvmlSampler, measure_energy, window_stats
from triton_workbench.profiler.windows import value_at
from fake_pynvml import (
    NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_LIBRARY_NOT_FOUND, FakeClock, FakeGpu, NVMLError, NVMLError_NotSupported,
    make_pynvml,
)  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gpu(clock) -> FakeGpu:
    return FakeGpu(clock=clock, power_w=100.0)


def install(monkeypatch, *gpus: FakeGpu, **options):
    module = make_pynvml(list(gpus), **options)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return module


def make_sampler(clock: FakeClock, **options) -> NvmlSampler:
    return NvmlSampler(clock=clock, sleep=clock.sleep, **options)


def run_for(sampler: NvmlSampler, clock: FakeClock, seconds: float) -> None:
    """What the thread does, deterministically: advance interval_s, sample, until `seconds` passed."""
    for _ in range(round(seconds / sampler.interval_s)):
        clock.advance(sampler.interval_s)
        sampler.sample()


def test_fake_errors_are_real_nvml_error_subclasses():
    error = NVMLError(3)
    assert type(error) is NVMLError_NotSupported and isinstance(error, NVMLError) and error.value == 3
    assert NVMLError_NotSupported().value == 3


def test_window_energy_comes_from_the_counter(monkeypatch, clock, gpu):
    install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    run_for(sampler, clock, 0.5)
    gpu.set_power(300.0)
    with sampler.window("load"):
        run_for(sampler, clock, 1.0)
    gpu.set_power(100.0)
    run_for(sampler, clock, 0.25)
    frame, window = sampler.frame(), sampler.windows().iloc[0]
    assert list(frame.columns) == list(SAMPLE_COLUMNS) and (frame.dtypes == float).all()
    assert frame["energy_j"].iloc[0] == 0.0 and frame["time_s"].is_monotonic_increasing
    # energy_j counts from the first sample (at 0.01 s)
    assert frame["energy_j"].iloc[-1] == pytest.approx(100 * 0.49 + 300 * 1.0 + 100 * 0.25, abs=1e-3)
    assert list(sampler.windows().columns) == list(WINDOW_COLUMNS)
    assert window["duration_s"] == pytest.approx(1.0)
    assert window["energy_j"] == pytest.approx(300.0, abs=1e-3)
    assert window["avg_power_w"] == pytest.approx(300.0, abs=1e-3)
    assert window["peak_power_w"] == 300.0 and window["peak_gpu_temp_c"] == 40.0
    assert window["mean_sm_clock_mhz"] == 1755.0 and not window["throttled"]


def test_coarse_counter_is_interpolated_between_refreshes(monkeypatch, clock):
    gpu = FakeGpu(clock=clock, power_w=200.0, counter_period_s=0.1)
    install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    run_for(sampler, clock, 0.33)
    with sampler.window("steady"):
        run_for(sampler, clock, 1.27)
    run_for(sampler, clock, 0.2)
    # a steady 200 W: counter readings lag by < one refresh at both edges, so the error is < 2 * 200 W * 0.1 s
    energy_j = sampler.windows()["energy_j"].iloc[0]
    assert abs(energy_j - 200 * 1.27) < 2 * 200 * 0.1
    assert energy_j != pytest.approx(200 * 1.27, abs=1e-3)  # the fake really is coarse


def test_missing_counter_falls_back_to_the_integral_of_power(monkeypatch, clock, gpu, caplog):
    gpu.unsupported.add("energy")
    install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    with caplog.at_level(logging.INFO, logger="triton_workbench.profiler"):
        with sampler.window("step"):
            run_for(sampler, clock, 0.5)
            gpu.set_power(200.0, at_s=clock.now + 0.005)  # mid-interval: the trapezoids blur one interval
            run_for(sampler, clock, 0.5)
    window = sampler.windows().iloc[0]
    assert sampler.frame()["energy_j"].isna().all()
    assert abs(window["energy_j"] - (100 * 0.5 + 200 * 0.5)) <= 100 * sampler.interval_s
    assert window["avg_power_w"] == pytest.approx(window["energy_j"] / window["duration_s"])
    assert window["peak_power_w"] == 200.0
    assert sum("energy_j" in r.message for r in caplog.records) == 1
    assert gpu.calls["energy"] == 1  # not supported: never asked again


def test_unsupported_fields_are_nan_and_noted_once(monkeypatch, clock, gpu, caplog):
    gpu.unsupported |= {"mem_temp", "util", "clock_events", "throttle_reasons"}
    install(monkeypatch, gpu)
    sampler = make_sampler(clock, slow_every=2)
    with caplog.at_level(logging.INFO, logger="triton_workbench.profiler"):
        with sampler.window("w"):
            run_for(sampler, clock, 0.2)
    frame = sampler.frame()
    for column in ("mem_temp_c", "gpu_util_pct", "clock_event_reasons"):
        assert frame[column].isna().all(), column
    for column in ("power_w", "energy_j", "gpu_temp_c", "sm_clock_mhz", "mem_clock_mhz", "mem_used_bytes"):
        assert frame[column].notna().all(), column
    assert frame["mem_used_bytes"].iloc[0] == 1 << 30
    notes = [r.message for r in caplog.records]
    for column in ("mem_temp_c", "gpu_util_pct", "clock_events", "clock_event_reasons"):
        assert sum(column + " " in note for note in notes) == 1, (column, notes)
    assert pd.isna(sampler.windows()["throttled"].iloc[0])  # unknown, not "not throttled"


@pytest.mark.parametrize("why", ["gpu_says_not_supported", "pynvml_too_old"])
def test_instant_power_falls_back_to_power_usage(monkeypatch, clock, gpu, why):
    module = install(monkeypatch, gpu)
    if why == "pynvml_too_old":
        del module.NVML_FI_DEV_POWER_INSTANT
    else:
        gpu.unsupported.add("power_instant")
    sampler = make_sampler(clock)
    run_for(sampler, clock, 0.1)
    assert (sampler.frame()["power_w"] == 100.0).all()
    assert gpu.calls.get("power_instant", 0) <= 1 and gpu.calls["power_usage"] == len(sampler.frame())


def test_a_field_constant_missing_from_pynvml_is_unsupported_up_front(monkeypatch, clock, gpu, caplog):
    module = install(monkeypatch, gpu)
    del module.NVML_FI_DEV_MEMORY_TEMP
    with caplog.at_level(logging.INFO, logger="triton_workbench.profiler"):
        sampler = make_sampler(clock)
        run_for(sampler, clock, 0.2)
    frame = sampler.frame()
    assert frame["mem_temp_c"].isna().all() and frame["gpu_temp_c"].notna().all()
    assert "mem_temp" not in gpu.calls
    assert sum("NVML_FI_DEV_MEMORY_TEMP" in r.message for r in caplog.records) == 1


def raising(error: Exception):
    """A pynvml function that raises `error`."""
    def read(*args):
        raise error

    return read


def test_an_attribute_error_in_a_reader_is_a_bug_not_unsupported(monkeypatch, clock, gpu):
    module = install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    module.nvmlDeviceGetClockInfo = raising(AttributeError("'FakeGpu' object has no attribute 'clocks'"))
    with pytest.raises(AttributeError, match="clocks"):
        sampler.sample(full=True)
    with pytest.raises(AttributeError):  # asked again: not taken for "unsupported"
        sampler.sample(full=True)


def test_readers_catch_nvml_errors_only(monkeypatch, clock, gpu):
    module = install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    module.nvmlDeviceGetUtilizationRates = raising(NVMLError(999))  # NVML failing once: that reading is NaN
    sampler.sample(full=True)
    assert math.isnan(sampler.latest("gpu_util_pct")) and sampler.latest("gpu_temp_c") == 40.0
    module.nvmlDeviceGetUtilizationRates = raising(KeyError("gpu"))
    with pytest.raises(KeyError):
        sampler.sample(full=True)


def test_slow_fields_are_read_every_nth_sample_and_forward_filled(monkeypatch, clock):
    start = clock.now
    gpu = FakeGpu(clock=clock, temp_c=lambda t: 40 + 100 * (t - start))  # +1 C every 10 ms
    install(monkeypatch, gpu)
    sampler = make_sampler(clock, slow_every=10)
    run_for(sampler, clock, 0.25)  # samples at 0.01 .. 0.25 s; reads at samples 0, 10, 20
    temps = sampler.frame()["gpu_temp_c"].to_numpy()
    assert gpu.calls["gpu_temp"] == 3
    assert (temps[:10] == 41).all() and (temps[10:20] == 51).all() and (temps[20:] == 61).all()
    with sampler.window("edge"):  # window edges read every field
        clock.advance(0.003)
    assert sampler.frame()["gpu_temp_c"].iloc[-1] == round(40 + 100 * 0.253)


def test_frame_from_a_sample_on_is_the_tail_of_the_whole_frame(monkeypatch, clock, gpu):
    install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    run_for(sampler, clock, 0.05)
    whole = sampler.frame()
    tail = sampler.frame(first=3)
    assert len(whole) == 5 and len(tail) == 2
    pd.testing.assert_frame_equal(tail, whole.iloc[3:])
    assert sampler.frame(first=5).empty and sampler.frame(first=9).empty
    with pytest.raises(ValueError, match="first"):
        sampler.frame(first=-1)


def test_nested_windows(monkeypatch, clock, gpu):
    start = clock.now
    gpu.temp_c = lambda t: 40 + 10 * (t - start)
    install(monkeypatch, gpu)
    sampler = make_sampler(clock)
    with sampler.window("outer"):
        run_for(sampler, clock, 0.5)
        gpu.set_power(300.0)
        with sampler.window("inner"):
            run_for(sampler, clock, 1.0)
        gpu.set_power(100.0)
        run_for(sampler, clock, 0.5)
    windows = sampler.windows().set_index("name")
    assert list(windows.index) == ["outer", "inner"]  # opening order
    assert windows.loc["outer", "energy_j"] == pytest.approx(100 * 1.0 + 300 * 1.0, abs=1e-3)
    assert windows.loc["inner", "energy_j"] == pytest.approx(300.0, abs=1e-3)
    assert windows.loc["outer", "duration_s"] == pytest.approx(2.0)
    assert windows.loc["outer", "peak_power_w"] == windows.loc["inner", "peak_power_w"] == 300.0
    assert windows.loc["inner", "peak_gpu_temp_c"] == round(40 + 10 * 1.5)
    assert windows.loc["outer", "peak_gpu_temp_c"] == round(40 + 10 * 2.0)


@pytest.mark.parametrize("events_api", [True, False], ids=["clock_events", "throttle_reasons_fallback"])
def test_throttled_only_for_power_or_thermal_reasons(monkeypatch, clock, gpu, events_api):
    start = clock.now
    gpu.clock_events = lambda t: 0x1 | (0x40 if 0.3 <= t - start < 0.4 else 0)  # idle always; HW thermal for 100 ms
    install(monkeypatch, gpu, clock_events_api=events_api)
    sampler = make_sampler(clock, slow_every=1)
    with sampler.window("calm"):
        run_for(sampler, clock, 0.25)
    with sampler.window("hot"):
        run_for(sampler, clock, 0.25)
    assert sampler.windows()["throttled"].tolist() == [False, True]
    assert ("clock_events" in gpu.calls) == events_api and ("throttle_reasons" in gpu.calls) != events_api


def test_windows_close_and_the_thread_stops_when_the_body_raises(monkeypatch):
    gpu = FakeGpu(power_w=150.0)  # real clock
    module = install(monkeypatch, gpu)
    with pytest.raises(RuntimeError, match="boom"):
        with NvmlSampler(interval_s=0.002) as sampler:
            with sampler.window("doomed"):
                time.sleep(0.05)
                deadline = time.monotonic() + 10  # a loaded machine may not schedule the sampler every 2 ms
                while len(sampler.frame()) < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
                raise RuntimeError("boom")
    assert not sampler._thread.is_alive()
    assert "nvml-sampler" not in [t.name for t in threading.enumerate()]
    assert module.state == {"initialised": 0, "shutdowns": 1}
    frame, window = sampler.frame(), sampler.windows().iloc[0]
    assert len(frame) >= 5 and frame["time_s"].is_monotonic_increasing
    assert window["name"] == "doomed" and window["duration_s"] >= 0.05
    # (the fake's energy is read on the real clock apart from the window's edges: a fraction of a percent off
    # on a loaded machine)
    assert window["avg_power_w"] == pytest.approx(150.0, rel=2e-2)
    count = len(frame)
    sampler.sample()
    assert len(sampler.frame()) == count  # stopped means stopped
    with pytest.raises(RuntimeError, match="already started"):
        sampler.start()


@pytest.mark.parametrize("case", ["no_pynvml", "no_library", "no_driver", "no_gpu", "not_visible"])
def test_without_nvml_nothing_breaks(monkeypatch, clock, case):
    reasons = {"no_pynvml": "pynvml", "no_library": "NVML could not start", "no_driver": "NVML could not start",
               "no_gpu": "no NVML device", "not_visible": "not visible"}  # fmt: skip
    if case == "no_pynvml":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        error = {"no_library": NVML_ERROR_LIBRARY_NOT_FOUND, "no_driver": NVML_ERROR_DRIVER_NOT_LOADED}.get(case)
        module = install(monkeypatch, *([] if case == "no_gpu" else [FakeGpu(clock=clock)]), init_error=error)
        if case == "not_visible":
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with make_sampler(clock) as sampler:
        with sampler.window("w"):
            clock.advance(0.5)
        result = measure_energy(lambda: clock.advance(0.01), sampler, "trial", min_window_s=0.2)
    assert not sampler.available and reasons[case] in sampler.reason
    if case not in ("no_pynvml", "no_library", "no_driver"):
        assert module.state["initialised"] == 0  # NVML released again
    frame, windows = sampler.frame(), sampler.windows()
    assert frame.empty and list(frame.columns) == list(SAMPLE_COLUMNS)
    assert windows["name"].tolist() == ["w", "trial"] and windows["duration_s"].iloc[0] == pytest.approx(0.5)
    assert windows[["energy_j", "avg_power_w", "peak_power_w", "peak_gpu_temp_c"]].isna().all().all()
    assert result.calls >= 20 and result.window_s >= 0.2
    assert math.isnan(result.energy_j_per_call) and math.isnan(result.idle_power_w)


@pytest.mark.parametrize("interval_s", [0, -1.0, "fast", True])
def test_bad_interval_is_rejected(interval_s):
    with pytest.raises(ValueError, match="interval_s"):
        NvmlSampler(interval_s=interval_s)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device and NVML")


def _busy_matmul(torch):
    x = torch.randn(2048, 2048, device="cuda")
    return lambda: torch.mm(x, x)


@pytest.mark.gpu
@needs_cuda
def test_real_gpu_energy_grows_and_power_is_within_the_board_limit():
    import pynvml
    import torch

    work = _busy_matmul(torch)
    with NvmlSampler(device=torch.cuda.current_device(), interval_s=0.01) as sampler:
        assert sampler.available, sampler.reason
        with sampler.window("matmul"):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                work()
                torch.cuda.synchronize()
        limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(sampler.device.handle) / 1000
    frame, window = sampler.frame(), sampler.windows().iloc[0]
    energy = frame["energy_j"].dropna()
    assert len(energy) > 50 and energy.iloc[-1] > energy.iloc[0] and energy.is_monotonic_increasing
    assert 0 < window["energy_j"] and 0 < window["avg_power_w"] <= 1.1 * limit_w
    assert frame["power_w"].dropna().between(0, 1.1 * limit_w).all()
    assert 0 < window["peak_gpu_temp_c"] < 110


@pytest.mark.gpu
@needs_cuda
def test_real_gpu_energy_per_call():
    import torch

    with NvmlSampler(device=torch.cuda.current_device()) as sampler:
        result = measure_energy(_busy_matmul(torch), sampler, "mm 2048", synchronize=torch.cuda.synchronize)
    assert result.window_s >= 1.0 and result.calls > 10
    assert 0 < result.idle_power_w < result.avg_power_w
    assert result.energy_j_per_call == pytest.approx(result.avg_power_w * result.window_s / result.calls)
    assert not math.isnan(result.start_temp_c) and not math.isnan(result.end_temp_c)


def test_window_arithmetic_on_a_stored_frame_interpolates_between_samples():
    frame = pd.DataFrame({
        "time_s": [0.0, 1.0, 2.0, 3.0], "power_w": [100.0, 100.0, 200.0, 300.0], "energy_j": [0.0, 100.0, 300.0, 600.0],
        "gpu_temp_c": [40.0, 41.0, 43.0, 47.0], "sm_clock_mhz": [1000.0, 1500.0, 2000.0, 2000.0],
        "clock_event_reasons": [0.0, 0.0, 4.0, 0.0],
    })  # fmt: skip
    stats = window_stats(frame, "w", 0.5, 2.5)
    assert (stats.energy_j, stats.avg_power_w, stats.duration_s) == (400.0, 200.0, 2.0)  # counter at 50 J and 450 J
    assert (stats.peak_power_w, stats.peak_gpu_temp_c, stats.mean_sm_clock_mhz) == (200.0, 43.0, 1750.0)
    assert stats.throttled is True  # SW power cap at 2 s
    no_counter = window_stats(frame.assign(energy_j=np.nan), "w", 0.5, 2.5)
    assert no_counter.energy_j == 50.0 + 150.0 + 112.5  # trapezoids from p(0.5)=100 to p(2.5)=250
    between = window_stats(frame, "gap", 1.2, 1.8)  # no sample inside: energy yes, peaks unknown
    assert between.energy_j == pytest.approx(120.0) and math.isnan(between.peak_power_w) and between.throttled is None
    with pytest.raises(ValueError, match="end_s"):
        window_stats(frame, "w", 2.0, 1.0)
    assert value_at(frame, "gpu_temp_c", 2.5) == 43.0 and value_at(frame, "gpu_temp_c", -1.0) == 40.0
