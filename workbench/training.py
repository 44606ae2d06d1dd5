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
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Iterator

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from triton_workbench.autotune.database import Database
from triton_workbench.autotune.distributed import Distributed
from triton_workbench.kernels import runtime
from triton_workbench.workbench.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    parameters_sha256,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from triton_workbench.workbench.data import Dataset, ImageSet, load_dataset
from triton_workbench.workbench.models import build_model
from triton_workbench.workbench.tables import format_table
from triton_workbench.workbench.tracing import StepTracer

log = logging.getLogger("triton_workbench.workbench.train")

KERNEL_CHOICES = ("triton", "torch")
AMP_CHOICES = ("off", "fp16", "bf16")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TRACE_FILE = "trace.json"
EVAL_BATCH_SIZE = 256  # held-out images per forward pass: fewer, larger launches
# Settings a resumed run must share with its checkpoint (others, like epochs or steps, may change).
RESUME_MUST_MATCH = ("model", "data", "kernels", "batch_size", "amp", "seed")


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
    checkpoint_every: int = 20  # steps between checkpoints (and database flushes)
    eval_images: int | None = None  # evaluate on the first N held-out images only (smoke runs); None: all
    progress: bool = True

    def validate(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.amp == "bf16" and self.kernels == "triton" and runtime.INTERPRETER:
            raise ValueError(
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


@dataclass
class Progress:
    """Where training stands: saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0  # batches of `epoch` already done
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0


def init_distributed(kernels: str) -> Distributed:
    """Join the group torchrun describes (a group of one outside torchrun): nccl when the model lives
    on a GPU, gloo when it runs on the CPU (our kernels in the interpreter)."""
    use_cuda = torch.cuda.is_available() and not (kernels == "triton" and runtime.INTERPRETER)
    return Distributed.from_environment(use_cuda) or Distributed()


def training_device(kernels: str, distributed: Distributed) -> torch.device:
    """Where the model lives: the kernels' device for triton (CPU in the interpreter), else CUDA if present."""
    if kernels == "triton":
        device = runtime.default_device()
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
        torch.cuda.set_device(device)
    return device


def swap_kernels(model: nn.Module) -> list[str]:
    """Replace the layers our Triton kernels support; return the compute layers left to PyTorch."""
    from triton_workbench.kernels.nn import activation_of, swap

    swap(model)
    kept = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear) or activation_of(module) is not None
    ]
    if kept:
        log.info("left to PyTorch (no Triton kernel swapped in for them): %s", ", ".join(kept))
    return kept


def autocast(amp: str, device: torch.device) -> ContextManager:
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(model: nn.Module, images: ImageSet, batch_size: int, device: torch.device, amp: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on all of `images`."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        inputs, labels = images.batch(range(start, min(start + batch_size, len(images))))
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast(amp, device):
            logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.train(was_training)
    return loss_sum / len(images), correct / len(images)


def epoch_batches(train: ImageSet, batch_size: int, seed: int, epoch: int, distributed: Distributed) -> list[list[int]]:
    """This rank's batches for `epoch`: a seeded shuffle sharded by DistributedSampler, last partial batch dropped."""
    sampler = DistributedSampler(
        train, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    if len(indices) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(indices)} training images per process")
    return [indices[start : start + batch_size] for start in range(0, len(indices) - batch_size + 1, batch_size)]


class _Recorder:
    """Rank 0's database writer: buffers rows and flushes them before each checkpoint, never twice per step."""

    def __init__(self, config: TrainConfig, resumed_run_id: int | None) -> None:
        self.db = Database(config.db_path)
        self.run_id = self._open_run(config, resumed_run_id)
        recorded_steps = self.db.read("train_steps", self.run_id)
        recorded_epochs = self.db.read("train_epochs", self.run_id)
        self.last_step = int(recorded_steps["step"].max()) if len(recorded_steps) else 0
        self.last_epoch = int(recorded_epochs["epoch"].max()) if len(recorded_epochs) else 0
        self._steps: list[dict[str, Any]] = []
        self._epochs: list[dict[str, Any]] = []

    def _open_run(self, config: TrainConfig, resumed_run_id: int | None) -> int:
        runs = self.db.runs()
        if resumed_run_id is not None and len(runs) and resumed_run_id in set(runs["run_id"]):
            log.info("resuming database run %d", resumed_run_id)
            return resumed_run_id
        meta = config.recorded()
        if resumed_run_id is not None:
            meta["resumed_from_run_id"] = resumed_run_id  # the checkpoint's run lives in another database
        name = f"{config.model}-{config.data}-{config.kernels}"
        return self.db.start_run("train", name, meta)

    def step(self, row: dict[str, Any]) -> None:
        if row["step"] > self.last_step:
            self._steps.append(row)

    def epoch(self, row: dict[str, Any]) -> None:
        if row["epoch"] > self.last_epoch:
            self._epochs.append(row)

    def flush(self) -> None:
        if self._steps:
            frame = pd.DataFrame(self._steps)
            self.db.append("train_steps", self.run_id, frame)
            self.last_step = int(frame["step"].max())
            self._steps.clear()
        if self._epochs:
            self.db.append("train_epochs", self.run_id, pd.DataFrame(self._epochs))
            self.last_epoch = max(row["epoch"] for row in self._epochs)
            self._epochs.clear()

    def append(self, table: str, frame: pd.DataFrame) -> None:
        if len(frame):
            self.db.append(table, self.run_id, frame)

    def finish(self, status: str) -> None:
        self.db.finish_run(self.run_id, status=status)


@dataclass
class _Measured:
    """The energy of one closed window (NaN without power data)."""

    energy_j: float = math.nan


class _Energy:
    """NVML windows per step and per epoch (rank 0, with --profile); says plainly when there is no power data."""

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

    @contextmanager
    def window(self, name: str) -> Iterator[_Measured]:
        measured = _Measured()
        if self.sampler is None:
            yield measured
            return
        with self.sampler.window(name) as record:
            yield measured
        measured.energy_j = self.sampler.window_stats(record).energy_j

    def close(self, recorder: _Recorder | None) -> None:
        """Stop sampling and store the windows and the samples with the run."""
        if self.sampler is None:
            return
        self.sampler.stop()
        if recorder is not None:
            recorder.append("windows", self.sampler.windows())
            recorder.append("samples", self.sampler.frame())
        self.sampler = None


class _StopRequest:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step, then saving a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _step_window(step: int) -> str:
    return f"step {step}"


def _epoch_window(epoch: int) -> str:
    return f"epoch {epoch}"


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says; returns what happened (rank 0 holds the database rows)."""
    config.validate()
    distributed = init_distributed(config.kernels)
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
    skipped = swap_kernels(model) if config.kernels == "triton" else []  # after init: same parameters as torch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    progress, resumed_run_id = Progress(), None
    if config.resume:
        progress, resumed_run_id = _restore(checkpoint_path, config, model, optimizer, scaler)
    trained = model
    if distributed.enabled:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    recorder = _Recorder(config, resumed_run_id) if distributed.is_main else None
    energy = _Energy(config.profile and distributed.is_main, device)
    tracer = StepTracer(Path(config.out_dir) / TRACE_FILE, warmup_steps=1) if config.trace and distributed.is_main else None
    state = _Loop(config, dataset, model, trained, optimizer, scaler, device, distributed, recorder, energy, tracer)
    status = "failed"
    try:
        status = "interrupted" if state.run(progress, checkpoint_path) else "done"
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint stands, resumed steps are not re-recorded
        status = "interrupted"
        raise
    finally:
        energy.close(recorder)
        if tracer is not None:
            _record_trace(tracer, recorder)
        if recorder is not None:
            recorder.flush()
            recorder.finish(status)
    checksum = _check_ranks_agree(model, distributed)
    eval_loss, eval_accuracy = state.final_eval
    return TrainResult(
        run_id=recorder.run_id if recorder else None,
        steps=recorder.db.read("train_steps", recorder.run_id) if recorder else pd.DataFrame(),
        epochs=recorder.db.read("train_epochs", recorder.run_id) if recorder else pd.DataFrame(),
        global_step=progress.global_step,
        final_eval_loss=eval_loss,
        final_eval_accuracy=eval_accuracy,
        parameters_sha256=checksum,
        checkpoint_path=checkpoint_path,
        interrupted=status == "interrupted",
        skipped_modules=skipped,
    )


def _restore(
    path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[Progress, int | None]:
    state = load_checkpoint(path)
    saved = state["config"]
    differing = [key for key in RESUME_MUST_MATCH if saved.get(key) != getattr(config, key)]
    if differing:
        details = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {getattr(config, key)!r}" for key in differing)
        raise ValueError(f"cannot resume from {path}: settings differ ({details})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    progress = Progress(**state["progress"])
    log.info("resumed from %s at step %d (epoch %d)", path, progress.global_step, progress.epoch)
    return progress, state.get("run_id")


def _record_trace(tracer: StepTracer, recorder: _Recorder | None) -> None:
    op_times = tracer.finish()
    if op_times is None:
        print("trace: no step was traced (the run ended before the first traced step)")
        return
    if recorder is not None:
        recorder.append("op_times", op_times)
    print(f"trace: {tracer.steps_traced} steps traced -> {tracer.trace_path}")
    from triton_workbench.reports.training import op_device  # the report's rule for where a step's kernel time is

    top = op_times[op_times["device"] == op_device(op_times)].nlargest(12, "self_time_ms")
    print(format_table(top, float_format="{:.3f}"))


def _check_ranks_agree(model: nn.Module, distributed: Distributed) -> str:
    """Every rank's parameters are gathered and compared; rank 0 reports, a mismatch raises."""
    checksum = parameters_sha256(model)
    if not distributed.enabled:
        return checksum
    flat = torch.cat([parameter.detach().flatten().float() for parameter in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(distributed.world_size)]
    dist.all_gather(gathered, flat)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(f"parameters differ between rank 0 and ranks {differing}: gradients were not synchronised")
    if distributed.is_main:
        print(f"ddp: parameters identical on all {distributed.world_size} ranks (sha256 {checksum})")
    return checksum


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
        recorder: _Recorder | None,
        energy: _Energy,
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
            with _StopRequest() as stop:
                while not stopped and progress.epoch <= config.epochs and progress.global_step < total_steps:
                    batches = epoch_batches(self.dataset.train, config.batch_size, config.seed, progress.epoch, distributed)
                    with self.energy.window(_epoch_window(progress.epoch)) as epoch_energy:
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

    def _step(self, batch: list[int], progress: Progress, bar: tqdm, stop: _StopRequest) -> bool:
        """One optimiser step; returns whether any rank was asked to stop (all ranks agree)."""
        config, device = self.config, self.device
        inputs, labels = self.dataset.train.batch(batch)
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        step = progress.global_step + 1
        with self.energy.window(_step_window(step)) as measured:
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
        save_checkpoint(checkpoint_path, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": asdict(progress),
            "run_id": self.recorder.run_id,
            "config": self.config.recorded(),
            "parameters_sha256": parameters_sha256(self.model),
        })
