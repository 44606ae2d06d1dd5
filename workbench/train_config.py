"""What `workbench train` is asked to do (`TrainConfig`, checked by `validate`) and what it reports (`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from triton_workbench.kernels import runtime
from triton_workbench.kernels.errors import UsageError

KERNEL_CHOICES = ("triton", "torch")
AMP_CHOICES = ("off", "fp16", "bf16")


def power_limit_eta(power_limit: str | None) -> float | None:
    """eta of --power-limit auto[:ETA] (0.5 for plain auto); None when the limit is left alone; UsageError else."""
    if power_limit is None:
        return None
    head, _, eta = power_limit.partition(":")
    try:
        value = float(eta) if eta else 0.5
    except ValueError:
        value = math.nan
    if head != "auto" or not 0 <= value <= 1:
        raise UsageError(f"--power-limit must be auto or auto:ETA with 0 <= ETA <= 1 (1: least energy, "
                         f"0: least time), got {power_limit!r}")  # fmt: skip
    return value


@dataclass
class TrainConfig:
    """What to train and how; mirrors the `workbench train` options."""

    out_dir: Path
    model: str = "resnet"
    data: str = "digits"
    data_dir: str | None = None
    kernels: str = "triton"
    epochs: int = 1
    batch_size: int = 64  # per process
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    amp: str = "off"
    seed: int = 0
    steps: int | None = None  # stop after this many steps in all (for smoke runs)
    db_path: str | None = None
    resume: bool = False
    trace: bool = False
    profile: bool = False
    power_limit: str | None = None  # "auto" or "auto:ETA": choose the GPU's power limit (profiler.power_limit_optimizer)
    checkpoint_every: int = 20  # steps between checkpoints (and database flushes)
    eval_images: int | None = None  # evaluate on the first N held-out images only (smoke runs); None: all
    progress: bool = True

    def validate(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise UsageError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.amp not in AMP_CHOICES:
            raise UsageError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        power_limit_eta(self.power_limit)  # UsageError on a bad --power-limit
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.amp == "bf16" and self.kernels == "triton" and runtime.INTERPRETER:
            raise UsageError(
                "amp bf16 is not possible with --kernels triton here: Triton's interpreter has no bfloat16 "
                "(use --amp fp16 or off, or --kernels torch, or a GPU)"
            )

    def recorded(self) -> dict[str, Any]:
        """The settings as plain JSON values (run meta, checkpoint)."""
        values = asdict(self)
        values["out_dir"] = str(self.out_dir)
        return values


@dataclass
class TrainResult:
    """What a run did; ranks other than 0 get no run id and empty frames."""

    run_id: int | None
    steps: pd.DataFrame  # the train_steps rows of this process's run (rank 0), including resumed ones
    epochs: pd.DataFrame
    global_step: int
    final_eval_loss: float
    final_eval_accuracy: float
    parameters_sha256: str
    checkpoint_path: Path
    interrupted: bool = False
    skipped_modules: list[str] = field(default_factory=list)
