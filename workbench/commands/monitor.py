"""`workbench monitor`: sample GPU power, energy and temperature while any command runs.

    workbench monitor [--db PATH] [--interval-s S] [--device D] [--csv FILE] -- CMD ARGS...
    workbench monitor --export RUN_ID --csv FILE [--db PATH]

The trace goes into the database as a "monitor" run (tables "samples" and "windows", one window
named "command" spanning the command), written every few seconds while the command runs, so an
interrupted monitor keeps what it sampled. The command runs with $WORKBENCH_DB set to that database, so a
workbench command monitored without a --db of its own records its runs (and finds its tuned configs)
beside the trace. The exit status is the command's (128 + signal when a signal ended it). Without NVML
the command still runs and the summary says that no power data exists.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
from pathlib import Path

from triton_workbench.database import Database, RunKind, RunStatus, SeriesTable
from triton_workbench.kernels.errors import UsageError
from triton_workbench.profiler import NvmlSampler
from triton_workbench.workbench.paths import writable_file, written_whole

FLUSH_EVERY_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor", help="sample GPU power/energy/temperature while a command runs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--db", type=Path, default=None, help="database file (default: $WORKBENCH_DB, else the user cache)")
    parser.add_argument("--interval-s", type=float, default=0.01, help="seconds between power samples (default 0.01)")
    parser.add_argument("--device", default="0", help="CUDA ordinal, GPU UUID or PCI bus id (default 0)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the trace to this CSV file")
    parser.add_argument("--export", type=int, metavar="RUN_ID", default=None,
                        help="write the stored trace of RUN_ID to --csv instead of running a command")  # fmt: skip
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    parser.set_defaults(func=run)


def _device(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _export(db: Database, run_id: int, csv: Path | None) -> int:
    if csv is None:
        raise UsageError("--export needs --csv FILE")
    samples = db.read(SeriesTable.SAMPLES, run_id)
    if samples.empty:
        known = run_id in set(db.runs()["run_id"])
        why = "it was monitored without NVML, or is not a monitor run" if known else f"no such run in {db.path}"
        raise UsageError(f"run {run_id} has no samples ({why})")
    with written_whole(csv) as temporary:
        samples.drop(columns=["run_id"]).to_csv(temporary, index=False)
    print(f"wrote {len(samples)} samples of run {run_id} to {csv}")
    return 0


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _summary(command: str, status: int, sampler: NvmlSampler, window) -> str:
    lines = [f"`{command}` exited with {status} after {window.duration_s:.2f} s"]
    if not sampler.available:
        lines.append(f"no power data: NVML is not available here ({sampler.reason}); the command ran unmeasured")
        return "\n".join(lines)

    def number(value: float, unit: str, digits: int = 1) -> str:
        return "n/a" if math.isnan(value) else f"{value:.{digits}f} {unit}"

    lines.append(
        f"energy {number(window.energy_j, 'J')}, avg power {number(window.avg_power_w, 'W')}, "
        f"peak power {number(window.peak_power_w, 'W')}, peak GPU temp {number(window.peak_gpu_temp_c, 'C', 0)}"
        + (", clocks throttled (power/thermal)" if window.throttled else "")
    )
    lines.append(f"GPU: {sampler.device.name} ({sampler.device.uuid}), sampled every {sampler.interval_s * 1000:g} ms")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.csv is not None:  # checked before anything runs: the trace is written after the command
        writable_file(args.csv, "--csv")
    db = Database(args.db)
    if args.export is not None:
        return _export(db, args.export, args.csv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("give the command to monitor after --, e.g. `workbench monitor -- python train.py`")
    if not args.interval_s > 0:
        raise UsageError(f"--interval-s must be positive, got {args.interval_s}")
    command = shlex.join(cmd)
    with NvmlSampler(device=_device(args.device), interval_s=args.interval_s) as sampler:
        meta = {
            "command": cmd, "interval_s": args.interval_s, "device": args.device, "nvml_available": sampler.available,
            "nvml_reason": sampler.reason, "gpu_uuid": sampler.device.uuid if sampler.device else None,
        }  # fmt: skip
        run_id = db.start_run(RunKind.MONITOR, command, meta)
        stored, status, returncode = 0, RunStatus.FAILED, None

        def flush() -> None:
            nonlocal stored
            new = sampler.frame(first=stored)
            if len(new):
                db.append(SeriesTable.SAMPLES, run_id, new)
                stored += len(new)

        try:
            with sampler.window("command") as record:
                try:
                    process = subprocess.Popen(cmd, env={**os.environ, "WORKBENCH_DB": str(db.path)})
                except OSError as error:  # the run stays failed, the cli reports it
                    raise UsageError(f"cannot run {cmd[0]!r}: {error.strerror or error}") from None
                try:
                    while returncode is None:
                        try:
                            returncode = process.wait(timeout=FLUSH_EVERY_S)
                        except subprocess.TimeoutExpired:
                            flush()
                except KeyboardInterrupt:  # the child got the same Ctrl-C: give it a moment to finish
                    status = RunStatus.INTERRUPTED
                    try:
                        returncode = process.wait(timeout=5)
                    except (subprocess.TimeoutExpired, KeyboardInterrupt):
                        process.kill()
                        returncode = process.wait()
            if status != RunStatus.INTERRUPTED:
                status = RunStatus.DONE if returncode == 0 else RunStatus.FAILED
        finally:
            sampler.stop()
            flush()
            db.append(SeriesTable.WINDOWS, run_id, sampler.windows())
            db.finish_run(run_id, status)
    exit_status = _exit_status(returncode)
    print(f"monitor run {run_id}: " + _summary(command, exit_status, sampler, sampler.window_stats(record)))
    if args.csv is not None:
        with written_whole(args.csv) as temporary:
            sampler.frame().to_csv(temporary, index=False)
        print(f"wrote {stored} samples to {args.csv}")
    print(f"stored in {db.path} (run {run_id}); `workbench monitor --export {run_id} --csv FILE` exports it")
    return exit_status
