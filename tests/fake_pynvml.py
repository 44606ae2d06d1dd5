"""A test double of nvidia-ml-py's `pynvml` module: fake GPUs that follow a known script in time.

    clock = FakeClock()
    gpu = FakeGpu(clock, power_w=60.0)           # 60 W from t=0
    nvml = make_pynvml([gpu])                    # a module object with pynvml's names
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu.set_power(300.0)                         # 300 W from clock.now on (power is piecewise constant)

The energy counter is the exact integral of the power script (mJ, with an arbitrary offset as since
the driver loaded), optionally refreshed only every `counter_period_s` like the real one. Errors
are real subclasses of `NVMLError` carrying `.value`, as in pynvml. Switches: `unsupported` (field
names of FakeGpu.FIELDS that raise NVMLError_NotSupported), `init_error` (an NVML error code for
nvmlInit), `clock_events_api=False` (a pynvml without nvmlDeviceGetCurrentClocksEventReasons).

Device settings (the knobs): `FakeGpu.settings` holds the power limit and the locked / application clocks the
fake was given; setting them enforces NVML's rules (limit within the constraints, clocks from the supported
lists) and `refuse` (names of SETTINGS that raise NVMLError_NoPermission) stands for "not root". Application
clocks equal to `default_applications_clocks_mhz` are the GPU's own (None), as after a reset. With
`state_path`, the settings live in a JSON file, as a real GPU's outlive the process that set them.
"""

from __future__ import annotations

import bisect
import json
import math
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    """pynvml's base error: NVMLError(code) builds the subclass for that code."""

    _by_code: dict[int, type] = {}

    def __new__(cls, value: int = NVML_ERROR_UNKNOWN):
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, NVMLError)
        error = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value: int = NVML_ERROR_UNKNOWN):
        super().__init__(value)

    def __str__(self) -> str:
        return f"NVML error {self.value}: {type(self).__name__}"


def _error_class(name: str, code: int) -> type:
    def new(cls, *args):
        return NVMLError.__new__(cls, code)

    cls = type(name, (NVMLError,), {"__new__": new, "__init__": lambda self, *a: Exception.__init__(self, code)})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)


class FakeClock:
    """Monotonic seconds that move only when told to (sleep advances them)."""

    def __init__(self, start_s: float = 1000.0):
        self.now = start_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance


@dataclass
class FakeGpu:
    """One fake GPU. Power is piecewise constant in time (set_power); the rest follow callables of time."""

    clock: Callable[[], float] = time.monotonic
    power_w: float = 60.0
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    pci_bus_id: str = "00000000:3B:00.0"
    name: str = "Fake H100"
    temp_c: Callable[[float], float] = lambda t: 40.0
    mem_temp_c: Callable[[float], float] = lambda t: 50.0
    sm_clock_mhz: Callable[[float], float] = lambda t: 1755.0
    mem_clock_mhz: float = 2619.0
    util_pct: float = 0.0
    mem_used_bytes: int = 1 << 30
    clock_events: Callable[[float], int] = lambda t: 0
    counter_period_s: float = 0.0
    counter_offset_mj: int = 5_000_000_000
    unsupported: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    power_limit_range_w: tuple[float, float] = (200.0, 700.0)
    default_power_limit_w: float = 700.0
    graphics_clocks_mhz: tuple[int, ...] = (1980, 1755, 1530, 1305, 1080, 855)  # NVML lists them highest first
    memory_clocks_mhz: tuple[int, ...] = (2619,)
    default_applications_clocks_mhz: tuple[int, int] = (2619, 1755)  # (memory, graphics) when not set
    refuse: set[str] = field(default_factory=set)  # of SETTINGS: NVMLError_NoPermission
    state_path: Path | None = None  # settings kept in this JSON file (they outlive a process, like a GPU's)
    settings_log: list[tuple[str, object]] = field(default_factory=list)

    SETTINGS = ("power_limit", "locked_clocks", "applications_clocks")

    FIELDS = ("power_instant", "power_usage", "energy", "gpu_temp", "mem_temp", "sm_clock", "mem_clock",
              "util", "memory", "clock_events", "throttle_reasons")  # fmt: skip

    def __post_init__(self) -> None:
        self._origin = self.clock()
        self._times = [-math.inf]
        self._powers = [float(self.power_w)]
        self._settings = self.default_settings()

    def default_settings(self) -> dict:
        return {"power_limit_mw": int(self.default_power_limit_w * 1000), "locked_clocks": None,
                "applications_clocks": None}  # fmt: skip

    @property
    def settings(self) -> dict:
        """power_limit_mw, locked_clocks (min, max) or None, applications_clocks (mem, graphics) or None."""
        if self.state_path is not None and Path(self.state_path).exists():
            stored = json.loads(Path(self.state_path).read_text())
            return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        return dict(self._settings)

    def change(self, setting: str, value) -> None:
        """Apply one setting as NVML would: NoPermission when refused, InvalidArgument out of range."""
        assert setting in self.SETTINGS, setting
        if setting in self.refuse:
            raise NVMLError_NoPermission()
        low_w, high_w = self.power_limit_range_w
        if setting == "power_limit" and value is not None and not low_w * 1000 <= value <= high_w * 1000:
            raise NVMLError_InvalidArgument()
        if setting == "locked_clocks" and value is not None and (value[0] > value[1] or value[1] > max(self.graphics_clocks_mhz)):
            raise NVMLError_InvalidArgument()
        if setting == "applications_clocks" and value is not None and (
                value[0] not in self.memory_clocks_mhz or value[1] not in self.graphics_clocks_mhz):
            raise NVMLError_InvalidArgument()
        settings = self.settings
        key = "power_limit_mw" if setting == "power_limit" else setting
        if key == "power_limit_mw" and value is None:
            value = int(self.default_power_limit_w * 1000)
        if key == "applications_clocks" and value == self.default_applications_clocks_mhz:
            value = None  # the defaults are the GPU's own, as after a reset
        settings[key] = value
        self.settings_log.append((setting, value))
        if self.state_path is not None:
            Path(self.state_path).write_text(json.dumps(settings))
        else:
            self._settings = settings

    def clock_cap_mhz(self) -> float:
        """The highest SM clock the settings allow (locked clocks win over application clocks)."""
        settings = self.settings
        if settings["locked_clocks"] is not None:
            return float(settings["locked_clocks"][1])
        if settings["applications_clocks"] is not None:
            return float(settings["applications_clocks"][1])
        return float(max(self.graphics_clocks_mhz))

    @property
    def power_limit_w(self) -> float:
        return self.settings["power_limit_mw"] / 1000

    def set_power(self, power_w: float, at_s: float | None = None) -> None:
        """Draw power_w from at_s (default: now) on; times must not go backwards."""
        at_s = self.clock() if at_s is None else at_s
        if at_s < self._times[-1]:
            raise ValueError("set_power times must not go backwards")
        self._times.append(at_s)
        self._powers.append(float(power_w))

    def power_at(self, t: float) -> float:
        return self._powers[bisect.bisect_right(self._times, t) - 1]

    def energy_j_until(self, t: float) -> float:
        """The exact integral of the power script from when the GPU was made to t."""
        bounds = [self._origin, *self._times[1:], math.inf]
        energy_j = 0.0
        for i, power_w in enumerate(self._powers):
            start, end = bounds[i], min(bounds[i + 1], t)
            energy_j += power_w * max(end - start, 0.0)
        return energy_j

    def read(self, name: str):
        """The value of a field now, or NVMLError_NotSupported when switched off."""
        assert name in self.FIELDS, name
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.unsupported:
            raise NVMLError_NotSupported()
        t = self.clock()
        if name == "energy":
            if self.counter_period_s:
                t = math.floor(t / self.counter_period_s) * self.counter_period_s
            return self.counter_offset_mj + int(round(self.energy_j_until(t) * 1000))
        return {
            "power_instant": lambda: int(round(self.power_at(t) * 1000)),
            "power_usage": lambda: int(round(self.power_at(t) * 1000)),
            "gpu_temp": lambda: round(self.temp_c(t)),
            "mem_temp": lambda: round(self.mem_temp_c(t)),
            "sm_clock": lambda: round(self.sm_clock_mhz(t)),
            "mem_clock": lambda: int(self.mem_clock_mhz),
            "util": lambda: types.SimpleNamespace(gpu=int(self.util_pct), memory=0),
            "memory": lambda: types.SimpleNamespace(total=80 << 30, used=self.mem_used_bytes, free=0),
            "clock_events": lambda: int(self.clock_events(t)),
            "throttle_reasons": lambda: int(self.clock_events(t)),
        }[name]()


def make_pynvml(gpus: list[FakeGpu], init_error: int | None = None, clock_events_api: bool = True) -> types.ModuleType:
    """A module object with the pynvml names the workbench uses, backed by `gpus` (NVML index order)."""
    module = types.ModuleType("pynvml")
    for name, value in globals().items():
        if name.startswith(("NVML_", "NVMLError")):
            setattr(module, name, value)
    vars(module).update(NVML_TEMPERATURE_GPU=0, NVML_CLOCK_GRAPHICS=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
                        NVML_FI_DEV_MEMORY_TEMP=82, NVML_FI_DEV_POWER_INSTANT=186)  # fmt: skip
    state = {"initialised": 0, "shutdowns": 0}
    module.state = state

    def device(handle) -> FakeGpu:
        if not state["initialised"]:
            raise NVMLError_Uninitialized()
        return handle

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        state["initialised"] += 1

    def shutdown() -> None:
        if not state["initialised"]:
            raise NVMLError_Uninitialized()
        state["initialised"] -= 1
        state["shutdowns"] += 1

    def handle_by_index(index: int) -> FakeGpu:
        if not state["initialised"]:
            raise NVMLError_Uninitialized()
        if not 0 <= index < len(gpus):
            raise NVMLError_InvalidArgument()
        return gpus[index]

    field_names = {module.NVML_FI_DEV_POWER_INSTANT: "power_instant", module.NVML_FI_DEV_MEMORY_TEMP: "mem_temp"}

    def field_values(handle, field_ids):
        values = []
        for field_id in field_ids:
            try:
                number, code = device(handle).read(field_names[field_id]), NVML_SUCCESS
            except NVMLError as error:
                number, code = 0, error.value
            value = types.SimpleNamespace(uiVal=number)  # valueType 1: NVML_VALUE_TYPE_UNSIGNED_INT
            values.append(types.SimpleNamespace(fieldId=field_id, scopeId=0, valueType=1, nvmlReturn=code, value=value))
        return values

    module.nvmlInit = init
    module.nvmlShutdown = shutdown
    module.nvmlDeviceGetCount = lambda: len([handle_by_index(i) for i in range(len(gpus))])
    module.nvmlDeviceGetHandleByIndex = handle_by_index
    module.nvmlDeviceGetUUID = lambda h: device(h).uuid
    module.nvmlDeviceGetName = lambda h: device(h).name
    module.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=device(h).pci_bus_id.encode())
    module.nvmlDeviceGetFieldValues = field_values
    module.nvmlDeviceGetPowerUsage = lambda h: device(h).read("power_usage")
    module.nvmlDeviceGetTotalEnergyConsumption = lambda h: device(h).read("energy")
    module.nvmlDeviceGetTemperature = lambda h, sensor: device(h).read("gpu_temp")
    module.nvmlDeviceGetClockInfo = lambda h, kind: device(h).read("sm_clock" if kind == 1 else "mem_clock")
    module.nvmlDeviceGetUtilizationRates = lambda h: device(h).read("util")
    module.nvmlDeviceGetMemoryInfo = lambda h: device(h).read("memory")
    module.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: device(h).read("throttle_reasons")
    def setting(name: str, handle, value) -> None:
        if "settings" in device(handle).unsupported:
            raise NVMLError_NotSupported()
        device(handle).change(name, value)

    low_high = lambda h: tuple(int(w * 1000) for w in device(h).power_limit_range_w)  # noqa: E731
    module.nvmlDeviceGetPowerManagementLimitConstraints = low_high
    module.nvmlDeviceGetPowerManagementLimit = lambda h: device(h).settings["power_limit_mw"]
    module.nvmlDeviceGetPowerManagementDefaultLimit = lambda h: int(device(h).default_power_limit_w * 1000)
    module.nvmlDeviceGetEnforcedPowerLimit = lambda h: device(h).settings["power_limit_mw"]
    module.nvmlDeviceSetPowerManagementLimit = lambda h, limit_mw: setting("power_limit", h, int(limit_mw))
    module.nvmlDeviceGetSupportedMemoryClocks = lambda h: list(device(h).memory_clocks_mhz)
    module.nvmlDeviceGetSupportedGraphicsClocks = lambda h, mem_mhz: (
        list(device(h).graphics_clocks_mhz) if mem_mhz in device(h).memory_clocks_mhz else _raise(NVMLError_InvalidArgument()))
    module.nvmlDeviceSetGpuLockedClocks = lambda h, low, high: setting("locked_clocks", h, (int(low), int(high)))
    module.nvmlDeviceResetGpuLockedClocks = lambda h: setting("locked_clocks", h, None)
    module.nvmlDeviceSetApplicationsClocks = lambda h, mem, gr: setting("applications_clocks", h, (int(mem), int(gr)))
    module.nvmlDeviceResetApplicationsClocks = lambda h: setting("applications_clocks", h, None)
    module.nvmlDeviceGetApplicationsClock = lambda h, kind: (
        device(h).settings["applications_clocks"] or device(h).default_applications_clocks_mhz)[0 if kind == 2 else 1]
    if clock_events_api:
        module.nvmlDeviceGetCurrentClocksEventReasons = lambda h: device(h).read("clock_events")
    return module


def _raise(error: Exception):
    raise error
