"""Arrival counters: the last program of a group to finish does the group's final step, in the same launch.

A split reduction (wgrad's split-K partials, a BatchNorm's per-tile moments) needs a final pass that
waits for all of its partials. Instead of a launch of its own, every program of the group stores
its partial and increments the group's counter; the program that sees the count reach the group's
size is the last, reads every partial in a fixed order (deterministic: the same sum whichever
program arrives last) and writes the result: the last-block reduction of the CUDA samples'
threadFenceReduction, with CUTLASS's barrier discipline (a CTA barrier, then a release increment by
one thread; an acquire, then a barrier before the partials are read). The last program resets its
counter to zero, so the counters (`counters`, one cached buffer per device and stream) are zero
between launches without a memset; a launch captured into a CUDA graph gets counters of its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import triton.language as tl

from triton_workbench.kernels.runtime import jit

_cache: dict[tuple, torch.Tensor] = {}


@jit
def last_to_arrive(counter_ptr, programs):
    """Whether this program is the last of the `programs` sharing `counter_ptr` to get here (its partials
    stored before, as every other's); the last one resets the counter for the next launch."""
    tl.debug_barrier()  # every thread's stores of this program come before its arrival
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # ... and the acquire before any thread's read of the others' partials
    return last


@contextmanager
def counters(device: torch.device, count: int) -> Iterator[torch.Tensor]:
    """At least `count` int32 arrival counters on `device`, all zero (kernels leave them so), private to the
    current CUDA stream so that launches on concurrent streams never share one; zeroed again if the launch
    inside fails part-way (an interpreted kernel that raised). While a CUDA graph is being captured, fresh
    ones: the graph replays their zeroing, and no other graph or launch shares them."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        yield torch.zeros(max(count, 1), device=device, dtype=torch.int32)
        return
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _cache or _cache[key].numel() < count:
        _cache[key] = torch.zeros(max(count, 1024), device=device, dtype=torch.int32)
    try:
        yield _cache[key]
    except BaseException:
        _cache[key].zero_()
        raise
