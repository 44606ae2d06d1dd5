"""Energy per training step and epoch: NVML windows on rank 0 with --profile, stored with the run at the end."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ContextManager, Iterator

import torch

from triton_workbench.database import SeriesTable
from triton_workbench.workbench.train_recorder import TrainRecorder


@dataclass
class MeasuredEnergy:
    """The energy of one closed window (NaN without power data)."""

    energy_j: float = math.nan


class EnergyWindows:
    """NVML windows per step and per epoch (when enabled); says plainly when there is no power data."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.sampler = None
        if not enabled:
            return
        from triton_workbench.profiler import NvmlSampler

        sampler = NvmlSampler(device=device.index or 0)
        if not sampler.available:
            print(f"profile: no power data exists on this machine ({sampler.reason}); training anyway")
            return
        self.sampler = sampler.start()

    def step(self, step: int) -> ContextManager[MeasuredEnergy]:
        """The window of training step `step`."""
        return self._window(f"step {step}")

    def epoch(self, epoch: int) -> ContextManager[MeasuredEnergy]:
        """The window of epoch `epoch`."""
        return self._window(f"epoch {epoch}")

    @contextmanager
    def _window(self, name: str) -> Iterator[MeasuredEnergy]:
        measured = MeasuredEnergy()
        if self.sampler is None:
            yield measured
            return
        with self.sampler.window(name) as record:
            yield measured
        measured.energy_j = self.sampler.window_stats(record).energy_j

    def close(self, recorder: TrainRecorder | None) -> None:
        """Stop sampling and store the windows and the samples with the run."""
        if self.sampler is None:
            return
        self.sampler.stop()
        if recorder is not None:
            recorder.append(SeriesTable.WINDOWS, self.sampler.windows())
            recorder.append(SeriesTable.SAMPLES, self.sampler.frame())
        self.sampler = None
