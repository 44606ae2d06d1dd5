"""The device knobs: a GPU's power limit and SM clocks, set through NVML and always put back.

    with DeviceKnobs(device=0, power_limits=4, sm_clocks=3) as knobs:
        knobs.params           # {"power_limit_w": [200, 367, 533, 700], "sm_clock_mhz": [None, 1980, 1305, 855]}
        knobs.apply({"power_limit_w": 367, "sm_clock_mhz": 1305})
    # the power limit and application clocks found are set again, locked clocks are reset

Candidates come from the GPU: power limits spread evenly over nvmlDeviceGetPowerManagementLimitConstraints
(whole watts inside them, and the limit in force exactly), SM clocks from nvmlDeviceGetSupportedGraphicsClocks
at the highest memory clock, None meaning "not locked" (the clocks as found). Clocks are locked
(nvmlDeviceSetGpuLockedClocks) where the GPU allows it, else set as application clocks.

Setting either knob needs root on most systems. Entering the context probes each knob once; a knob the
GPU or the user may not change is left out of `params`, with a line in `notes` saying why, and the
caller goes on without it.

Settings outlive the process that made them. The context owns the GPU's settings and writes a record of what
to put back before its first change (`profiler.settings_record`). Putting back happens on leaving the
context (any exception, KeyboardInterrupt, or SIGTERM/SIGHUP, which are turned into SystemExit while the
context is open), at interpreter exit if that failed, and, for a process killed outright, at the next start.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import math
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from triton_workbench.database.store import this_host, utc_now
from triton_workbench.profiler.device_index import NvmlDevice, resolve_device
from triton_workbench.profiler.settings_record import SettingsRecord, default_record_dir, put_back, put_back_clocks

log = logging.getLogger("triton_workbench.profiler")

POWER_LIMIT = "power_limit_w"
SM_CLOCK = "sm_clock_mhz"
_REFUSED = ("NVMLError_NoPermission", "NVMLError_NotSupported", "NVMLError_FunctionNotFound")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while the block runs and deliver the first after it: a second Ctrl-C
    or kill must not stop putting settings back halfway. Main thread only (where Python handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for number in (signal.SIGINT, *_SIGNALS):
        handler = signal.getsignal(number)
        if handler is not None and handler != signal.SIG_IGN:
            previous[number] = signal.signal(number, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if pending:
            signal.raise_signal(pending[0])


class DeviceKnobs:
    """Power limit and SM clock of one GPU as tunable parameters (see the module docstring).

    device: the CUDA ordinal (or a UUID / PCI bus id, as for NvmlSampler). power_limits / sm_clocks: how many
    candidate values of each (0: not a parameter). record_dir: where the record of what to put back goes
    (default `settings_record.default_record_dir()`).
    """

    def __init__(self, device: int | str = 0, *, power_limits: int = 4, sm_clocks: int = 3,
                 record_dir: str | os.PathLike | None = None):  # fmt: skip
        for name, value in (("power_limits", power_limits), ("sm_clocks", sm_clocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
                raise ValueError(f"{name} must be 0 (not tuned) or a number of candidates >= 2, got {value!r}")
        self.device, self.power_limits, self.sm_clocks = device, power_limits, sm_clocks
        self.record_dir = Path(record_dir) if record_dir is not None else default_record_dir()
        self.params: dict[str, list[Any]] = {}
        self.default: dict[str, Any] = {}
        self.notes: list[str] = []
        self.clock_mode: str | None = None  # "locked" or "applications" once probed
        self._nvml: Any = None
        self._gpu: NvmlDevice | None = None
        self._owner: SettingsRecord | None = None
        self._record: dict[str, Any] | None = None  # what to put back; on disk while it names a change
        self._applied: dict[str, Any] = {}
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ entering: own, probe, candidates
    def __enter__(self) -> "DeviceKnobs":
        try:
            self._nvml = importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except Exception as error:  # no nvidia-ml-py, no driver
            self._nvml = None
            self.notes.append(f"device knobs: NVML is not available ({error or type(error).__name__}); "
                              "tuning without them")  # fmt: skip
            return self
        try:
            self._gpu = resolve_device(self._nvml, self.device)
            self._owner = SettingsRecord(self.record_dir, self._nvml, self._gpu).__enter__()
            self._record = {"uuid": self._gpu.uuid, "pid": os.getpid(), "host": this_host(), "created_at": utc_now(),
                            "power_limit_mw": None, "clock_mode": None, "applications_clocks": None}  # fmt: skip
            self._hold()
            if self.power_limits:
                self._probe_power_limit()
            if self.sm_clocks:
                self._probe_clocks()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        for note in self.notes:
            log.warning("%s", note)
        return self

    @property
    def _pending(self) -> bool:
        """Whether something was (maybe) changed and not yet put back."""
        return self._record is not None and (self._record["power_limit_mw"] is not None
                                             or self._record["clock_mode"] is not None)  # fmt: skip

    def _note_change(self, **entries: Any) -> None:
        """Update what to put back; on disk before the change it covers is made, removed when it covers none."""
        self._record.update(entries)
        if self._pending:
            self._owner.write(self._record)
        else:
            self._owner.remove()

    def _refused(self, knob: str, error: Exception) -> None:
        """Note a knob the GPU or the user may not change, or re-raise an unexpected NVML error."""
        if type(error).__name__ not in _REFUSED:
            raise error
        why = "permission refused (setting it needs root)" if "NoPermission" in type(error).__name__ else str(error)
        self.notes.append(f"device knobs: {knob} cannot be set on {self._gpu.name}: {why}; tuning without it")

    def _probe_power_limit(self) -> None:
        nvml, handle = self._nvml, self._gpu.handle
        try:
            limit_mw = int(nvml.nvmlDeviceGetPowerManagementLimit(handle))
            low_mw, high_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            nvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)  # no change: does NVML let us?
        except nvml.NVMLError as error:
            self._refused(POWER_LIMIT, error)
            return
        self._limit_mw = limit_mw
        low_w, high_w = math.ceil(low_mw / 1000), math.floor(high_mw / 1000)  # whole watts inside the constraints
        spread = [min(max(round((low_mw + (high_mw - low_mw) * i / (self.power_limits - 1)) / 1000), low_w), high_w)
                  for i in range(self.power_limits)]  # fmt: skip
        current = limit_mw // 1000 if limit_mw % 1000 == 0 else limit_mw / 1000  # exact: the GPU as found
        self.default[POWER_LIMIT] = self._applied[POWER_LIMIT] = current
        self.params[POWER_LIMIT] = sorted({*spread, current})

    def _applications_clocks(self) -> list[int] | None:
        """The application clocks in force, [memory, graphics] MHz, to set back; None if NVML will not say."""
        nvml, handle = self._nvml, self._gpu.handle
        try:
            return [int(nvml.nvmlDeviceGetApplicationsClock(handle, nvml.NVML_CLOCK_MEM)),
                    int(nvml.nvmlDeviceGetApplicationsClock(handle, nvml.NVML_CLOCK_GRAPHICS))]  # fmt: skip
        except nvml.NVMLError:
            return None

    def _probe_clocks(self) -> None:
        nvml, handle = self._nvml, self._gpu.handle
        try:
            memory_mhz = max(nvml.nvmlDeviceGetSupportedMemoryClocks(handle))
            clocks = sorted(set(nvml.nvmlDeviceGetSupportedGraphicsClocks(handle, memory_mhz)), reverse=True)
        except nvml.NVMLError as error:
            self._refused(SM_CLOCK, error)
            return
        self._record["applications_clocks"] = self._applications_clocks()
        attempts = (("locked", lambda f: nvml.nvmlDeviceSetGpuLockedClocks(handle, f, f)),
                    ("applications", lambda f: nvml.nvmlDeviceSetApplicationsClocks(handle, memory_mhz, f)))  # fmt: skip
        errors = []
        for mode, lock in attempts:
            self._note_change(clock_mode=mode)
            try:
                lock(clocks[0])
            except nvml.NVMLError as error:
                errors.append(error)
                continue
            self.clock_mode, self._memory_mhz = mode, memory_mhz
            put_back_clocks(nvml, handle, self._record)
            picks = [clocks[round(i * (len(clocks) - 1) / (self.sm_clocks - 1))] for i in range(self.sm_clocks)]
            self.params[SM_CLOCK] = [None, *dict.fromkeys(picks)]
            self.default[SM_CLOCK] = self._applied[SM_CLOCK] = None
            return
        self._note_change(clock_mode=None)
        self._refused(SM_CLOCK, errors[0])

    # ------------------------------------------------------------------ applying
    def apply(self, settings: Mapping[str, Any]) -> None:
        """Set the knobs named in `settings` (keys of `params`; sm_clock_mhz None = the clocks as found). NVML
        errors propagate: a setting refused now is a failed trial, not a reason to stop."""
        unknown = set(settings) - set(self.params)
        if unknown:
            raise ValueError(f"settings: unknown device knobs {sorted(unknown)}; this GPU's are {sorted(self.params)}")
        if not settings:
            return
        nvml, handle = self._nvml, self._gpu.handle
        for knob, value in settings.items():
            if self._applied.get(knob) == value:
                continue
            if knob == POWER_LIMIT:
                if self._record["power_limit_mw"] is None:
                    self._note_change(power_limit_mw=self._limit_mw)
                nvml.nvmlDeviceSetPowerManagementLimit(handle, round(value * 1000))
            elif value is None:
                put_back_clocks(nvml, handle, self._record)
            elif self.clock_mode == "locked":
                nvml.nvmlDeviceSetGpuLockedClocks(handle, int(value), int(value))
            else:
                nvml.nvmlDeviceSetApplicationsClocks(handle, self._memory_mhz, int(value))
            self._applied[knob] = value

    # ------------------------------------------------------------------ leaving: put everything back
    def restore(self) -> None:
        """Put back what was changed and remove the record (idempotent); signals wait until it is done. A
        failure is logged and the record kept: the exit hook tries again, then the next start."""
        if not self._pending:
            return
        with _signals_deferred():
            failures = put_back(self._nvml, self._gpu, self._record)
            if failures:
                log.error("could not restore the settings of %s: %s (record kept: %s)", self._gpu.uuid,
                          "; ".join(failures), self._owner.path)  # fmt: skip
                return
            self._note_change(power_limit_mw=None, clock_mode=None)
            self._applied.clear()

    def _hold(self) -> None:
        """Restore at interpreter exit, and turn SIGTERM/SIGHUP into SystemExit so the context unwinds. A signal
        ignored (SIG_IGN) or handled outside Python is left alone; a Python handler runs first (chained)."""
        atexit.register(self.restore)
        if threading.current_thread() is not threading.main_thread():
            return
        for number in _SIGNALS:
            previous = signal.getsignal(number)
            if previous is None or previous == signal.SIG_IGN:
                continue

            def leave(signum, frame, previous=previous):
                if callable(previous):
                    previous(signum, frame)
                raise SystemExit(128 + signum)

            signal.signal(number, leave)
            self._previous_handlers[number] = previous

    def __exit__(self, *exc_info) -> None:
        try:
            self.restore()
        finally:
            for number, handler in self._previous_handlers.items():
                signal.signal(number, handler)
            self._previous_handlers.clear()
            if not self._pending:  # put back, or nothing changed: the exit hook, ownership and NVML are done with
                atexit.unregister(self.restore)
                if self._owner is not None:
                    self._owner.__exit__()
                    self._owner = None
                if self._nvml is not None:
                    self._nvml.nvmlShutdown()
                    self._nvml = None
