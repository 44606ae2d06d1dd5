"""Energy per kernel call: back-to-back launches over a window long enough for NVML to see.

NVML cannot see one kernel call. Its power reading and energy counter are refreshed every few tens
of milliseconds (about 20-100 ms depending on the GPU), nvmlDeviceGetPowerUsage is a 1 s average
on Ampere and newer (except GA100), and on A100 and H100 the sensor samples only about 25 % of
the time (Yang et al., SC'24, "Accurate and Convenient Energy Measurements for GPUs"). So one
trial keeps the GPU continuously busy with back-to-back calls, which makes its power steady (a
steady signal is measured correctly even when only part of the time is sampled), for at least
`min_window_s`, and divides the energy the counter saw by the number of calls. The default of
1 s spans about ten refreshes of a 100 ms counter (each refresh then weighs ~10 % of the total,
and the quantisation error of the two edges shrinks with the window) and the whole 1 s averaging
period of the averaged power reading; profiler/README.md gives the sources. For final
comparisons, a longer window (zeus.profile's example settles on 5 s) and a cool-down between
trials give lower variance.

Nothing is subtracted: `energy_j_per_call` is the board's whole energy during the window over
the calls, idle power included. The idle power, measured just before the trial, is reported
beside it, so a caller who wants the net figure computes
`(avg_power_w - idle_power_w) * window_s / calls`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

from triton_workbench.profiler.nvml_sampler import NvmlSampler
from triton_workbench.profiler.windows import THERMAL_REASONS_MASK

DEFAULT_MIN_WINDOW_S = 1.0


@dataclass(frozen=True)
class EnergyStats:
    """What `measure_energy` measured of one call; NaN (None for `throttled`) where NVML gave nothing.
    `calls` and `window_s` are always real."""

    energy_j_per_call: float  # the board's whole energy over the trial window / calls (idle included)
    avg_power_w: float  # over the trial window
    peak_power_w: float  # highest sample inside the trial window
    start_temp_c: float  # GPU temperature when the trial window opened
    end_temp_c: float  # ... and when it closed
    mean_sm_clock_mhz: float  # mean of the samples inside the trial window
    throttled: bool | None  # held down by power or heat during the window; None if unknown
    idle_power_w: float  # average power of the idle window just before the warm-up
    calls: int  # calls of fn inside the trial window
    window_s: float  # the trial window's length
    energy_j: float  # energy over the whole trial window
    throttle_reasons: float = math.nan  # NVML clock-event reasons seen in the window, OR-ed; NaN if unknown
    remeasured: bool = False  # the first window ran thermally throttled: measured again after cooling down


ENERGY_RESULT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(EnergyStats))


def _no_sync() -> None:
    return None


def cool_down(sampler: NvmlSampler, target_temp_c: float, timeout_s: float = 60.0, poll_s: float = 0.1) -> float:
    """Wait until the GPU is at or below target_temp_c (or timeout_s passes); returns the last temperature.

    Without NVML (or without a temperature reading) it returns NaN at once.
    """
    deadline = sampler.now_s() + timeout_s
    while True:
        sampler.sample(full=True)
        temp_c = sampler.latest("gpu_temp_c")
        if math.isnan(temp_c) or temp_c <= target_temp_c or sampler.now_s() >= deadline:
            return temp_c
        sampler.sleep(poll_s)


def measure_energy(fn: Callable[[], object], sampler: NvmlSampler, name: str, *,
                   min_window_s: float = DEFAULT_MIN_WINDOW_S, warmup_s: float = 0.1, idle_s: float = 0.5,
                   cooldown_s: float = 0.0, cooldown_temp_c: float | None = None, cooldown_timeout_s: float = 60.0,
                   synchronize: Callable[[], object] = _no_sync, batch_s: float = 0.05) -> EnergyStats:  # fmt: skip
    """Measure the energy of one call of `fn` as described in the module docstring.

    Steps, all on `sampler`'s clock (the sampler should be running, so that windows have samples
    inside them; edges are sampled anyway):
    1. cool-down: wait `cooldown_s`, then, if `cooldown_temp_c` is given, until the GPU is at or
       below it (at most `cooldown_timeout_s`);
    2. idle: window "<name>/idle" of `idle_s` seconds doing nothing -> idle_power_w;
    3. warm-up: call `fn` for `warmup_s` (at least once), synchronised, to settle clocks and to time
       one call, from which calls are grouped in batches of about `batch_s`;
    4. the trial: window "<name>", back-to-back calls, `synchronize()` after each batch, until at
       least `min_window_s` has passed; the window closes after the last synchronize.

    `synchronize` waits for queued GPU work (pass torch.cuda.synchronize for CUDA kernels).
    Returns an `EnergyStats`; its measurements are NaN without NVML, calls and window_s always real.
    """
    if not callable(fn) or not callable(synchronize):
        raise TypeError("fn and synchronize must be callables taking no arguments")
    for label, value, least in (("min_window_s", min_window_s, "positive"), ("batch_s", batch_s, "positive"),
                                ("warmup_s", warmup_s, "non-negative"), ("idle_s", idle_s, "non-negative"),
                                ("cooldown_s", cooldown_s, "non-negative")):  # fmt: skip
        if not isinstance(value, (int, float)) or value < 0 or (least == "positive" and value == 0):
            raise ValueError(f"{label} must be a {least} number of seconds, got {value!r}")

    if sampler.available:
        if cooldown_s:
            sampler.sleep(cooldown_s)
        if cooldown_temp_c is not None:
            cool_down(sampler, cooldown_temp_c, cooldown_timeout_s)
        synchronize()
        with sampler.window(f"{name}/idle") as idle:
            sampler.sleep(idle_s)
        idle_power_w = sampler.window_stats(idle).avg_power_w
    else:
        idle_power_w = math.nan

    warmup_start_s, warmup_calls = sampler.now_s(), 0
    while warmup_calls == 0 or sampler.now_s() - warmup_start_s < warmup_s:
        fn()
        synchronize()
        warmup_calls += 1
    seconds_per_call = (sampler.now_s() - warmup_start_s) / warmup_calls
    batch = max(1, int(batch_s / seconds_per_call)) if seconds_per_call > 0 else 1

    calls = 0
    with sampler.window(name) as trial:
        while calls == 0 or sampler.now_s() - trial.start_s < min_window_s:
            for _ in range(batch):
                fn()
            synchronize()
            calls += batch
    stats = sampler.window_stats(trial)
    return EnergyStats(
        energy_j_per_call=stats.energy_j / calls,
        avg_power_w=stats.avg_power_w,
        peak_power_w=stats.peak_power_w,
        start_temp_c=sampler.value_at("gpu_temp_c", trial.start_s),
        end_temp_c=sampler.value_at("gpu_temp_c", trial.end_s),
        mean_sm_clock_mhz=stats.mean_sm_clock_mhz,
        throttled=stats.throttled,
        idle_power_w=idle_power_w,
        calls=calls,
        window_s=stats.duration_s,
        energy_j=stats.energy_j,
        throttle_reasons=stats.throttle_reasons,
    )


def thermally_throttled(stats: EnergyStats) -> bool:
    """Whether heat (`windows.THERMAL_REASONS_MASK`) held the clocks down during the measurement."""
    return not math.isnan(stats.throttle_reasons) and bool(int(stats.throttle_reasons) & THERMAL_REASONS_MASK)


def energy_meter(sampler: NvmlSampler, remeasure_below_c: float | None = None,
                 **options) -> Callable[[str, Callable[[], object]], EnergyStats]:  # fmt: skip
    """`meter(name, fn) -> EnergyStats`: measure_energy bound to a sampler and options (e.g. synchronize,
    min_window_s, cooldown_s), the shape autotune's EnergyMeter protocol asks for.

    remeasure_below_c: a measurement that ran thermally throttled is taken again once the GPU has cooled to
    this temperature (`cool_down`), and the second one returned with `remeasured=True`; its
    `throttle_reasons` say whether it was throttled again. A power cap (SW power cap) is not heat: a power
    limit being tuned throttles on purpose, and such trials are flagged, not measured again."""
    unknown = set(options) - set(measure_energy.__kwdefaults__)
    if unknown:
        raise TypeError(f"unknown measure_energy options: {sorted(unknown)}")
    if remeasure_below_c is not None and (isinstance(remeasure_below_c, bool) or
                                          not isinstance(remeasure_below_c, (int, float))):  # fmt: skip
        raise ValueError(f"remeasure_below_c must be a temperature in deg C or None, got {remeasure_below_c!r}")

    def meter(name: str, fn: Callable[[], object]) -> EnergyStats:
        stats = measure_energy(fn, sampler, name, **options)
        if remeasure_below_c is None or not thermally_throttled(stats):
            return stats
        cool_down(sampler, remeasure_below_c, options.get("cooldown_timeout_s", 60.0))
        return replace(measure_energy(fn, sampler, f"{name} (remeasured)", **options), remeasured=True)

    return meter
