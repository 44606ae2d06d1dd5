"""Where a measurement was taken: the device, its limits and the software versions.

Recorded once per run in the database (`Database.start_run`), and the device part keys every
tuning result (`autotune.results.TuningKey`), so a config tuned on one GPU (or in the
interpreter) is never taken for one tuned on another. It lives beside the database, below
autotune and profiler, because every kind of run records it.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import torch
import triton

from triton_workbench.kernels import hardware, runtime

INTERPRETER_DEVICE = "no GPU: Triton interpreter"


@dataclass(frozen=True)
class DeviceKey:
    """The part of the environment that a tuned config depends on."""

    device: str  # GPU name, or INTERPRETER_DEVICE
    capability: str  # "9.0"; "" in the interpreter
    triton_version: str
    torch_version: str


@functools.cache
def device_key() -> DeviceKey:
    """This process's DeviceKey (cached: the device does not change while a process runs)."""
    if runtime.INTERPRETER or not torch.cuda.is_available():
        return DeviceKey(INTERPRETER_DEVICE, "", triton.__version__, torch.__version__)
    major, minor = torch.cuda.get_device_capability()
    return DeviceKey(torch.cuda.get_device_name(), f"{major}.{minor}", triton.__version__, torch.__version__)


@functools.cache
def device_limits() -> dict[str, int]:
    """Per-block limits used to reject configs before they run: shared memory and registers.

    On a GPU they come from the device, or where it does not say from `kernels.hardware`'s table (its
    architecture, else the interpreter's target); in the interpreter from `hardware.INTERPRETER_TARGET`,
    the sm_90 target that configs are compiled for ahead of time (227 KiB opt-in shared memory per block,
    64 Ki registers per SM).
    """
    target = hardware.INTERPRETER_TARGET
    if device_key().device != INTERPRETER_DEVICE:
        target = hardware.architecture(device_key().capability) or target
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        shared = getattr(props, "shared_memory_per_block_optin", 0) or target.shared_bytes_per_block
        registers = getattr(props, "regs_per_multiprocessor", 0) or target.registers_per_sm
        return {"shared_bytes": int(shared), "registers_per_sm": int(registers),
                "registers_per_thread": target.registers_per_thread}
    return {"shared_bytes": target.shared_bytes_per_block, "registers_per_sm": target.registers_per_sm,
            "registers_per_thread": target.registers_per_thread}


def _nvml_facts() -> dict[str, Any]:
    """Driver, power limit and clocks from NVML; empty when NVML or a GPU is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    facts: dict[str, Any] = {}
    try:
        facts["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        facts["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
        facts["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        facts["max_mem_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return facts


@functools.cache
def _environment() -> tuple[tuple[str, Any], ...]:
    key = device_key()
    env: dict[str, Any] = {
        "gpu": key.device,
        "compute_capability": key.capability or None,
        "interpreter": key.device == INTERPRETER_DEVICE,
        "cuda": torch.version.cuda,
        "triton": key.triton_version,
        "torch": key.torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "driver": None,
        "power_limit_w": None,
        "max_sm_clock_mhz": None,
        "max_mem_clock_mhz": None,
    }
    if not env["interpreter"]:
        env.update(_nvml_facts())
    return tuple(env.items())


def environment() -> dict[str, Any]:
    """The device and software this process measures on (None where unknown)."""
    return dict(_environment())
