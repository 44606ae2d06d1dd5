"""Where kernels run: on a CUDA device when one is present, else in Triton's interpreter.

Import this module before any `@triton.jit` function is defined: Triton reads
`TRITON_INTERPRET` when a kernel is decorated. An explicit `TRITON_INTERPRET` in the
environment is respected (set it to 0 in a process that compiles ahead of time).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("kernels")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated so it stays put
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _NOTICE = "no CUDA device: Triton kernels run in the interpreter (slow, exact, CPU tensors)"
else:
    _NOTICE = ""

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def announce() -> None:
    """Log once per process that kernels run in the interpreter."""
    if _NOTICE:
        log.info(_NOTICE)


def default_device() -> torch.device:
    """The device kernels launch on by default: CUDA if present, else the CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() and not INTERPRETER else torch.device("cpu")


def timer_name() -> str:
    """How a measurement on this machine is taken: 'cuda_events' on a GPU, 'interpreter' otherwise."""
    return "interpreter" if INTERPRETER else "cuda_events"


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError when `tensor` sits where kernels cannot run it in this process."""
    if INTERPRETER and tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}, but kernels run in Triton's interpreter: use CPU tensors")
    if not INTERPRETER and tensor.device.type != "cuda":
        raise ValueError(f"{name} is on {tensor.device}: Triton kernels need CUDA tensors on this machine")
