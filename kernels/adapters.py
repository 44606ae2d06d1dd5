"""Adapters: Triton modules for layer classes whose `forward` is their own but whose semantics are known.

`swap` puts a subclass of nn.Conv2d / nn.Linear on the kernels when its forward is its parent's
(`fusion.behaves_as`); one that overrides forward computes something else, so it stays in PyTorch
unless an adapter here says what it computes. Classes are matched by fully qualified name (module +
qualname), so a library such as timm is never imported, and must also be instances of the adapter's
base class. A subclass of a matched class that keeps its forward is matched too.

Registered: timm's `Conv2dSame` (TensorFlow 'SAME' padding from the input size at every call: the
Triton conv with that asymmetric padding) and, from `kernels.attention`, nn.MultiheadAttention.
`adapt` runs before the fusion pass: it replaces each matched module in the model's tree by its
adapter (sharing the Parameter objects, so state_dict keys and optimizers are unchanged), or
records why it stays in PyTorch.

Extending: `register(qualified_name, base, product, build, describe)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from triton_workbench.kernels import ops
from triton_workbench.kernels.fusion import NO_KERNEL, SwapRecord


@dataclass(frozen=True)
class Adapter:
    base: type[nn.Module]  # a matched module must be an instance of it
    product: type[nn.Module]  # the Triton module's class
    build: Callable[[nn.Module], nn.Module]  # the module -> its Triton replacement, sharing its parameters
    describe: Callable[[nn.Module, nn.Module], str]  # (module, its parent) -> the table's detail


ADAPTERS: dict[str, Adapter] = {}  # "module.qualname" of a class -> its adapter


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str, base: type[nn.Module], product: type[nn.Module], build: Callable[[nn.Module], nn.Module],
             describe: Callable[[nn.Module, nn.Module], str]) -> None:
    """Adapt modules whose class is called `name` (module + qualname) and is a subclass of `base` by
    `build(module)`, an instance of `product`; `describe(module, parent)` is the table's detail."""
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"name must be a class's fully qualified name ('module.Class'), got {name!r}")
    if not (isinstance(base, type) and issubclass(base, nn.Module)):
        raise TypeError(f"base must be an nn.Module subclass, got {base!r}")
    ADAPTERS[name] = Adapter(base, product, build, describe)


def _registered(module: object) -> type | None:
    """The nearest class in `module`'s class hierarchy that has an adapter, or None (also for an adapter's own)."""
    if isinstance(module, tuple(adapter.product for adapter in ADAPTERS.values())):
        return None
    return next((cls for cls in type(module).__mro__ if qualified_name(cls) in ADAPTERS), None)


def claimed(module: object) -> bool:
    """Whether a registered class is among `module`'s classes: `adapt` decides for it, adapting or keeping it."""
    return _registered(module) is not None


def find(module: object) -> Adapter | None:
    """The adapter for `module`: its class's, or that of its nearest registered ancestor if it keeps that forward."""
    return ADAPTERS[qualified_name(cls)] if _why_not(module, cls := _registered(module)) is None else None


def _why_not(module: object, cls: type | None) -> str | None:
    """Why the adapter of `module`'s registered class `cls` cannot stand for it (None: it can, or there is none)."""
    if cls is None:
        return None
    adapter = ADAPTERS[qualified_name(cls)]
    if not isinstance(module, adapter.base):
        return f"{qualified_name(cls)} is not a subclass of {adapter.base.__name__}: its adapter does not apply"
    if getattr(type(module), "forward", None) is not getattr(cls, "forward", None):
        return f"{qualified_name(type(module))} overrides the forward of {qualified_name(cls)}: no adapter for it"
    return None


def share(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of `cls` with `module`'s state: the same Parameter, buffer and child objects (new dicts holding
    them, so neither module's registrations change the other's) and the same attributes; no __init__ runs."""
    twin = cls.__new__(cls)
    twin.__dict__.update({key: copy.copy(value) if isinstance(value, (dict, set)) else value
                          for key, value in vars(module).items()})
    return twin


def adapt(model: nn.Module, unsupported: Callable[[nn.Module], str | None], prefix: str = "",
          done: dict[int, nn.Module] | None = None) -> list[SwapRecord]:
    """Replace, in place, every module of `model`'s tree that an adapter matches by its Triton module, unless
    `unsupported(m)` gives a reason for it or one of its submodules (dtype, device, forward hooks): then it
    stays, with that reason, as does a claimed module no adapter matches (a subclass overriding the registered
    forward). A module shared at several paths gets one adapter. A row per path."""
    done = {} if done is None else done
    records: list[SwapRecord] = []
    for name, child in list(model._modules.items()):
        path = prefix + name
        if child is None:
            continue
        if not claimed(child):
            records += adapt(child, unsupported, f"{path}.", done)
            continue
        adapter = find(child)
        reason = _why_not(child, _registered(child)) or next(
            (why for inner in child.modules() if (why := unsupported(inner)) is not None), None)
        if reason is not None:
            records.append(SwapRecord(path, type(child).__name__, "kept", reason))
            continue
        if id(child) not in done:
            done[id(child)] = adapter.build(child)
        model._modules[name] = done[id(child)]
        records.append(SwapRecord(path, type(child).__name__, "swapped", adapter.describe(child, model)))
    return records


def tidy(adapted: list[SwapRecord], later: list[SwapRecord], model: nn.Module,
         on_kernels: tuple[type[nn.Module], ...]) -> list[SwapRecord]:
    """The adapter rows, then the fusion pass's and module walk's rows less those on the adapters' paths and
    those calling a module already on the kernels (`on_kernels`) kept; a conv or linear subclass kept for want
    of a kernel is said to be one whose forward no adapter knows."""
    paths = {record.path for record in adapted}
    rows = list(adapted)
    for record in later:
        module = _module_at(model, record.path)
        kept_for_no_kernel = record.action == "kept" and record.detail == NO_KERNEL and module is not None and \
            record.module == type(module).__name__
        if record.path in paths or (kept_for_no_kernel and isinstance(module, on_kernels)):
            continue
        if kept_for_no_kernel and isinstance(module, (nn.Conv2d, nn.Linear)):
            record = SwapRecord(record.path, record.module, "kept",
                                f"{qualified_name(type(module))} has a forward of its own that no adapter knows "
                                "(kernels.adapters) and no trace could follow")
        rows.append(record)
    return rows


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------
# timm's Conv2dSame


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
                 ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of TensorFlow's 'SAME' padding for an input of spatial `size`: per dim
    pad = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0), pad // 2 before, the rest after (timm's pad_same)."""
    pads = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, k, s, d in zip(size, kernel, stride, dilation)]
    return pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2


class TritonConv2dSame(nn.Conv2d):
    """timm's Conv2dSame on the Triton conv: the 'SAME' padding, asymmetric where it must be, computed from
    each input's size and taken by the kernel as it is (no padded copy of the input, unlike F.pad)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "TritonConv2dSame":
        """A TritonConv2dSame sharing `conv`'s Parameter objects."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        return share(conv, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.check_tensor("x", x, (3, 4))
        padding = same_padding(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation)
        return ops.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME (TensorFlow's, from the input size)"


def _conv2d_same_detail(module: nn.Module, parent: nn.Module) -> str:
    return "TF 'SAME' padding from the input size, on the Triton conv (adapter)"


for _name in ("timm.layers.conv2d_same.Conv2dSame", "timm.models.layers.conv2d_same.Conv2dSame"):  # timm >= 0.9, older
    register(_name, nn.Conv2d, TritonConv2dSame, TritonConv2dSame.from_conv, _conv2d_same_detail)
