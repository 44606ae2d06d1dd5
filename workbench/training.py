"""The training flow: data, model, kernels swapped in, steps logged to the database, checkpoints, DDP.

One process or many (`torchrun --nproc-per-node N -m workbench train ...`: gloo on CPU, nccl on
GPU). Every rank trains on its `DistributedSampler` shard with gradients all-reduced by DDP; only
rank 0 writes the database, checkpoints, logs and the progress bar.

Resuming (`resume=True`) restores model, optimizer, grad scaler, RNG states and progress from
`out_dir/checkpoint.pt` and continues the same database run. Step rows are flushed to the
database just before each checkpoint; rows for steps the database already holds are not
written again, so a resumed run never duplicates a step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from triton_workbench.autotune.distributed import Distributed
from triton_workbench.database import RunStatus, SeriesTable
from triton_workbench.kernels import runtime
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.checkpoint import (
    CHECKPOINT_NAME,
    Progress,
    restore_training,
    save_checkpoint,
    training_state,
)
from triton_workbench.workbench.data import Dataset, load_dataset
from triton_workbench.workbench.evaluation import EVAL_BATCH_SIZE, evaluate
from triton_workbench.workbench.models import build_model
from triton_workbench.workbench.stop_request import StopRequest
from triton_workbench.workbench.tracing import StepTracer, record_trace
from triton_workbench.workbench.train_config import TrainConfig, TrainResult, power_limit_eta
from triton_workbench.workbench.train_distributed import (
    check_ranks_agree,
    epoch_batches,
    init_distributed,
    training_device,
)
from triton_workbench.workbench.train_energy import EnergyWindows
from triton_workbench.workbench.train_kernels import autocast, swap_kernels
from triton_workbench.workbench.train_recorder import TrainRecorder

TRACE_FILE = "trace.json"


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says; returns what happened (rank 0 holds the database rows)."""
    config.validate()
    distributed = init_distributed(config.kernels)
    if config.power_limit is not None and distributed.enabled:
        raise UsageError("--power-limit sets this process's GPU only, not every rank's: train without torchrun "
                         "to choose the power limit")  # fmt: skip
    if not distributed.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 alone logs; the others speak only of trouble
    device = training_device(config.kernels, distributed)
    if config.kernels == "triton":
        runtime.announce()
    dataset = load_dataset(config.data, config.data_dir)
    if config.eval_images is not None:
        dataset = replace(dataset, test=dataset.test.head(config.eval_images))
    checkpoint_path = Path(config.out_dir) / CHECKPOINT_NAME

    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.in_channels, dataset.num_classes, dataset.image_size).to(device)
    model, skipped = swap_kernels(model) if config.kernels == "triton" else (model, [])  # after init: same parameters
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    progress, resumed_run_id = Progress(), None
    if config.resume:
        progress, resumed_run_id = restore_training(checkpoint_path, config, model, optimizer, scaler)
    trained = model
    if distributed.enabled:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    recorder = TrainRecorder(config, resumed_run_id) if distributed.is_main else None
    energy = EnergyWindows((config.profile or config.power_limit is not None) and distributed.is_main, device,
                           power_limit_eta(config.power_limit))  # fmt: skip
    tracer = StepTracer(Path(config.out_dir) / TRACE_FILE, warmup_steps=1) if config.trace and distributed.is_main else None
    state = _Loop(config, dataset, model, trained, optimizer, scaler, device, distributed, recorder, energy, tracer)
    status = RunStatus.FAILED
    try:
        status = RunStatus.INTERRUPTED if state.run(progress, checkpoint_path) else RunStatus.DONE
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint stands, resumed steps are not re-recorded
        status = RunStatus.INTERRUPTED
        raise
    finally:
        energy.close(recorder)
        if tracer is not None:
            record_trace(tracer, recorder)
        if recorder is not None:
            recorder.flush()
            recorder.finish(status)
    checksum = check_ranks_agree(model, distributed)
    eval_loss, eval_accuracy = state.final_eval
    return TrainResult(
        run_id=recorder.run_id if recorder else None,
        steps=recorder.read(SeriesTable.TRAIN_STEPS) if recorder else pd.DataFrame(),
        epochs=recorder.read(SeriesTable.TRAIN_EPOCHS) if recorder else pd.DataFrame(),
        global_step=progress.global_step,
        final_eval_loss=eval_loss,
        final_eval_accuracy=eval_accuracy,
        parameters_sha256=checksum,
        checkpoint_path=checkpoint_path,
        interrupted=status == RunStatus.INTERRUPTED,
        skipped_modules=skipped,
    )


class _Loop:
    """The epoch/step loop; holds what `train` set up so checkpointing can see all of it."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        model: nn.Module,
        trained: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        device: torch.device,
        distributed: Distributed,
        recorder: TrainRecorder | None,
        energy: EnergyWindows,
        tracer: StepTracer | None,
    ) -> None:
        self.config, self.dataset, self.model, self.trained = config, dataset, model, trained
        self.optimizer, self.scaler, self.device, self.distributed = optimizer, scaler, device, distributed
        self.recorder, self.energy, self.tracer = recorder, energy, tracer
        self.final_eval = (math.nan, math.nan)

    def _total_steps(self, steps_per_epoch: int) -> int:
        planned = self.config.epochs * steps_per_epoch
        return min(planned, self.config.steps) if self.config.steps is not None else planned

    def run(self, progress: Progress, checkpoint_path: Path) -> bool:
        """Train until the last epoch or `steps`; True when stopped early by SIGINT/SIGTERM (checkpoint saved)."""
        config, distributed = self.config, self.distributed
        steps_per_epoch = len(epoch_batches(self.dataset.train, config.batch_size, config.seed, 1, distributed))
        total_steps = self._total_steps(steps_per_epoch)
        bar = tqdm(
            total=total_steps, initial=min(progress.global_step, total_steps), unit="step",
            disable=not (config.progress and distributed.is_main), dynamic_ncols=True,
        )
        self.trained.train()
        stopped = False
        try:
            with StopRequest() as stop:
                while not stopped and progress.epoch <= config.epochs and progress.global_step < total_steps:
                    batches = epoch_batches(self.dataset.train, config.batch_size, config.seed, progress.epoch, distributed)
                    with self.energy.epoch(progress.epoch) as epoch_energy:
                        while progress.batch_in_epoch < len(batches) and progress.global_step < total_steps:
                            stopped = self._step(batches[progress.batch_in_epoch], progress, bar, stop)
                            if stopped:
                                break
                            if progress.global_step % config.checkpoint_every == 0:
                                self.save(progress, checkpoint_path)
                    epoch_done = progress.batch_in_epoch == len(batches)
                    if epoch_done or not stopped:  # a finished epoch is always evaluated and recorded
                        self._end_epoch(progress, epoch_energy.energy_j, partial=not epoch_done)
                    if epoch_done:
                        progress.epoch += 1
                        progress.batch_in_epoch = 0
                        progress.epoch_loss_sum, progress.epoch_images = 0.0, 0
                    self.save(progress, checkpoint_path)
        finally:
            bar.close()
        if stopped and distributed.is_main:
            print(f"stopped at step {progress.global_step}: checkpoint {checkpoint_path}; continue with --resume")
        return stopped

    def _step(self, batch: list[int], progress: Progress, bar: tqdm, stop: StopRequest) -> bool:
        """One optimiser step; returns whether any rank was asked to stop (all ranks agree)."""
        config, device = self.config, self.device
        inputs, labels = self.dataset.train.batch(batch)
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        step = progress.global_step + 1
        with self.energy.step(step) as measured:
            started = time.perf_counter()
            with autocast(config.amp, device):
                logits = self.trained(inputs)
                loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time_s = time.perf_counter() - started
        if self.tracer is not None:
            self.tracer.step()
        # loss and accuracy over all ranks' images of this step, and whether any rank must stop
        totals = torch.tensor(
            [
                float(loss.detach()) * len(batch), float((logits.argmax(dim=1) == labels).sum()),
                float(len(batch)), float(stop.requested),
            ],
            dtype=torch.float64,
        )
        if self.distributed.enabled:
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        loss_value, accuracy, images = float(totals[0] / totals[2]), float(totals[1] / totals[2]), int(totals[2])
        progress.global_step = step
        progress.batch_in_epoch += 1
        progress.epoch_loss_sum += loss_value * images
        progress.epoch_images += images
        any_rank_stops = bool(totals[3] > 0)
        if self.recorder is None:
            return any_rank_stops
        row = {
            "epoch": progress.epoch, "step": step, "loss": loss_value, "accuracy": accuracy,
            "step_time_ms": step_time_s * 1e3, "images_per_s": images / step_time_s,
            "kernels": config.kernels, "energy_j": measured.energy_j,
        }
        self.recorder.step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{accuracy:.3f}", img_s=f"{row['images_per_s']:.0f}")
        bar.write(
            f"epoch {progress.epoch} step {step}: loss {loss_value:.4f} accuracy {accuracy:.3f} "
            f"step {row['step_time_ms']:.1f} ms {row['images_per_s']:.1f} images/s"
        )
        return any_rank_stops

    def _end_epoch(self, progress: Progress, energy_j: float, partial: bool) -> None:
        """Evaluate on the held-out split (rank 0) and record the epoch."""
        if not self.distributed.is_main or progress.epoch_images == 0:
            return
        if self.tracer is not None:
            self.tracer.finish()  # the trace covers training steps only, never the evaluation
        config = self.config
        eval_loss, eval_accuracy = evaluate(self.model, self.dataset.test, EVAL_BATCH_SIZE, self.device, config.amp)
        self.final_eval = (eval_loss, eval_accuracy)
        train_loss = progress.epoch_loss_sum / progress.epoch_images
        # energy is rank 0's GPU only, so it is shared over rank 0's images
        j_per_image = energy_j * self.distributed.world_size / progress.epoch_images
        print(
            f"epoch {progress.epoch}{' (partial)' if partial else ''}: train loss {train_loss:.4f}, "
            f"held-out loss {eval_loss:.4f}, held-out accuracy {eval_accuracy:.4f}"
            + (f", {energy_j:.1f} J ({j_per_image:.4f} J/image)" if not math.isnan(energy_j) else "")
        )
        if not partial:
            self.recorder.epoch({
                "epoch": progress.epoch, "train_loss": train_loss, "eval_loss": eval_loss,
                "eval_accuracy": eval_accuracy, "energy_j": energy_j,
                "j_per_image": j_per_image,
            })

    def save(self, progress: Progress, checkpoint_path: Path) -> None:
        """Flush the database rows, then write the checkpoint (rank 0 only)."""
        if self.recorder is None:
            return
        self.recorder.flush()
        save_checkpoint(checkpoint_path, training_state(
            self.config, self.model, self.optimizer, self.scaler, progress, self.recorder.run_id
        ))
