"""The GPUs this project knows: per architecture limits and per model published peaks, in one table.

The compile checks (kernels/aot.py, the spaces' shared-memory constraints), the tuner (the limits a
config is rejected by before it runs, the split heuristics), the reports (roofline ceilings, % of
peak) and the static ceilings of compiled code (kernels/ceilings.py, `workbench inspect`) all read it.
Numbers are vendor datasheets (dense peaks at boost clocks), the architecture whitepapers (tensor-core
rates per SM) and the CUDA C++ Programming Guide's per compute capability limits.
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
    shared_bytes_per_sm: int = 0
    """Shared memory of one SM, for all its resident blocks (bytes)."""
    shared_bytes_reserved_per_block: int = 1024
    """Shared memory the system takes per resident block beside the kernel's own (1 KiB from sm_80 on)."""
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    schedulers_per_sm: int = 4
    """Warp schedulers per SM: each issues at most one instruction per clock."""
    tensor_fma_per_clock: Mapping[str, int] = field(default_factory=dict)
    """Dense tensor-core multiply-adds per clock per SM, by MMA input type ("fp16", "bf16", "tf32"): the rate behind
    the published peaks, peak = 2 x rate x SMs x boost clock (H100 SXM: 2 x 2048 x 132 x 1.83 GHz = 989.4
    TFLOP/s fp16; A100: 2 x 1024 x 108 x 1.41 GHz = 312)."""

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


VOLTA = Architecture(70, "Volta", shared_bytes_per_block=96 * 1024, shared_bytes_per_sm=96 * 1024,
                     shared_bytes_reserved_per_block=0, tensor_fma_per_clock={"fp16": 512})
AMPERE_A100 = Architecture(80, "Ampere", shared_bytes_per_block=163 * 1024, shared_bytes_per_sm=164 * 1024,
                           tensor_fma_per_clock={"fp16": 1024, "bf16": 1024, "tf32": 512})
AMPERE = Architecture(86, "Ampere", shared_bytes_per_block=99 * 1024, shared_bytes_per_sm=100 * 1024,
                      max_warps_per_sm=48, max_blocks_per_sm=16,
                      tensor_fma_per_clock={"fp16": 512, "bf16": 512, "tf32": 256})
ADA = Architecture(89, "Ada Lovelace", shared_bytes_per_block=99 * 1024, shared_bytes_per_sm=100 * 1024,
                   max_warps_per_sm=48, max_blocks_per_sm=24,
                   tensor_fma_per_clock={"fp16": 512, "bf16": 512, "tf32": 256})
HOPPER = Architecture(90, "Hopper", shared_bytes_per_block=227 * 1024, shared_bytes_per_sm=228 * 1024,
                      tensor_fma_per_clock={"fp16": 2048, "bf16": 2048, "tf32": 1024})

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

REFERENCE_GPUS: Mapping[int, GPU] = {80: A100_80GB_SXM, 90: H100_SXM}
"""The model a compile target's static ceilings (`workbench inspect`) are computed for unless another is named:
the H100 SXM for sm_90 (what the split heuristics size for), the A100 80GB SXM for sm_80."""


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


def reference_gpu(capability: int | str | tuple[int, int]) -> GPU | None:
    """`REFERENCE_GPUS`' model of a compute capability, else its first known model; None when none is known."""
    number = capability_number(capability)
    return REFERENCE_GPUS.get(number) or next(iter(gpus_of(number)), None)


def peak_label(dtype: str, tf32: bool = False) -> str:
    """Which of a GPU's `compute_tflops` bounds a problem of this element type ("fp32", "fp16", "bf16"): the
    tensor cores' fp16/bf16 peak, TF32's for fp32 with TF32 on, else plain FP32."""
    if dtype in ("fp16", "bf16"):
        return "FP16/BF16 tensor"
    return "TF32 tensor" if tf32 else "FP32"
