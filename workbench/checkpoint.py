"""Training checkpoints: written atomically (temp file, then `os.replace`), read with `weights_only=True`.

A checkpoint holds only tensors, numbers, strings, lists and dicts (model, optimizer and grad-scaler
state, RNG states, progress counters, the database run id), so loading one never unpickles code.
`training_state` builds one; `restore_training` resumes from one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.train_config import TrainConfig

log = logging.getLogger("triton_workbench.workbench.train")

CHECKPOINT_NAME = "checkpoint.pt"
# Settings a resumed run must share with its checkpoint (others, like epochs or steps, may change).
RESUME_MUST_MATCH = ("model", "data", "kernels", "batch_size", "amp", "seed")


@dataclass
class Progress:
    """Where training stands: saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0  # batches of `epoch` already done
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` so that a crash leaves either the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved at `path` (tensors mapped to the CPU)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """The torch CPU and CUDA generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameters_sha256(module: nn.Module) -> str:
    """A checksum of every parameter's float32 bytes, in registration order (equal models, equal sums)."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_state(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    run_id: int,
) -> dict[str, Any]:
    """What a checkpoint holds: all that `restore_training` needs, plus the parameters' checksum."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "progress": asdict(progress),
        "run_id": run_id,
        "config": config.recorded(),
        "parameters_sha256": parameters_sha256(model),
    }


def restore_training(
    path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[Progress, int | None]:
    """Load the checkpoint at `path` into model, optimizer, scaler and RNGs; return its progress and database run id.

    Raises ValueError when a setting of `RESUME_MUST_MATCH` differs between `config` and the checkpoint.
    """
    state = load_checkpoint(path)
    saved = state["config"]
    differing = [key for key in RESUME_MUST_MATCH if saved.get(key) != getattr(config, key)]
    if differing:
        details = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {getattr(config, key)!r}" for key in differing)
        raise UsageError(f"cannot resume from {path}: settings differ ({details})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    log.info("resumed from %s at step %d (epoch %d)", path, progress.global_step, progress.epoch)
    return progress, state.get("run_id")
