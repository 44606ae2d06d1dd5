"""Window arithmetic: energy, power, temperature and clocks of a time span of a sampler frame.

Pure functions of a frame with the sampler's columns (see `profiler.nvml_sampler.SAMPLE_COLUMNS`),
or a dict of those columns as arrays, so a stored trace gives the same numbers as a live one.

Energy comes from the board's energy counter: the counter is cumulative, so it is interpolated
linearly at the window's start and end and the difference taken. Where the counter is missing
(NaN throughout), energy is the integral of sampled power over the window (trapezoids, with power
interpolated at the edges). Average power is energy / duration either way. Peaks, means and the
throttle flag use the samples taken inside the window, edges included (the sampler takes one at
each edge of a window).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from typing import Mapping

import numpy as np
import pandas as pd

# NVML clock-event reasons that mean the clocks were held down by power or heat (nvml.h ABI):
# SW power cap 0x4, HW slowdown 0x8, SW thermal 0x20, HW thermal 0x40, HW power brake 0x80.
# Idle (0x1), application clocks (0x2), sync boost (0x10) and display clocks (0x100) are not throttling.
POWER_REASONS_MASK = 0x4 | 0x80  # a power cap (a limit someone set, or the board's power brake)
THERMAL_REASONS_MASK = 0x8 | 0x20 | 0x40  # heat: SW/HW thermal slowdown, and HW slowdown (mostly temperature)
THROTTLE_REASONS_MASK = POWER_REASONS_MASK | THERMAL_REASONS_MASK


@dataclass(frozen=True)
class WindowStats:
    """What a window of a trace measured; NaN (or None for `throttled`) where the data is missing."""

    name: str
    start_s: float
    end_s: float
    duration_s: float
    energy_j: float
    avg_power_w: float
    peak_power_w: float
    peak_gpu_temp_c: float
    mean_sm_clock_mhz: float
    throttled: bool | None
    throttle_reasons: float = math.nan  # the clock-event reasons of the samples inside, OR-ed (NVML's bitmask)


WINDOW_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(WindowStats))
_STATS_COLUMNS = ("time_s", "power_w", "energy_j", "gpu_temp_c", "sm_clock_mhz", "clock_event_reasons")


def _valid(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(values)
    return times[keep], values[keep]


def counter_energy_j(times: np.ndarray, energy_j: np.ndarray, start_s: float, end_s: float) -> float:
    """Energy between start_s and end_s from a cumulative counter (linear interpolation); NaN without 2 readings."""
    times, energy_j = _valid(times, energy_j)
    if len(times) < 2:
        return math.nan
    start_j, end_j = np.interp([start_s, end_s], times, energy_j)
    return float(end_j - start_j)


def integrated_energy_j(times: np.ndarray, power_w: np.ndarray, start_s: float, end_s: float) -> float:
    """Integral of power over [start_s, end_s] (trapezoids, power interpolated at the edges); NaN without data."""
    times, power_w = _valid(times, power_w)
    if len(times) == 0:
        return math.nan
    inside = (times > start_s) & (times < end_s)
    edges = np.interp([start_s, end_s], times, power_w)
    t = np.concatenate(([start_s], times[inside], [end_s]))
    p = np.concatenate(([edges[0]], power_w[inside], [edges[1]]))
    return float(np.trapezoid(p, t))


def _nan_reduce(values: np.ndarray, reduce) -> float:
    values = values[~np.isnan(values)]
    return float(reduce(values)) if len(values) else math.nan


Columns = pd.DataFrame | Mapping[str, np.ndarray]


def window_stats(frame: Columns, name: str, start_s: float, end_s: float) -> WindowStats:
    """The measurements of one window [start_s, end_s] of a sampler frame (or a dict of its columns as arrays)."""
    if end_s < start_s:
        raise ValueError(f"end_s ({end_s}) must not precede start_s ({start_s})")
    column = {c: np.asarray(frame[c], dtype=float) for c in _STATS_COLUMNS}
    times = column["time_s"]
    duration_s = end_s - start_s
    energy_j = counter_energy_j(times, column["energy_j"], start_s, end_s)
    if math.isnan(energy_j):
        energy_j = integrated_energy_j(times, column["power_w"], start_s, end_s)
    inside = slice(np.searchsorted(times, start_s, "left"), np.searchsorted(times, end_s, "right"))
    reasons = column["clock_event_reasons"][inside]
    reasons = reasons[~np.isnan(reasons)].astype(np.int64)
    return WindowStats(
        name=name,
        start_s=float(start_s),
        end_s=float(end_s),
        duration_s=float(duration_s),
        energy_j=energy_j,
        avg_power_w=energy_j / duration_s if duration_s > 0 else math.nan,
        peak_power_w=_nan_reduce(column["power_w"][inside], np.max),
        peak_gpu_temp_c=_nan_reduce(column["gpu_temp_c"][inside], np.max),
        mean_sm_clock_mhz=_nan_reduce(column["sm_clock_mhz"][inside], np.mean),
        throttled=bool(np.any(reasons & THROTTLE_REASONS_MASK)) if len(reasons) else None,
        throttle_reasons=float(np.bitwise_or.reduce(reasons)) if len(reasons) else math.nan,
    )


def throttle_words(reasons: float, remeasured: object = False) -> str:
    """Clock-event reasons (NVML's bitmask, NaN if unknown) in words: 'power', 'heat', 'power+heat' or 'no'
    ('-' when unknown), with ' (remeasured)' for a trial measured again after cooling down."""
    if pd.isna(reasons):
        return "-"
    words = [word for word, mask in (("power", POWER_REASONS_MASK), ("heat", THERMAL_REASONS_MASK)) if int(reasons) & mask]
    return "+".join(words or ["no"]) + (" (remeasured)" if not pd.isna(remeasured) and remeasured else "")


def value_at(frame: Columns, column: str, time_s: float) -> float:
    """The last reading of `column` at or before time_s (the first one if time_s precedes them); NaN if none."""
    times, values = _valid(np.asarray(frame["time_s"], dtype=float), np.asarray(frame[column], dtype=float))
    if len(times) == 0:
        return math.nan
    return float(values[max(int(np.searchsorted(times, time_s, "right")) - 1, 0)])


def windows_frame(stats: list[WindowStats]) -> pd.DataFrame:
    """Window records as a DataFrame with WINDOW_COLUMNS (throttled is a nullable boolean)."""
    frame = pd.DataFrame([astuple(s) for s in stats], columns=list(WINDOW_COLUMNS))
    frame = frame.astype({c: float for c in WINDOW_COLUMNS if c not in ("name", "throttled")})
    frame["name"] = frame["name"].astype(object)
    frame["throttled"] = frame["throttled"].astype("boolean")
    return frame
