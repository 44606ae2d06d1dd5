"""What computes the model: our Triton kernels swapped in for the layers they support, and autocast (`--amp`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

log = logging.getLogger("triton_workbench.workbench.train")

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def swap_kernels(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(the model with our Triton kernels swapped in, the compute modules left to PyTorch with why)."""
    from triton_workbench.kernels.fusion import NO_KERNEL
    from triton_workbench.kernels.nn import swap

    swapped = swap(model, channels_last=True)  # the demo models flatten with nn.Flatten: channels_last is safe
    kept = [f"{r.path} ({r.module}: {r.detail})" for r in swapped.swap_records if r.action == "kept"
            and r.detail != NO_KERNEL]
    if kept:
        log.info("left to PyTorch (no Triton kernel swapped in for them): %s", ", ".join(kept))
    return swapped, kept


def autocast(amp: str, device: torch.device) -> ContextManager:
    """Autocast to the `amp` dtype ('fp16' | 'bf16'); 'off' changes nothing."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])
