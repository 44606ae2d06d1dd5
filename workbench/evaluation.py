"""Loss and accuracy of a model on held-out images, measured after each training epoch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_workbench.workbench.data import ImageSet
from triton_workbench.workbench.train_kernels import autocast

EVAL_BATCH_SIZE = 256  # held-out images per forward pass: fewer, larger launches


@torch.no_grad()
def evaluate(model: nn.Module, images: ImageSet, batch_size: int, device: torch.device, amp: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on all of `images`."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        inputs, labels = images.batch(range(start, min(start + batch_size, len(images))))
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast(amp, device):
            logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.train(was_training)
    return loss_sum / len(images), correct / len(images)
