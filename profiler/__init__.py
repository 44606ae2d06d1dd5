"""NVML sampling, measurement windows and energy per call.

    from triton_workbench.profiler import NvmlSampler, energy_meter, measure_energy
    with NvmlSampler(device=0, interval_s=0.01) as sampler:
        with sampler.window("step 1"):
            ...
        result = measure_energy(lambda: kernel(x), sampler, "gemm 512", synchronize=torch.cuda.synchronize)
        meter = energy_meter(sampler, synchronize=torch.cuda.synchronize)  # meter(name, fn) -> an EnergyStats too
    sampler.frame(), sampler.windows()

See profiler/README.md for what NVML can and cannot measure and why the defaults are what they are.
"""

from triton_workbench.profiler.energy import (DEFAULT_MIN_WINDOW_S, ENERGY_RESULT_KEYS, EnergyStats, cool_down,
                                              energy_meter, measure_energy)
from triton_workbench.profiler.nvml_sampler import SAMPLE_COLUMNS, NvmlSampler, WindowMark
from triton_workbench.profiler.windows import WINDOW_COLUMNS, WindowStats, window_stats

__all__ = [
    "DEFAULT_MIN_WINDOW_S", "ENERGY_RESULT_KEYS", "SAMPLE_COLUMNS", "WINDOW_COLUMNS",
    "EnergyStats", "NvmlSampler", "WindowMark", "WindowStats", "cool_down", "energy_meter", "measure_energy",
    "window_stats",
]  # fmt: skip
