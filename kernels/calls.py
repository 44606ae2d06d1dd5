"""Function and method calls in a traced graph: their readable names, and why the ones worth a row in swap's
table stay in PyTorch. Worth a row: the conv, matmul, normalisation and activation calls the fusion pass does
not rewrite, what a user would expect the kernels to run; elementwise glue (add, mul, cat, view, ...) is not."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

_LINEAR = "nn.Linear and F.linear are"
# functions the pass does not rewrite, though it rewrites their module (or functional) form -> what it rewrites
_REWRITTEN_INSTEAD = {F.conv1d: "nn.Conv1d is", F.conv_transpose2d: "nn.ConvTranspose2d is", F.prelu: "nn.PReLU is",
                      F.batch_norm: "nn.BatchNorm2d is", torch.batch_norm: "nn.BatchNorm2d is", torch.matmul: _LINEAR,
                      operator.matmul: _LINEAR, torch.mm: _LINEAR, torch.bmm: _LINEAR, torch.addmm: _LINEAR}
_NO_KERNEL = {F.conv3d, F.conv_transpose1d, F.conv_transpose3d, F.bilinear, F.scaled_dot_product_attention,
              F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.instance_norm, F.rms_norm,
              F.local_response_norm, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, F.softmin, F.glu,
              F.logsigmoid, F.softsign, F.tanhshrink, F.threshold, F.rrelu, F.hardshrink, F.softshrink}
_METHODS = {"matmul": _LINEAR, "mm": _LINEAR, "bmm": _LINEAR, "softmax": None, "log_softmax": None}


def readable(op: str, target: object) -> str:
    """A call's target as code names it: `F.hardtanh`, `torch.sigmoid`, `operator.add`, `Tensor.relu_`."""
    if op == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", None)
    for prefix, namespace in (("F", F), ("torch", torch), ("operator", operator)):
        if name is not None and getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    return name or str(target)


def left_in_pytorch(op: str, target: object) -> str | None:
    """Why a call the pass left in the graph deserves a `kept` row, or None (not a call worth reporting)."""
    name = readable(op, target)
    if op == "call_method" and target in _METHODS:
        instead = _METHODS[target]
    elif op == "call_function" and (target in _REWRITTEN_INSTEAD or target in _NO_KERNEL):
        instead = _REWRITTEN_INSTEAD.get(target)
    else:
        return None
    return f"{name} is not rewritten; {instead}" if instead else f"no Triton kernel for {name}"
