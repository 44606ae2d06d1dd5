"""Energy per training step and epoch: NVML windows on rank 0 with --profile, stored with the run at the end.

With --power-limit auto[:eta] the step windows also drive the power-limit optimiser
(profiler.power_limit_optimizer): each step runs at the limit it asks for, its window's duration and energy
are its profile, and the chosen limit is held until the run ends, when the GPU's own limit is put back
(profiler.device_settings). The profile and the choice are stored as the run's power_limit_profile rows.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import ContextManager, Iterator

import pandas as pd
import torch

from triton_workbench.database import SeriesTable
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
        if not enabled:
            return
        from triton_workbench.profiler import NvmlSampler

        sampler = NvmlSampler(device=device.index or 0)
        if not sampler.available:
            print(f"profile: no power data exists on this machine ({sampler.reason}); training anyway")
            return
        self.sampler = sampler.start()
        if power_limit_eta is not None:
            self._start_optimizer(device.index or 0, power_limit_eta)

    def _start_optimizer(self, device: int, eta: float) -> None:
        from triton_workbench.profiler.device_settings import POWER_LIMIT, DeviceKnobs
        from triton_workbench.profiler.power_limit_optimizer import PowerLimitOptimizer

        knobs = DeviceKnobs(device, power_limits=POWER_LIMIT_CANDIDATES, sm_clocks=0).__enter__()
        if POWER_LIMIT not in knobs.params:
            print(f"--power-limit: {' '.join(knobs.notes)}; training at the current limit")
            knobs.__exit__(None, None, None)
            return
        self.knobs, self.optimizer = knobs, PowerLimitOptimizer(knobs.params[POWER_LIMIT], eta)
        print(f"--power-limit auto:{eta:g}: profiling limits {', '.join(f'{w:g} W' for w in self.optimizer.limits_w)}")

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
            self.knobs.apply({"power_limit_w": self.optimizer.limit_for_step()})
        with self.sampler.window(name) as record:
            yield measured
        stats = self.sampler.window_stats(record)
        measured.energy_j = stats.energy_j
        if choosing and (choice := self.optimizer.observe(stats.duration_s, stats.energy_j)) is not None:
            self.knobs.apply({"power_limit_w": choice.power_limit_w})
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
        """Stop sampling, put the power limit back, and store the windows, samples and limit profile with the run."""
        if self.knobs is not None:
            self.knobs.__exit__(None, None, None)
            self.knobs = None
        if self.sampler is None:
            return
        self.sampler.stop()
        if recorder is not None:
            recorder.append(SeriesTable.WINDOWS, self.sampler.windows())
            recorder.append(SeriesTable.SAMPLES, self.sampler.frame())
            if self.optimizer is not None and self.optimizer.choice is None:
                print("--power-limit: the run ended before every limit was profiled; nothing chosen")
            elif not (profile := self.profile()).empty:
                recorder.append(SeriesTable.POWER_LIMIT_PROFILE, profile)
        self.sampler = None
