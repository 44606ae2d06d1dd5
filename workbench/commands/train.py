"""`workbench train`: train a CNN with our Triton kernels swapped in (or PyTorch's), logged to the database.

Runs alone or under torchrun (`torchrun --nproc-per-node 2 -m workbench train ...`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from triton_workbench.autotune.distributed import leave_process_group
from triton_workbench.workbench.data import DATASET_NAMES
from triton_workbench.workbench.models import MODEL_NAMES
from triton_workbench.workbench.train_config import AMP_CHOICES, KERNEL_CHOICES, TrainConfig
from triton_workbench.workbench.training import train


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a CNN with the Triton kernels swapped in", description=__doc__)
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet")
    parser.add_argument("--data", choices=DATASET_NAMES, default="digits", help="digits is bundled; cifar10 needs --data-dir")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-bin (binary version)")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="triton")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off", help="autocast dtype (bf16 needs a GPU for triton)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="stop after this many steps in all (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--eval-images", type=int, help="evaluate on the first N held-out images only (smoke runs)")
    parser.add_argument("--db", help="database path (default: $WORKBENCH_DB or the user cache)")
    parser.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoint and trace folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--trace", action="store_true", help="torch.profiler trace of steps 2-4 (Chrome JSON + op table)")
    parser.add_argument("--profile", action="store_true", help="NVML energy per step and epoch (GPU only)")
    parser.add_argument("--power-limit", default=None, metavar="auto[:ETA]",
                        help="choose the GPU's power limit: profile a few steps at each candidate limit, keep the one "
                             "minimising ETA*energy + (1-ETA)*max_power*time (ETA default 0.5; 1: least energy, 0: "
                             "least time) for the rest of the run; the limit is restored at the end (needs root)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(
        out_dir=args.out, model=args.model, data=args.data, data_dir=args.data_dir, kernels=args.kernels,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, amp=args.amp, seed=args.seed, steps=args.steps, db_path=args.db,
        resume=args.resume, trace=args.trace, profile=args.profile, power_limit=args.power_limit, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, eval_images=args.eval_images,
    )
    finished = False
    try:
        result = train(config)
        finished = True
    except KeyboardInterrupt:
        print(f"interrupted: the last checkpoint is in {args.out}; continue with --resume")
        return 130
    finally:
        leave_process_group(together=finished)
    if result.run_id is None:  # ranks other than 0 report nothing
        return 0
    if result.skipped_modules:
        print(f"left to PyTorch (no Triton kernel yet): {', '.join(result.skipped_modules)}")
    steps = result.steps
    if len(steps):
        timing = steps["step_time_ms"].iloc[1:] if len(steps) > 1 else steps["step_time_ms"]
        print(
            f"run {result.run_id}: {result.global_step} steps, median step {timing.median():.1f} ms "
            f"({steps['images_per_s'].median():.1f} images/s, kernels {config.kernels}), "
            f"held-out accuracy {result.final_eval_accuracy:.4f}"
        )
    return 130 if result.interrupted else 0
