"""The NVML sampler: power, energy, temperature and clocks of one GPU, sampled in a background thread.

It talks to the hardware only through nvidia-ml-py's `pynvml` module, imported when a sampler is
made (so a test double placed in `sys.modules["pynvml"]` stands in for it).

What is read, and how often:
- every sample (`interval_s`, default 10 ms): instant power (field NVML_FI_DEV_POWER_INSTANT,
  else nvmlDeviceGetPowerUsage, which on Ampere and newer except GA100 is a 1 s average) and the
  board's energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded);
- every `slow_every`-th sample (default 10th, so every 100 ms), and at the edges of every window:
  GPU and memory temperature (field NVML_FI_DEV_MEMORY_TEMP), SM and memory clocks, GPU
  utilisation, memory used and the clock-event (throttle) reasons. Between reads these are
  forward-filled: a row carries the latest reading, so every row is complete and a short window
  still has a temperature and a clock. NaN means "not supported here", never "not read this time".

A field NVML does not support on this GPU (NVML says NotSupported, FunctionNotFound or
NoPermission), or whose field constant this nvidia-ml-py lacks, is NaN in every row and logged once;
another NVML error makes that reading NaN. Where NVML is missing (no nvidia-ml-py, no driver, no GPU,
no such device) the sampler is `available=False` with the `reason`, samples nothing and its frames
are empty (with the right columns); windows still record their times, with NaN measurements. Trouble
with NVML never raises; anything else a reader raises (an AttributeError, say) is a bug and does.

Times are `clock()` (monotonic) seconds since the sampler was made; `energy_j` counts from the
first sample (start() takes one). NVML refreshes power and the energy counter only every few tens
of ms (see profiler/README.md), so sampling much faster than every 10 ms mostly repeats readings.
Rows are kept in memory, 88 bytes each: about 32 MB per hour at 10 ms.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import math
import threading
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from triton_workbench.profiler.device_index import NvmlDevice, resolve_device
from triton_workbench.profiler.windows import WindowStats, value_at, window_stats, windows_frame

log = logging.getLogger("triton_workbench.profiler")

SAMPLE_COLUMNS: tuple[str, ...] = (
    "time_s", "power_w", "energy_j", "gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "mem_clock_mhz",
    "gpu_util_pct", "mem_used_bytes", "clock_event_reasons",
)  # fmt: skip
_SLOW = SAMPLE_COLUMNS[3:]
# nvmlFieldValue_t.valueType -> the member of the value union that holds it (nvml.h)
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# NVML errors meaning "this GPU / driver / user will never give this field": stop asking.
_PERMANENT_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission")
# Field constants an older nvidia-ml-py lacks -> the column that is then unsupported, decided up front.
_OPTIONAL_CONSTANTS = {"NVML_FI_DEV_POWER_INSTANT": "power_instant", "NVML_FI_DEV_MEMORY_TEMP": "mem_temp_c"}


@dataclass
class WindowMark:
    """A named span on the sampler's time base; end_s is NaN while the window is open."""

    name: str
    start_s: float
    end_s: float = math.nan


class NvmlSampler:
    """Samples one GPU through NVML in a background thread; attributes energy to named windows.

    Use it as a context manager (or call start()/stop(); one start per sampler):

        with NvmlSampler(device=0, interval_s=0.01) as sampler:
            with sampler.window("epoch 1"):
                train_one_epoch()
        sampler.frame()    # one row per sample: SAMPLE_COLUMNS
        sampler.windows()  # one row per closed window: profiler.windows.WINDOW_COLUMNS

    device: the CUDA ordinal as this process sees it (CUDA_VISIBLE_DEVICES honoured), or a GPU
        UUID / PCI bus id. interval_s: seconds between samples of power and energy.
    slow_every: read temperatures, clocks, utilisation, memory and throttle reasons every n-th sample.
    clock, sleep: the time source (monotonic seconds) and how to wait; injectable for tests.
    """

    def __init__(self, device: int | str = 0, interval_s: float = 0.01, slow_every: int = 10,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if isinstance(slow_every, bool) or not isinstance(slow_every, int) or slow_every < 1:
            raise ValueError(f"slow_every must be an integer >= 1, got {slow_every!r}")
        self.interval_s = float(interval_s)
        self.slow_every = slow_every
        self.clock, self.sleep = clock, sleep
        self._t0 = clock()
        self._lock = threading.RLock()
        self._data = array("d")  # the rows, flat: len(SAMPLE_COLUMNS) doubles each
        self._times = array("d")  # time_s of each row, for bisecting
        self._slow_values = dict.fromkeys(_SLOW, math.nan)
        self._count = 0
        self._energy0_mj: float | None = None
        self._unsupported: set[str] = set()
        self._noted: set[str] = set()
        self._windows: list[WindowMark] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = self._closed = False
        self._nvml: Any = None
        self.device: NvmlDevice | None = None
        self.available, self.reason = self._open(device)
        if not self.available:  # callers say so in their own words (available, reason); debug here
            log.debug("no power data: %s", self.reason)

    # ------------------------------------------------------------------ NVML
    def _open(self, device: int | str) -> tuple[bool, str]:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as error:
            return False, f"nvidia-ml-py (pynvml) is not importable: {error}"
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return False, f"NVML could not start: {error or type(error).__name__}"
        try:
            self.device = resolve_device(nvml, device)
        except Exception as error:  # no GPU, device not visible, bad selector, NVML error
            nvml.nvmlShutdown()
            return False, f"no NVML device for device={device!r}: {error or type(error).__name__}"
        self._nvml = nvml
        for constant, column in _OPTIONAL_CONSTANTS.items():
            if not hasattr(nvml, constant):
                self._unsupported.add(column)
                self._noted.add(column)
                log.info("NVML: %s not available: this nvidia-ml-py has no %s; it is NaN%s", column, constant,
                         "; using nvmlDeviceGetPowerUsage" if column == "power_instant" else "")
        return True, ""

    def _read(self, column: str, read: Callable[[], float]) -> float:
        """One field's value; NaN (noted once) when NVML will not give it. Only NVML's errors mean that:
        anything else `read` raises is a bug, and propagates."""
        if column in self._unsupported:
            return math.nan
        try:
            return float(read())
        except self._nvml.NVMLError as error:
            permanent = type(error).__name__ in _PERMANENT_ERRORS
            if permanent:
                self._unsupported.add(column)
            if column not in self._noted:
                self._noted.add(column)
                what = "not available on this GPU" if permanent else "could not be read"
                log.info("NVML: %s %s (%s); it is NaN%s", column, what, error or type(error).__name__,
                         "" if permanent else " where it fails")  # fmt: skip
            return math.nan

    def _field(self, field_id: int) -> float:
        """A field value through nvmlDeviceGetFieldValues, decoded by its value type."""
        value = self._nvml.nvmlDeviceGetFieldValues(self.device.handle, [field_id])[0]
        if value.nvmlReturn != 0:
            raise self._nvml.NVMLError(value.nvmlReturn)
        return getattr(value.value, _VALUE_MEMBERS[value.valueType])

    def _power_w(self) -> float:
        if "power_instant" not in self._unsupported:
            instant = self._read("power_instant", lambda: self._field(self._nvml.NVML_FI_DEV_POWER_INSTANT))
            if not math.isnan(instant):
                return instant / 1000.0
            if "power_instant" in self._unsupported:
                log.info("NVML: using nvmlDeviceGetPowerUsage instead (a 1 s average on Ampere and newer except GA100)")
        return self._read("power_w", lambda: self._nvml.nvmlDeviceGetPowerUsage(self.device.handle)) / 1000.0

    def _clock_event_reasons(self) -> float:
        nvml, handle = self._nvml, self.device.handle
        if hasattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons"):
            reasons = self._read("clock_events", lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
            if "clock_events" not in self._unsupported:
                return reasons
        return self._read("clock_event_reasons", lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def _read_slow(self) -> None:
        nvml, handle = self._nvml, self.device.handle
        readers = {
            "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "mem_temp_c": lambda: self._field(nvml.NVML_FI_DEV_MEMORY_TEMP),
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "mem_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used,
        }
        self._slow_values = {column: self._read(column, read) for column, read in readers.items()}
        self._slow_values["clock_event_reasons"] = self._clock_event_reasons()

    # ------------------------------------------------------------------ sampling
    def now_s(self) -> float:
        """Seconds on the sampler's time base (since it was made)."""
        return self.clock() - self._t0

    def sample(self, full: bool = False) -> float:
        """Take one sample now (the thread calls this every interval_s); returns its time_s.

        full: also read the slow fields (done every slow_every-th sample and at window edges).
        Without NVML, or once stopped, nothing is recorded.
        """
        with self._lock:
            time_s = self.now_s()
            if not self.available or self._closed:
                return time_s
            power_w = self._power_w()
            handle = self.device.handle
            energy_mj = self._read("energy_j", lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            if self._energy0_mj is None and not math.isnan(energy_mj):
                self._energy0_mj = energy_mj
            energy_j = (energy_mj - self._energy0_mj) / 1000.0 if self._energy0_mj is not None else math.nan
            if full or self._count % self.slow_every == 0:
                self._read_slow()
            self._count += 1
            self._data.extend((time_s, power_w, energy_j, *(self._slow_values[column] for column in _SLOW)))
            self._times.append(time_s)
            return time_s

    def _run(self) -> None:
        next_s = self.clock()
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # never let the thread die silently, never take the process down
                log.exception("NVML sampler thread failed; sampling stops")
                return
            next_s += self.interval_s
            delay = next_s - self.clock()
            if delay < 0:  # fell behind (a slow NVML call): do not burst to catch up
                next_s, delay = self.clock(), 0.0
            self._stop.wait(delay)

    def start(self) -> "NvmlSampler":
        """Start the background thread (a no-op thread-wise without NVML). One start per sampler."""
        if self._started:
            raise RuntimeError("this NvmlSampler was already started; make a new one")
        self._started = True
        if self.available:
            self.sample(full=True)
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (waits for it), take a last sample and release NVML. Safe to call twice."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.available:
            self.sample(full=True)
            self._nvml.nvmlShutdown()
        self._closed = True

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ windows
    @contextmanager
    def window(self, name: str) -> Iterator[WindowMark]:
        """Mark a named window around a block; windows may nest. The window closes when the block
        ends, also when it raises. A sample (with every field) is taken at each edge."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        record = WindowMark(name, self.sample(full=True))
        with self._lock:
            self._windows.append(record)
        try:
            yield record
        finally:
            record.end_s = self.sample(full=True)

    # ------------------------------------------------------------------ results
    def frame(self, first: int = 0) -> pd.DataFrame:
        """The samples from number `first` on (default: every sample so far): SAMPLE_COLUMNS, float64
        (clock_event_reasons is NVML's bitmask). `first` lets a periodic writer copy only what is new."""
        if not isinstance(first, int) or first < 0:
            raise ValueError(f"first: expected a non-negative int, got {first!r}")
        width = len(SAMPLE_COLUMNS)
        with self._lock:
            rows = np.array(self._data[first * width :], dtype=float).reshape(-1, width)
        return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS), index=pd.RangeIndex(first, first + len(rows)))

    def _columns_around(self, start_s: float, end_s: float) -> dict[str, np.ndarray]:
        """The samples in [start_s, end_s] and one more on each side, as column arrays (cheap on a long trace)."""
        width = len(SAMPLE_COLUMNS)
        with self._lock:
            lo = max(bisect.bisect_left(self._times, start_s) - 1, 0)
            hi = bisect.bisect_right(self._times, end_s) + 1
            rows = np.array(self._data[lo * width : hi * width], dtype=float).reshape(-1, width)
        return dict(zip(SAMPLE_COLUMNS, rows.T))

    def window_stats(self, record: WindowMark) -> WindowStats:
        """The measurements of one closed window (NaN measurements without samples)."""
        if math.isnan(record.end_s):
            raise ValueError(f"window {record.name!r} is still open")
        columns = self._columns_around(record.start_s, record.end_s)
        return window_stats(columns, record.name, record.start_s, record.end_s)

    def value_at(self, column: str, time_s: float) -> float:
        """The reading of `column` in force at time_s (the last sample at or before it); NaN if none."""
        if column not in SAMPLE_COLUMNS:
            raise ValueError(f"column must be one of {SAMPLE_COLUMNS}, got {column!r}")
        return value_at(self._columns_around(time_s, time_s), column, time_s)

    def windows(self) -> pd.DataFrame:
        """One row per closed window, in opening order: profiler.windows.WINDOW_COLUMNS."""
        with self._lock:
            closed = [w for w in self._windows if not math.isnan(w.end_s)]
        return windows_frame([self.window_stats(w) for w in closed])

    def latest(self, column: str) -> float:
        """The most recent value of `column` (NaN before any sample or without NVML)."""
        return self.value_at(column, math.inf)
