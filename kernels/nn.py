"""Modules running the Triton kernels, and `swap`, which puts them into an existing model.

`TritonLinear` is an `nn.Linear` (same parameters, same state_dict keys) whose forward is one
fused kernel, optionally with an activation. `swap(model)` replaces modules in place and shares
their Parameter objects, so an optimizer built before the swap keeps working.

Extending: `FUSABLE[module type] = converter(module, activation_name, negative_slope) -> module`
adds a layer that can absorb a following activation (conv adds nn.Conv2d); `activation_of`
maps the supported activation modules to kernel names for every such layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE
from triton_workbench.kernels import ops, runtime

log = logging.getLogger("triton_workbench.kernels")


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(kernel activation name, negative slope) of a supported activation module, else None."""
    slope = DEFAULT_NEGATIVE_SLOPE
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), slope
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    name = names.get(type(module))
    return (name, slope) if name is not None else None


def activation_kwargs(name: str | None, negative_slope: float) -> dict[str, float]:
    """The keyword arguments of `kernels.ops` for an activation: negative_slope for leaky_relu only."""
    return {"negative_slope": negative_slope} if name == "leaky_relu" else {}


class TritonActivation(nn.Module):
    """An activation module (no parameters) running the elementwise Triton kernel."""

    def __init__(self, name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> None:
        super().__init__()
        ops.resolve_activation(name, **activation_kwargs(name, negative_slope))  # fail early on a bad name
        self.name, self.negative_slope = name, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(x, self.name, **activation_kwargs(self.name, self.negative_slope))

    def extra_repr(self) -> str:
        return self.name + (f", negative_slope={self.negative_slope}" if self.name == "leaky_relu" else "")


class TritonLinear(nn.Linear):
    """nn.Linear computed by the fused Triton GEMM, with an optional fused activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        ops.resolve_activation(activation, **activation_kwargs(activation, negative_slope))  # fail early
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None,
                    negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> "TritonLinear":
        """A TritonLinear sharing `linear`'s Parameter objects (no copy, no new initialisation)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.activation, module.negative_slope = activation, negative_slope
        module.train(linear.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.activation,
                          **activation_kwargs(self.activation, self.negative_slope))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


def _linear_converter(module: nn.Module, activation: str | None, negative_slope: float) -> nn.Module:
    return TritonLinear.from_linear(module, activation, negative_slope)


# module type -> converter(module, activation name or None, negative slope) -> the Triton module
FUSABLE: dict[type[nn.Module], Callable[[nn.Module, str | None, float], nn.Module]] = {nn.Linear: _linear_converter}
ALREADY_SWAPPED: tuple[type[nn.Module], ...] = (TritonLinear, TritonActivation)  # conv appends its module
# module type -> check(module) -> why the Triton module cannot stand in for it (None: it can)
UNSUPPORTED: dict[type[nn.Module], Callable[[nn.Module], str | None]] = {}


@dataclass
class SwapRecord:
    """One line of swap's report: a module, what became of it, and why."""

    path: str
    module: str
    action: str  # "swapped", "fused", "absorbed" (an activation folded into the layer before it), "kept"
    detail: str


def _placement_reason(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Why the kernels cannot run on these tensors' dtypes and devices here, or None if they can."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype not in ops.supported_dtypes():
            return f"{name} dtype {tensor.dtype} not supported"
        if tensor.device.type != runtime.default_device().type and tensor.device.type != "meta":
            return f"{name} is on {tensor.device}; the kernels run on {runtime.default_device().type} here"
    return None


def _activations_reason(container: nn.Module) -> str | None:
    """Why the activations of `container` stay in PyTorch: none of its parameters can run on the kernels
    here (an activation has no parameters of its own to tell its input's dtype and device), or None."""
    reasons = [_placement_reason([(name, parameter)]) for name, parameter in container.named_parameters()]
    return reasons[0] if reasons and all(reasons) else None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why the kernels cannot run `module`'s parameters (or its settings, see UNSUPPORTED) here, or None if they can."""
    check = UNSUPPORTED.get(type(module))
    if check is not None and (reason := check(module)) is not None:
        return reason
    return _placement_reason(module.named_parameters(recurse=False))


def _fusable_converter(module: nn.Module) -> Callable[[nn.Module, str | None, float], nn.Module] | None:
    if isinstance(module, ALREADY_SWAPPED):
        return None
    return next((converter for kind, converter in FUSABLE.items() if type(module) is kind), None)


def _swap_children(parent: nn.Module, prefix: str, records: list[SwapRecord]) -> None:
    names = list(parent._modules)
    activations_reason = _activations_reason(parent)
    index = 0
    kept_layer = ""  # path of a layer just left in torch for its dtype: its activation stays with it
    while index < len(names):
        name = names[index]
        child = parent._modules[name]
        path = f"{prefix}{name}"
        index += 1
        if child is None:
            continue
        converter = _fusable_converter(child)
        act = activation_of(child)
        reason = _unsupported_reason(child)
        if converter is not None and reason is None:
            follower = parent._modules.get(names[index]) if index < len(names) else None
            fused = activation_of(follower) if isinstance(parent, nn.Sequential) and follower is not None else None
            if fused is not None:
                setattr(parent, name, converter(child, *fused))
                setattr(parent, names[index], nn.Identity())
                records.append(SwapRecord(path, type(child).__name__, "fused", f"with {fused[0]} (next)"))
                records.append(SwapRecord(f"{prefix}{names[index]}", type(follower).__name__, "absorbed",
                                          f"into {path}; now nn.Identity"))
                index += 1
            else:
                setattr(parent, name, converter(child, None, DEFAULT_NEGATIVE_SLOPE))
                records.append(SwapRecord(path, type(child).__name__, "swapped", "no activation to fuse"))
        elif act is not None and kept_layer:
            records.append(SwapRecord(path, type(child).__name__, "kept", f"follows {kept_layer}, left in torch"))
        elif act is not None and activations_reason:
            records.append(SwapRecord(path, type(child).__name__, "kept", f"its container's {activations_reason}"))
        elif act is not None:
            setattr(parent, name, TritonActivation(*act))
            records.append(SwapRecord(path, type(child).__name__, "swapped", act[0]))
        elif len(child._modules) > 0:
            _swap_children(child, f"{path}.", records)
        elif not isinstance(child, ALREADY_SWAPPED + (nn.Identity,)):
            records.append(SwapRecord(path, type(child).__name__, "kept", reason or "no Triton kernel for this module"))
        kept_layer = path if converter is not None and reason is not None else ""


def _to_channels_last(module: nn.Module, inputs: tuple) -> tuple:
    """A forward pre-hook: 4-D tensor inputs in channels_last, converted once at the model's entry."""
    return tuple(x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4
                 else x for x in inputs)


def use_channels_last(model: nn.Module) -> nn.Module:
    """Run `model` channels_last end to end: its 4-D parameters and buffers converted in place (the same
    Parameter objects, so optimizers keep working) and its 4-D inputs converted once at its entry, so no
    layer converts per call and the conv kernels read contiguous channels. Idempotent; returns `model`."""
    model.to(memory_format=torch.channels_last)
    if not getattr(model, "_workbench_channels_last", False):
        model.register_forward_pre_hook(_to_channels_last)
        model._workbench_channels_last = True
    return model


def swap(model: nn.Module, verbose: bool = False, channels_last: bool = False) -> nn.Module:
    """Replace, in place, every supported layer and activation of `model` by its Triton module.

    A layer directly followed by a supported activation inside an nn.Sequential absorbs it (the
    activation's slot becomes nn.Identity, so indices and state_dict keys stay valid). Parameters
    are shared, not copied. A module is swapped only where the kernels can run it: layers whose
    parameters have a dtype or device the kernels do not take here stay in PyTorch, and so do the
    activations of a container all of whose parameters are such: a swap never turns a working model
    into a failing one. With `channels_last`, a model with a Triton conv runs channels_last end to end
    (`use_channels_last`): the layout the conv kernels read fastest. It is opt-in because the model's
    intermediate tensors then come out channels_last, and code of its own that calls `.view` on them
    (rather than `.reshape`/`flatten`) would fail. Logs a one-line summary; `verbose` prints a table of every module
    swapped or left alone, and why. Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    records: list[SwapRecord] = []
    if _fusable_converter(model) is not None or activation_of(model) is not None:
        raise ValueError("model must be a container: swap replaces children in place, not the model itself")
    _swap_children(model, "", records)
    if channels_last and any(isinstance(module, TritonConv2d) for module in model.modules()):
        use_channels_last(model)
    counts = {action: sum(r.action == action for r in records) for action in ("fused", "swapped", "absorbed", "kept")}
    log.info("kernels.nn.swap: %d layers fused with their activation, %d modules swapped, %d left alone",
             counts["fused"], counts["swapped"], counts["kept"])
    if verbose:
        print(format_table(records))
    return model


def format_table(records: list[SwapRecord]) -> str:
    """An aligned text table of swap records."""
    header = SwapRecord("module path", "type", "action", "detail")
    rows = [header, *records]
    widths = [max(len(getattr(r, field)) for r in rows) for field in ("path", "module", "action")]
    lines = [f"{r.path:<{widths[0]}}  {r.module:<{widths[1]}}  {r.action:<{widths[2]}}  {r.detail}" for r in rows]
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# conv2d


class TritonConv2d(nn.Conv2d):
    """nn.Conv2d (padding_mode 'zeros') computed by the implicit-GEMM Triton kernel, with an optional fused activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 activation: str | None = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        ops.resolve_activation(activation, **activation_kwargs(activation, negative_slope))  # fail early
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str | None = None,
                  negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> "TritonConv2d":
        """A TritonConv2d sharing `conv`'s Parameter objects (no copy, no new initialisation)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(module, name, getattr(conv, name))
        module.weight, module.bias = conv.weight, conv.bias
        module.activation, module.negative_slope = activation, negative_slope
        module.train(conv.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                          self.activation, **activation_kwargs(self.activation, self.negative_slope))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "")


def _conv2d_converter(module: nn.Module, activation: str | None, negative_slope: float) -> nn.Module:
    return TritonConv2d.from_conv(module, activation, negative_slope)


def _conv2d_unsupported(module: nn.Module) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} not supported (only 'zeros')"
    return None


FUSABLE[nn.Conv2d] = _conv2d_converter
UNSUPPORTED[nn.Conv2d] = _conv2d_unsupported
ALREADY_SWAPPED += (TritonConv2d,)
