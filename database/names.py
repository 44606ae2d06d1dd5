"""Every name the workbench database stores, defined once: run kinds and statuses, trial statuses, tables.

They are `StrEnum`s: a member is the plain string it names, so it is what SQLite stores and it
compares equal to what comes back (`frames["status"] == RunStatus.DONE`, `run.kind == RunKind.TUNE`).
The tuples beside them are what validation checks against (`"x" in RUN_KINDS` is safe for any string).
"""

from __future__ import annotations

from enum import StrEnum


class RunKind(StrEnum):
    """What a run measured (the `kind` column of `runs`)."""

    TUNE = "tune"
    TRAIN = "train"
    MONITOR = "monitor"
    STRATEGIES = "strategies"
    BENCH = "bench"


class RunStatus(StrEnum):
    """How a run stands (the `status` column of `runs`): running until it is finished one of the other ways."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class TrialStatus(StrEnum):
    """How a tuning trial ended (the `status` column of `trials`); only OK trials have a usable time."""

    OK = "ok"
    WRONG = "wrong"  # ran, but its result differs from the reference beyond the kernel's tolerance
    COMPILE_ERROR = "compile_error"
    OUT_OF_RESOURCES = "out_of_resources"  # over the device's shared memory or registers
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"  # hung past the watchdog, or its process died twice
    PRUNED = "pruned"  # not measured: its static ceiling was below `tune --prune-static` R x the best one's


class Table(StrEnum):
    """Tables with a fixed schema, written only through the methods of `Database` and its subclasses."""

    RUNS = "runs"
    TRIALS = "trials"
    BEST_CONFIGS = "best_configs"
    RUNNING_TRIALS = "running_trials"  # claims on the configs being measured: owner pid/host, run, heartbeat


class SeriesTable(StrEnum):
    """The per-run series tables the workbench writes with `Database.append` (columns grow as needed)."""

    SAMPLES = "samples"  # NVML power/temperature/clock samples
    WINDOWS = "windows"  # named time windows over the samples (a trial, a step, a command)
    BASELINES = "baselines"  # our kernels against PyTorch's ops
    TRAIN_STEPS = "train_steps"
    TRAIN_EPOCHS = "train_epochs"
    OP_TIMES = "op_times"  # torch.profiler per-op times of a training run
    STRATEGY_RESULTS = "strategy_results"
    STEP_TIMES = "step_times"  # bench model: a training step's time and peak memory, eager against swapped
    TRAFFIC = "traffic"  # bench model --traffic: launches and bytes per category, eager against swapped
    TRAFFIC_BY_BLOCK = "traffic_by_block"  # the same per block (layer1.0, ...)
    FUSED_CHAINS = "fused_chains"  # what kernels.nn.swap fused, swapped and left in PyTorch, with why
    POWER_LIMIT_PROFILE = "power_limit_profile"  # train --power-limit auto: each limit's profiled steps, the choice


RUN_KINDS: tuple[RunKind, ...] = tuple(RunKind)
RUN_STATUSES: tuple[RunStatus, ...] = tuple(RunStatus)
FINISHED_STATUSES: tuple[RunStatus, ...] = (RunStatus.DONE, RunStatus.FAILED, RunStatus.INTERRUPTED)
TRIAL_STATUSES: tuple[TrialStatus, ...] = tuple(TrialStatus)
FIXED_TABLES: tuple[Table, ...] = tuple(Table)
SERIES_TABLES: tuple[SeriesTable, ...] = tuple(SeriesTable)
