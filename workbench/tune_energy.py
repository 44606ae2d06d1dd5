"""The energy side of `workbench tune`: the energy meter of --profile, and the device knobs of
--power-limits / --sm-clocks (profiler.device_settings) as a block around the sweep."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from triton_workbench.autotune.objectives import Objective
from triton_workbench.kernels.errors import UsageError


def energy_meter_for(profile: bool, objective: str, remeasure_below_c: float | None = None):
    """(meter, sampler): profiler.measure_energy joined to autotune's EnergyMeter protocol.

    (None, None) without --profile, and also where NVML is absent and the objective is time: then
    the sweep goes on without energy, saying so. An energy objective without NVML is an error.
    """
    if not profile:
        return None, None
    import torch

    from triton_workbench.kernels import runtime
    from triton_workbench.profiler import NvmlSampler, energy_meter

    sampler = NvmlSampler()
    if not sampler.available:
        if Objective.parse(objective).needs_energy:
            raise UsageError(f"--objective {objective} needs NVML on a GPU: {sampler.reason}")
        print(f"--profile: no energy measurements ({sampler.reason}); tuning goes on by time")
        return None, None
    synchronize = torch.cuda.synchronize if runtime.timer_name() == "cuda_events" else (lambda: None)
    return energy_meter(sampler, remeasure_below_c, synchronize=synchronize), sampler


@contextmanager
def device_knobs(power_limits: int, sm_clocks: int, distributed) -> Iterator[Any]:
    """The GPU's power limit / SM clock as tuned parameters for the block (profiler.device_settings), or None:
    when neither is asked for, or none can be set here (said once; the sweep goes on without them)."""
    if not power_limits and not sm_clocks:
        yield None
        return
    if distributed is not None:
        raise UsageError("--power-limits / --sm-clocks set this process's GPU only: run them without torchrun")
    from triton_workbench.profiler.device_settings import DeviceKnobs

    with DeviceKnobs(power_limits=power_limits, sm_clocks=sm_clocks) as knobs:
        if knobs.params:
            print("device knobs: " + ", ".join(f"{name} {values}" for name, values in knobs.params.items()))
        yield knobs if knobs.params else None
