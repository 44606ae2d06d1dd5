"""What computes the model: our Triton kernels swapped in for the layers they support, and autocast (`--amp`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

log = logging.getLogger("triton_workbench.workbench.train")

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def swap_kernels(model: nn.Module) -> list[str]:
    """Replace the layers our Triton kernels support; return the compute layers left to PyTorch."""
    from triton_workbench.kernels.nn import activation_of, swap

    swap(model, channels_last=True)  # the demo models flatten with nn.Flatten: channels_last end to end is safe
    kept = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear) or activation_of(module) is not None
    ]
    if kept:
        log.info("left to PyTorch (no Triton kernel swapped in for them): %s", ", ".join(kept))
    return kept


def autocast(amp: str, device: torch.device) -> ContextManager:
    """Autocast to the `amp` dtype ('fp16' | 'bf16'); 'off' changes nothing."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])
