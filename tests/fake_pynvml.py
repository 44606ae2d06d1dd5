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
"""

from __future__ import annotations

import bisect
import math
import time
import types
from dataclasses import dataclass, field
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

    FIELDS = ("power_instant", "power_usage", "energy", "gpu_temp", "mem_temp", "sm_clock", "mem_clock",
              "util", "memory", "clock_events", "throttle_reasons")  # fmt: skip

    def __post_init__(self) -> None:
        self._origin = self.clock()
        self._times = [-math.inf]
        self._powers = [float(self.power_w)]

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
    vars(module).update(NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_FI_DEV_MEMORY_TEMP=82,
                        NVML_FI_DEV_POWER_INSTANT=186)  # fmt: skip
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
    if clock_events_api:
        module.nvmlDeviceGetCurrentClocksEventReasons = lambda h: device(h).read("clock_events")
    return module
