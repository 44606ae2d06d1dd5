"""Two kernels calling `helpers.twice` (one by name, one through the module) and one calling nothing."""

import triton.language as tl

from triton_workbench.kernels.runtime import jit

from . import helpers
from .helpers import twice

OFFSET = tl.constexpr(1.0)


@jit
def double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, twice(tl.load(x_ptr + offsets, mask=mask)), mask=mask)


@jit
def double_offset_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, helpers.twice(tl.load(x_ptr + offsets, mask=mask)) + OFFSET, mask=mask)


@jit
def plain_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)
