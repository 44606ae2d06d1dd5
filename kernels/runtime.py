"""Where the project's kernels run: on a CUDA device when one is present, else in Triton's interpreter.

The choice is made for this project's kernels alone, through `jit`, which every kernel and helper
here is decorated with: it builds Triton's interpreted function where there is no GPU and Triton's
`JITFunction` elsewhere. Importing changes nothing process-wide (no environment variable), so
import order does not matter and a user's own `@triton.jit` functions are untouched; only while one
of our kernels runs in the interpreter are `triton.language`'s own @jit helpers swapped for
interpreted twins (`_InterpretedKernel`). An explicit `TRITON_INTERPRET` in the environment is
obeyed (processes that compile ahead of time set it to 0).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

log = logging.getLogger("triton_workbench.kernels")


def _interpreter() -> bool:
    if "TRITON_INTERPRET" in os.environ:
        return bool(triton.knobs.runtime.interpret)
    return not torch.cuda.is_available()


INTERPRETER: bool = _interpreter()

# passed with every launch: Triton's current default, stated so that Triton 3.10's change of default (and
# the warning 3.9 prints when it is left unset) does not touch our kernels' numerics
LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}


def jit(fn: Callable | None = None, **options: Any) -> Any:
    """`triton.jit` for this project's kernels: interpreted where there is no GPU (see the module doc)."""

    def decorate(function: Callable) -> Any:
        if INTERPRETER:
            return _InterpretedKernel(function, **options)
        return triton.jit(function, **options)

    return decorate if fn is None else decorate(fn)


def is_kernel(value: object) -> bool:
    """Whether `value` is a function made by `jit` (compiled or interpreted): what a launch hook patches."""
    return isinstance(value, (JITFunction, _InterpretedKernel))


class _InterpretedKernel(InterpretedFunction):
    """Triton's interpreted function, run with `triton.language`'s own `@triton.jit` helpers (`tl.cdiv`,
    `tl.sum`, `tl.swizzle2d`, ...) interpreted too. Triton builds those once, when it is imported, as
    compiled-only functions unless `TRITON_INTERPRET` was set then; they are swapped for interpreted
    twins only while a kernel of ours runs, the way Triton's interpreter patches `tl` itself."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with _interpreted_language():
            return super().run(*args, **kwargs)


_language_lock = threading.Lock()
_language_users = 0
_language_saved: list[tuple[Any, str, JITFunction]] = []
_twins: dict[int, InterpretedFunction] = {}  # by id: hashing a JITFunction walks its (swapped) globals


def _interpreted_twin(function: JITFunction) -> InterpretedFunction:
    if id(function) not in _twins:
        _twins[id(function)] = InterpretedFunction(function.fn)
    return _twins[id(function)]


@contextmanager
def _interpreted_language() -> Iterator[None]:
    """Swap every `JITFunction` of `triton.language`'s modules for its interpreted twin while the block runs
    (counted, so that kernels running at once in several threads restore it once, after the last)."""
    global _language_users
    with _language_lock:
        if _language_users == 0:
            importlib.import_module("triton.experimental.gluon")  # the interpreter imports it lazily; it reads tl.*
            modules = [module for name, module in list(sys.modules.items())
                       if name == "triton.language" or name.startswith("triton.language.")]
            for module in modules:
                for name, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):
                        _language_saved.append((module, name, value))
                        setattr(module, name, _interpreted_twin(value))
        _language_users += 1
    try:
        yield
    finally:
        with _language_lock:
            _language_users -= 1
            if _language_users == 0:
                for module, name, value in reversed(_language_saved):
                    setattr(module, name, value)
                _language_saved.clear()


@functools.cache
def announce() -> None:
    """Log once per process that kernels run in the interpreter."""
    if INTERPRETER:
        log.info("no CUDA device: Triton kernels run in the interpreter (slow, exact, CPU tensors)")


def default_device() -> torch.device:
    """The device kernels launch on by default: CUDA if present, else the CPU (interpreter)."""
    return torch.device("cuda") if torch.cuda.is_available() and not INTERPRETER else torch.device("cpu")


@functools.cache
def device_memory() -> tuple[int | None, str]:
    """(bytes, whose) of the memory kernels' tensors live in: the GPU's, or in the interpreter the host's
    RAM; (None, ...) where the host does not say."""
    if not INTERPRETER and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "this GPU"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's RAM (Triton's interpreter)"
    except (AttributeError, ValueError, OSError):
        return None, "this host's RAM"


def timer_name() -> str:
    """How a measurement on this machine is taken: 'cuda_events' on a GPU, 'interpreter' otherwise."""
    return "interpreter" if INTERPRETER else "cuda_events"


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError when `tensor` sits where kernels cannot run it in this process (meta tensors pass: a
    shapes-only run launches nothing)."""
    if tensor.device.type == "meta":
        return
    if INTERPRETER and tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}, but kernels run in Triton's interpreter: use CPU tensors")
    if not INTERPRETER and tensor.device.type != "cuda":
        raise ValueError(f"{name} is on {tensor.device}: Triton kernels need CUDA tensors on this machine")
