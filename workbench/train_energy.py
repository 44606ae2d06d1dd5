"""Energy per training step and epoch: NVML windows on rank 0 with --profile, stored with the run at the end.

With --power-limit auto[:eta] the step windows also drive the power-limit optimiser
(profiler.power_limit_optimizer): each step runs at the limit it asks for, its window's duration and energy
are its profile, and the chosen limit is held until the run ends, when the GPU's own limit is put back
(profiler.device_settings). The profile and the choice are stored as the run's power_limit_profile rows.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import ContextManager, Iterator

import pandas as pd
import torch

from triton_workbench.database import SeriesTable
from triton_workbench.profiler.device_settings import POWER_LIMIT
from triton_workbench.workbench.train_recorder import TrainRecorder

POWER_LIMIT_CANDIDATES = 4  # limits spread over the GPU's range, its current one included


@dataclass
class MeasuredEnergy:
    """The energy of one closed window (NaN without power data)."""

    energy_j: float = math.nan


class EnergyWindows:
    """NVML windows per step and per epoch (when enabled); says plainly when there is no power data.

    power_limit_eta: run the power-limit optimiser with this eta (None: leave the limit alone)."""

    def __init__(self, enabled: bool, device: torch.device, power_limit_eta: float | None = None) -> None:
        self.sampler = self.knobs = self.optimizer = None
        self._open = ExitStack()  # the sampler, then the device knobs: closed in reverse
        if not enabled:
            return
        from triton_workbench.profiler import NvmlSampler

        sampler = NvmlSampler(device=device.index or 0)
        if not sampler.available:
            print(f"profile: no power data exists on this machine ({sampler.reason}); training anyway")
            return
        with ExitStack() as opening:  # a failure to take the knobs stops the sampler again
            self.sampler = opening.enter_context(sampler)
            if power_limit_eta is not None:
                self._start_optimizer(opening, device.index or 0, power_limit_eta)
            self._open = opening.pop_all()

    def _start_optimizer(self, opening: ExitStack, device: int, eta: float) -> None:
        from triton_workbench.profiler.device_settings import DeviceKnobs
        from triton_workbench.profiler.power_limit_optimizer import PowerLimitOptimizer

        self.knobs = opening.enter_context(DeviceKnobs(device, power_limits=POWER_LIMIT_CANDIDATES, sm_clocks=0))
        if POWER_LIMIT not in self.knobs.params:
            self._stop_optimizer(f"{' '.join(self.knobs.notes)}; training at the current limit")
            return
        self.optimizer = PowerLimitOptimizer(self.knobs.params[POWER_LIMIT], eta)
        print(f"--power-limit auto:{eta:g}: profiling limits {', '.join(f'{w:g} W' for w in self.optimizer.limits_w)}")

    def _stop_optimizer(self, why: str) -> None:
        """Give the GPU its own limit back now and train on without choosing one (idempotent exit of the knobs)."""
        self.knobs.__exit__(None, None, None)
        self.optimizer = None
        print(f"--power-limit: {why}")

    def step(self, step: int) -> ContextManager[MeasuredEnergy]:
        """The window of training step `step` (run at the optimiser's limit while it chooses)."""
        return self._window(f"step {step}", profiled=True)

    def epoch(self, epoch: int) -> ContextManager[MeasuredEnergy]:
        """The window of epoch `epoch`."""
        return self._window(f"epoch {epoch}")

    @contextmanager
    def _window(self, name: str, profiled: bool = False) -> Iterator[MeasuredEnergy]:
        measured = MeasuredEnergy()
        if self.sampler is None:
            yield measured
            return
        choosing = profiled and self.optimizer is not None and self.optimizer.choice is None
        if choosing:
            self.knobs.apply({POWER_LIMIT: self.optimizer.limit_for_step()})
        with self.sampler.window(name) as record:
            yield measured
        stats = self.sampler.window_stats(record)
        measured.energy_j = stats.energy_j
        if not choosing:
            return
        try:
            choice = self.optimizer.observe(stats.duration_s, stats.energy_j)
        except ValueError as error:  # no energy from NVML: nothing to choose by
            self._stop_optimizer(f"{error}; not choosing a limit, the GPU's own is back and training goes on")
            return
        if choice is not None:
            self.knobs.apply({POWER_LIMIT: choice.power_limit_w})
            print(f"--power-limit: holding {choice.power_limit_w:g} W for the rest of the run (eta {choice.eta:g})")

    def profile(self) -> pd.DataFrame:
        """The optimiser's profile, one row per limit with `chosen` marked (empty before it chose)."""
        if self.optimizer is None or self.optimizer.choice is None:
            return pd.DataFrame()
        choice = self.optimizer.choice
        frame = pd.DataFrame([asdict(p) for p in choice.profile])
        frame["chosen"] = frame["power_limit_w"] == choice.power_limit_w
        frame["eta"], frame["max_power_w"] = choice.eta, choice.max_power_w
        return frame

    def close(self, recorder: TrainRecorder | None) -> None:
        """Put the power limit back, stop sampling, and store the windows, samples and limit profile with the run."""
        self._open.close()
        if self.sampler is None:
            return
        if recorder is not None:
            recorder.append(SeriesTable.WINDOWS, self.sampler.windows())
            recorder.append(SeriesTable.SAMPLES, self.sampler.frame())
            if self.optimizer is not None and self.optimizer.choice is None:
                print("--power-limit: the run ended before every limit was profiled; nothing chosen")
            elif not (profile := self.profile()).empty:
                recorder.append(SeriesTable.POWER_LIMIT_PROFILE, profile)
        self.sampler = None
