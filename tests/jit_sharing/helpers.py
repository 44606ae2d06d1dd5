"""A @jit helper shared by two kernels of `kernels`, and one no kernel calls."""

import triton.language as tl  # noqa: F401  (the interpreter needs it visible to @jit functions)

from triton_workbench.kernels.runtime import jit


@jit
def twice(x):
    return x * 2.0


@jit
def unused(x):
    return x + 3.0
