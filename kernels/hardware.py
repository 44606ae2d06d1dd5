"""The GPUs this project knows: per architecture limits and per model published peaks, in one table.

The compile checks (kernels/aot.py, the spaces' shared-memory constraints), the tuner (the limits a
config is rejected by before it runs, the split heuristics) and the reports (roofline ceilings, % of
peak) all read it. Numbers are vendor datasheets (dense peaks at boost clocks) and the CUDA C++
Programming Guide's per compute capability limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Architecture:
    """What every GPU of one compute capability shares."""

    capability: int
    """Compute capability as an integer: 90 for sm_90 (9.0)."""
    name: str
    """Architecture name, e.g. "Hopper"."""
    shared_bytes_per_block: int
    """Usable dynamic shared memory per block, the opt-in maximum (bytes)."""
    registers_per_sm: int = 64 * 1024
    """32-bit registers per SM."""
    registers_per_thread: int = 255
    """Most registers one thread may use."""

    @property
    def target(self) -> str:
        """The target name, e.g. "sm_90"."""
        return f"sm_{self.capability}"


@dataclass(frozen=True)
class GPU:
    """One GPU model: its architecture, SM count and published dense peaks."""

    name: str
    """Model name as the reports print it, e.g. "H100 SXM"."""
    pattern: str
    """Regular expression (case-insensitive) on the NVML/torch device name; see `gpu_by_name`."""
    architecture: Architecture
    sm_count: int
    """Streaming multiprocessors."""
    bandwidth_gbps: float
    """Memory bandwidth, GB/s."""
    compute_tflops: Mapping[str, float] = field(default_factory=dict)
    """Dense peak per precision: ceiling label ("FP32", "TF32 tensor", "FP16/BF16 tensor") -> TFLOP/s."""


VOLTA = Architecture(70, "Volta", shared_bytes_per_block=96 * 1024)
AMPERE_A100 = Architecture(80, "Ampere", shared_bytes_per_block=163 * 1024)
AMPERE = Architecture(86, "Ampere", shared_bytes_per_block=99 * 1024)
ADA = Architecture(89, "Ada Lovelace", shared_bytes_per_block=99 * 1024)
HOPPER = Architecture(90, "Hopper", shared_bytes_per_block=227 * 1024)

ARCHITECTURES: Mapping[int, Architecture] = {
    arch.capability: arch for arch in (VOLTA, AMPERE_A100, AMPERE, ADA, HOPPER)
}

COMPILE_TARGETS: tuple[int, ...] = (80, 90)
"""What configs are compiled for ahead of time (`workbench check-compile`); the smallest shared memory
among them bounds the kernels' spaces."""

INTERPRETER_TARGET: Architecture = HOPPER
"""Whose limits reject configs in the interpreter, where no device has any: the sm_90 compile target."""

_AMPERE_PEAKS = {"FP32": 19.5, "TF32 tensor": 156.0, "FP16/BF16 tensor": 312.0}
_HOPPER_SXM_PEAKS = {"FP32": 67.0, "TF32 tensor": 494.7, "FP16/BF16 tensor": 989.4}

H200 = GPU("H200 SXM", r"H200", HOPPER, 132, 4800, _HOPPER_SXM_PEAKS)
H100_PCIE = GPU("H100 PCIe", r"H100.*PCIe", HOPPER, 114, 2000,
                {"FP32": 51.2, "TF32 tensor": 378.0, "FP16/BF16 tensor": 756.0})
H100_SXM = GPU("H100 SXM", r"H100", HOPPER, 132, 3350, _HOPPER_SXM_PEAKS)
A100_80GB_PCIE = GPU("A100 80GB PCIe", r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", AMPERE_A100, 108, 1935, _AMPERE_PEAKS)
A100_80GB_SXM = GPU("A100 80GB SXM", r"A100.*80GB", AMPERE_A100, 108, 2039, _AMPERE_PEAKS)
A100_40GB = GPU("A100 40GB", r"A100", AMPERE_A100, 108, 1555, _AMPERE_PEAKS)
L40S = GPU("L40S", r"L40S", ADA, 142, 864, {"FP32": 91.6, "TF32 tensor": 183.0, "FP16/BF16 tensor": 362.0})
L4 = GPU("L4", r"\bL4\b", ADA, 58, 300, {"FP32": 30.3, "TF32 tensor": 60.0, "FP16/BF16 tensor": 121.0})
A10 = GPU("A10", r"\bA10\b", AMPERE, 72, 600, {"FP32": 31.2, "TF32 tensor": 62.5, "FP16/BF16 tensor": 125.0})
V100_SXM2 = GPU("V100 SXM2", r"V100", VOLTA, 80, 900, {"FP32": 15.7, "FP16 tensor": 125.0})

GPUS: tuple[GPU, ...] = (H200, H100_PCIE, H100_SXM, A100_80GB_PCIE, A100_80GB_SXM, A100_40GB, L40S, L4, A10, V100_SXM2)
"""Every known model, in matching order: the first whose pattern matches a device name wins."""


def capability_number(capability: int | str | tuple[int, int]) -> int:
    """90 from 90, "9.0", "sm_90", "90" or (9, 0)."""
    if isinstance(capability, tuple):
        major, minor = capability
        return 10 * major + minor
    if isinstance(capability, int):
        return capability
    text = capability.strip().lower().removeprefix("sm_")
    match = re.fullmatch(r"(\d+)\.(\d)|(\d+)", text)
    if match is None:
        raise ValueError(f"not a compute capability: {capability!r} (expected e.g. 90, '9.0' or 'sm_90')")
    return 10 * int(match[1]) + int(match[2]) if match[1] else int(match[3])


def architecture(capability: int | str | tuple[int, int]) -> Architecture | None:
    """The architecture of a compute capability (90, "9.0", "sm_90", (9, 0)); None when not in the table."""
    return ARCHITECTURES.get(capability_number(capability))


def gpu_by_name(device_name: str | None) -> GPU | None:
    """The known model of a GPU by its (NVML/torch) device name, or None when it is not in the table."""
    if not device_name:
        return None
    for gpu in GPUS:
        if re.search(gpu.pattern, device_name, flags=re.IGNORECASE):
            return gpu
    return None


def gpus_of(capability: int | str | tuple[int, int]) -> tuple[GPU, ...]:
    """The known models of one compute capability."""
    number = capability_number(capability)
    return tuple(gpu for gpu in GPUS if gpu.architecture.capability == number)
