"""The device knobs: a GPU's power limit and SM clocks, set through NVML and always put back.

    with DeviceKnobs(device=0, power_limits=4, sm_clocks=3) as knobs:
        knobs.params           # {"power_limit_w": [200, 367, 533, 700], "sm_clock_mhz": [None, 1980, 1305, 855]}
        knobs.apply({"power_limit_w": 367, "sm_clock_mhz": 1305})
    # the previous power limit is set again and the clocks are reset, also on an exception or Ctrl-C

Candidates come from the GPU: power limits spread evenly over nvmlDeviceGetPowerManagementLimitConstraints
(the limit in force included), SM clocks from nvmlDeviceGetSupportedGraphicsClocks at the highest memory
clock, None meaning "not locked" (the driver's own boost). Clocks are locked (nvmlDeviceSetGpuLockedClocks)
where the GPU allows it, else set as application clocks (nvmlDeviceSetApplicationsClocks).

Setting either knob needs root on most systems. Entering the context probes each knob once; a knob the
GPU or the user may not change is left out of `params`, with a line in `notes` saying why, and the
caller goes on without it.

Settings outlive the process that made them. So before anything is changed, a record of what to put
back is written to `record_dir/<GPU uuid>.json`; it is removed once restored. Restoring happens on leaving
the context (any exception, KeyboardInterrupt, or SIGTERM/SIGHUP, which are turned into SystemExit while
the context is open), at interpreter exit, and, for a process killed outright, at the next start:
entering the context, or `restore_leftover`, finds the record of a dead process and restores from it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

from triton_workbench.database.store import default_path, process_alive, this_host, utc_now
from triton_workbench.profiler.device_index import NvmlDevice, resolve_device

log = logging.getLogger("triton_workbench.profiler")

POWER_LIMIT = "power_limit_w"
SM_CLOCK = "sm_clock_mhz"
_REFUSED = ("NVMLError_NoPermission", "NVMLError_NotSupported", "NVMLError_FunctionNotFound")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def default_record_dir() -> Path:
    """Where records of changed settings go: `device_settings/` beside the default database."""
    return default_path().parent / "device_settings"


class DeviceSettingsBusy(RuntimeError):
    """Another live process holds the settings of this GPU."""


def _record_path(record_dir: Path, gpu: NvmlDevice) -> Path:
    return Path(record_dir) / f"{gpu.uuid}.json"


def _restore(nvml: Any, gpu: NvmlDevice, record: Mapping[str, Any]) -> list[str]:
    """Put back what `record` says (clocks reset, the power limit it holds); returns the failures."""
    failures = []
    steps = []
    if record.get("clock_mode") == "locked":
        steps.append(("reset locked clocks", lambda: nvml.nvmlDeviceResetGpuLockedClocks(gpu.handle)))
    if record.get("clock_mode") == "applications":
        steps.append(("reset application clocks", lambda: nvml.nvmlDeviceResetApplicationsClocks(gpu.handle)))
    if record.get("power_limit_mw") is not None:
        limit_mw = int(record["power_limit_mw"])
        steps.append((f"power limit {limit_mw / 1000:g} W",
                      lambda: nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, limit_mw)))  # fmt: skip
    for what, step in steps:
        try:
            step()
        except nvml.NVMLError as error:
            failures.append(f"{what}: {error}")
    return failures


def restore_leftover(nvml: Any, gpu: NvmlDevice, record_dir: str | os.PathLike | None = None) -> bool:
    """Restore the settings a dead process left on `gpu` (its record in `record_dir`); True if it did.

    A record of a live process (another sweep holding this GPU's knobs) raises DeviceSettingsBusy."""
    path = _record_path(Path(record_dir or default_record_dir()), gpu)
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    if record.get("host") == this_host() and record.get("pid") != os.getpid() and process_alive(record["pid"]):
        raise DeviceSettingsBusy(f"process {record['pid']} holds the settings of {gpu.name} ({gpu.uuid}) since "
                                 f"{record.get('created_at')}; run one knob sweep per GPU at a time")  # fmt: skip
    failures = _restore(nvml, gpu, record)
    if failures:
        log.error("could not restore the settings of %s left by process %s: %s", gpu.uuid, record.get("pid"),
                  "; ".join(failures))  # fmt: skip
        return False
    path.unlink()
    log.warning("restored the settings of %s that process %s changed and did not put back (%s)", gpu.name,
                record.get("pid"), path)  # fmt: skip
    return True


class DeviceKnobs:
    """Power limit and SM clock of one GPU as tunable parameters (see the module docstring).

    device: the CUDA ordinal (or a UUID / PCI bus id, as for NvmlSampler). power_limits / sm_clocks: how many
    candidate values of each (0: not a parameter). record_dir: where the record of what to put back goes
    (default `default_record_dir()`).
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
        self._record: dict[str, Any] | None = None
        self._applied: dict[str, Any] = {}
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ entering: record, probe, candidates
    def __enter__(self) -> "DeviceKnobs":
        try:
            self._nvml = importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except Exception as error:  # no nvidia-ml-py, no driver
            self._nvml = None
            self.notes.append(f"device knobs: NVML is not available ({error or type(error).__name__}); "
                              "tuning without them")  # fmt: skip
            return self
        self._gpu = resolve_device(self._nvml, self.device)
        restore_leftover(self._nvml, self._gpu, self.record_dir)
        limit_mw = int(self._nvml.nvmlDeviceGetPowerManagementLimit(self._gpu.handle))
        self._record = {"uuid": self._gpu.uuid, "pid": os.getpid(), "host": this_host(), "created_at": utc_now(),
                        "power_limit_mw": limit_mw if self.power_limits else None, "clock_mode": None}  # fmt: skip
        self._write_record()  # before the first change, the probes included
        self._hold()
        try:
            if self.power_limits:
                self._probe_power_limit(limit_mw)
            if self.sm_clocks:
                self._probe_clocks()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        for note in self.notes:
            log.warning("%s", note)
        return self

    def _write_record(self) -> None:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        path = _record_path(self.record_dir, self._gpu)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self._record))
        partial.replace(path)

    def _refused(self, knob: str, error: Exception) -> bool:
        """Note a knob the GPU or the user may not change (True), or re-raise an unexpected NVML error."""
        if type(error).__name__ not in _REFUSED:
            raise error
        why = "permission refused (setting it needs root)" if "NoPermission" in type(error).__name__ else str(error)
        self.notes.append(f"device knobs: {knob} cannot be set on {self._gpu.name}: {why}; tuning without it")
        return True

    def _probe_power_limit(self, limit_mw: int) -> None:
        nvml, handle = self._nvml, self._gpu.handle
        try:
            low_mw, high_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            nvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)  # no change: does NVML let us?
        except nvml.NVMLError as error:
            self._refused(POWER_LIMIT, error)
            self._record["power_limit_mw"] = None  # never changed: nothing to put back
            self._write_record()
            return
        spread = [round((low_mw + (high_mw - low_mw) * i / (self.power_limits - 1)) / 1000) for i in range(self.power_limits)]
        self.default[POWER_LIMIT] = round(limit_mw / 1000)
        self.params[POWER_LIMIT] = sorted({*spread, self.default[POWER_LIMIT]})

    def _probe_clocks(self) -> None:
        nvml, handle = self._nvml, self._gpu.handle
        try:
            memory_mhz = max(nvml.nvmlDeviceGetSupportedMemoryClocks(handle))
            clocks = sorted(set(nvml.nvmlDeviceGetSupportedGraphicsClocks(handle, memory_mhz)), reverse=True)
        except nvml.NVMLError as error:
            self._refused(SM_CLOCK, error)
            return
        attempts = (("locked", lambda f: nvml.nvmlDeviceSetGpuLockedClocks(handle, f, f)),
                    ("applications", lambda f: nvml.nvmlDeviceSetApplicationsClocks(handle, memory_mhz, f)))  # fmt: skip
        errors = []
        for mode, lock in attempts:
            self._record["clock_mode"] = mode
            self._write_record()
            try:
                lock(clocks[0])
            except nvml.NVMLError as error:
                errors.append(error)
                continue
            self.clock_mode, self._memory_mhz = mode, memory_mhz
            self._applied[SM_CLOCK] = clocks[0]
            self.apply({SM_CLOCK: None})
            picks = [clocks[round(i * (len(clocks) - 1) / (self.sm_clocks - 1))] for i in range(self.sm_clocks)]
            self.params[SM_CLOCK] = [None, *dict.fromkeys(picks)]
            self.default[SM_CLOCK] = None
            return
        self._record["clock_mode"] = None
        self._write_record()
        self._refused(SM_CLOCK, errors[0])

    # ------------------------------------------------------------------ applying
    def apply(self, settings: Mapping[str, Any]) -> None:
        """Set the knobs named in `settings` (keys of `params`; sm_clock_mhz None = not locked). NVML errors
        propagate: a setting refused now is a failed trial, not a reason to stop."""
        unknown = set(settings) - set(self.params) - set(self._applied)
        if unknown:
            raise ValueError(f"settings: unknown device knobs {sorted(unknown)}; this GPU's are {sorted(self.params)}")
        if not settings:
            return
        nvml, handle = self._nvml, self._gpu.handle
        for knob, value in settings.items():
            if knob in self._applied and self._applied[knob] == value:
                continue
            if knob == POWER_LIMIT:
                nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(value * 1000)))
            elif value is None:
                reset = nvml.nvmlDeviceResetGpuLockedClocks if self.clock_mode == "locked" else nvml.nvmlDeviceResetApplicationsClocks
                reset(handle)
            elif self.clock_mode == "locked":
                nvml.nvmlDeviceSetGpuLockedClocks(handle, int(value), int(value))
            else:
                nvml.nvmlDeviceSetApplicationsClocks(handle, self._memory_mhz, int(value))
            self._applied[knob] = value

    # ------------------------------------------------------------------ leaving: put everything back
    def restore(self) -> None:
        """Put back the settings found on entering and remove the record (idempotent); a failure is logged
        and the record kept, so the next start tries again."""
        if self._record is None:
            return
        failures = _restore(self._nvml, self._gpu, self._record)
        if failures:
            log.error("could not restore the settings of %s: %s (record kept: %s)", self._gpu.uuid,
                      "; ".join(failures), _record_path(self.record_dir, self._gpu))  # fmt: skip
        else:
            _record_path(self.record_dir, self._gpu).unlink(missing_ok=True)
        self._record = None
        self._applied.clear()

    def _hold(self) -> None:
        """Restore at interpreter exit, and turn SIGTERM/SIGHUP into SystemExit so the context unwinds."""
        atexit.register(self.restore)
        if threading.current_thread() is not threading.main_thread():
            return

        def leave(signum, frame):
            raise SystemExit(128 + signum)

        for number in _SIGNALS:
            self._previous_handlers[number] = signal.signal(number, leave)

    def __exit__(self, *exc_info) -> None:
        try:
            self.restore()
        finally:
            atexit.unregister(self.restore)
            for number, handler in self._previous_handlers.items():
                signal.signal(number, handler)
            self._previous_handlers.clear()
            if self._nvml is not None:
                self._nvml.nvmlShutdown()
                self._nvml = None
