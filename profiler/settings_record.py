"""Who owns a GPU's settings, and the on-disk record of what to put back on it.

A process about to change a GPU's power limit or clocks takes `<record_dir>/<GPU uuid>.lock` (flock: the
kernel releases it when the process ends, kill -9 included) for as long as it holds the settings, and writes
`<uuid>.json` before its first change, saying what to put back; the record is removed once that is done.
A record found by the next owner was left by a process that died before putting back: it is put back before
anything else. If that fails the next owner stops (DeviceSettingsStuck) and keeps the record, the only note
of the GPU's own settings.

A record holds uuid, pid, host, created_at; power_limit_mw (the limit to set again; None: not changed);
clock_mode (None, "locked" or "applications": which clocks were changed) and applications_clocks ([memory,
graphics] MHz as found; None if NVML would not say). NVML cannot read locked clocks, so locked clocks are
reset (unlocked), not restored; application clocks are set back as found.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Mapping

from triton_workbench.database.store import default_path, process_alive, this_host
from triton_workbench.profiler.device_index import NvmlDevice

log = logging.getLogger("triton_workbench.profiler")


def default_record_dir() -> Path:
    """Where records of changed settings go: `device_settings/` beside the default database."""
    return default_path().parent / "device_settings"


class DeviceSettingsBusy(RuntimeError):
    """Another live process holds the settings of this GPU."""


class DeviceSettingsStuck(RuntimeError):
    """Settings a dead process changed could not be put back (setting them usually needs root)."""


def put_back_clocks(nvml: Any, handle: Any, record: Mapping[str, Any]) -> None:
    """Undo the clock change `record` names: unlock locked clocks, set application clocks back as found
    (reset them when NVML did not say what they were)."""
    if record.get("clock_mode") == "locked":
        nvml.nvmlDeviceResetGpuLockedClocks(handle)
    elif record.get("clock_mode") == "applications":
        found = record.get("applications_clocks")
        if found:
            nvml.nvmlDeviceSetApplicationsClocks(handle, int(found[0]), int(found[1]))
        else:
            nvml.nvmlDeviceResetApplicationsClocks(handle)


def put_back(nvml: Any, gpu: NvmlDevice, record: Mapping[str, Any]) -> list[str]:
    """Put back every change `record` names, each tried even when another fails; returns the failures."""
    steps = []
    if record.get("clock_mode") is not None:
        steps.append((f"{record['clock_mode']} clocks", lambda: put_back_clocks(nvml, gpu.handle, record)))
    if record.get("power_limit_mw") is not None:
        limit_mw = int(record["power_limit_mw"])
        steps.append((f"power limit {limit_mw / 1000:g} W",
                      lambda: nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, limit_mw)))  # fmt: skip
    failures = []
    for what, step in steps:
        try:
            step()
        except nvml.NVMLError as error:
            failures.append(f"{what}: {error}")
    return failures


class SettingsRecord:
    """Ownership of one GPU's settings and its record (see the module docstring).

    Entering takes the lock (DeviceSettingsBusy while another process holds it) and puts back a leftover
    record (DeviceSettingsStuck when that fails); `restored_leftover` says whether there was one."""

    def __init__(self, record_dir: str | os.PathLike, nvml: Any, gpu: NvmlDevice):
        self.path = Path(record_dir) / f"{gpu.uuid}.json"
        self.nvml, self.gpu = nvml, gpu
        self.restored_leftover = False
        self._lock: IO | None = None

    def __enter__(self) -> "SettingsRecord":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path.with_suffix(".lock"), "a")  # never removed: a new file would be a second lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise self._busy(self.read()) from None
        self._lock = lock
        try:
            self._restore_leftover()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def read(self) -> dict[str, Any] | None:
        """The record on disk, or None."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def write(self, record: Mapping[str, Any]) -> None:
        """Replace the record on disk in one step (a crash leaves the old one or the new one)."""
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(record))
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _busy(self, record: Mapping[str, Any] | None) -> DeviceSettingsBusy:
        owner = f"process {record.get('pid')} (since {record.get('created_at')})" if record else "another process"
        return DeviceSettingsBusy(f"{owner} holds the settings of {self.gpu.name} ({self.gpu.uuid}), record "
                                  f"{self.path}; change one GPU's settings from one process at a time")  # fmt: skip

    def _restore_leftover(self) -> None:
        record = self.read()
        if record is None:
            return
        if (record.get("host") == this_host() and record.get("pid") != os.getpid()
                and process_alive(record["pid"], record.get("created_at"))):  # fmt: skip
            raise self._busy(record)  # a live owner, on a file system where the lock did not hold
        failures = put_back(self.nvml, self.gpu, record)
        if failures:
            raise DeviceSettingsStuck(
                f"process {record.get('pid')} changed the settings of {self.gpu.name} ({self.gpu.uuid}) and did not "
                f"put them back; putting them back failed ({'; '.join(failures)}). Setting them needs root: run "
                f"this again as root. The record of the GPU's own settings is kept: {self.path}")  # fmt: skip
        self.remove()
        self.restored_leftover = True
        log.warning("restored the settings of %s that process %s changed and did not put back (%s)", self.gpu.name,
                    record.get("pid"), self.path)  # fmt: skip


def restore_leftover(nvml: Any, gpu: NvmlDevice, record_dir: str | os.PathLike | None = None) -> bool:
    """Put back what a dead process left changed on `gpu` (its record in `record_dir`); True if there was a
    record. DeviceSettingsBusy while a live process holds the settings, DeviceSettingsStuck if it fails."""
    with SettingsRecord(record_dir or default_record_dir(), nvml, gpu) as record:
        return record.restored_leftover
