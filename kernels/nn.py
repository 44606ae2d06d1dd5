"""Modules running the Triton kernels, and `swap`, which puts the kernels into an existing model.

`swap(model)` traces the model with torch.fx and rewrites it through the fusion pass
(`kernels.fusion`): conv -> BN -> (+ residual) -> activation chains and the rest become calls of
`kernels.chains` on the model's own modules; it returns the model to use (a GraphModule sharing the
model's modules, parameters and buffers). A module that cannot be traced (data-dependent control
flow) is swapped by module walk instead: `TritonLinear` / `TritonConv2d` (an nn.Linear / nn.Conv2d
with the same parameters and state_dict keys, optionally with a fused activation) replace its layers
in place, a layer absorbing the activation that follows it in an nn.Sequential, and its child
containers are traced one by one. Before either, modules with a forward of their own whose semantics an
adapter knows (`kernels.adapters`: timm's Conv2dSame, nn.MultiheadAttention) are replaced by their Triton
modules in place.

Extending the module walk: `FUSABLE[module type] = converter(module, activation_name, negative_slope)
-> module` adds a layer that can absorb a following activation (conv adds nn.Conv2d).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import fx, nn

from triton_workbench.kernels import adapters, fusion, ops, runtime
from triton_workbench.kernels.attention import TritonMultiheadAttention
from triton_workbench.kernels.conv2d_same import TritonConv2dSame
from triton_workbench.kernels.fusion import NO_KERNEL, SwapRecord, activation_of, behaves_as
from triton_workbench.kernels.ops import activation_kwargs

log = logging.getLogger("triton_workbench.kernels")


class TritonActivation(nn.Module):
    """An activation module (no parameters) running the elementwise Triton kernel."""

    def __init__(self, name: str, negative_slope: float | None = None) -> None:
        super().__init__()
        ops.resolve_activation(name, **activation_kwargs(name, negative_slope))  # fail early on a bad name
        self.name, self.negative_slope = name, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(x, self.name, **activation_kwargs(self.name, self.negative_slope))

    def extra_repr(self) -> str:
        return self.name + "".join(f", {key}={value}" for key, value in activation_kwargs(self.name,
                                                                                         self.negative_slope).items())


class TritonLinear(nn.Linear):
    """nn.Linear computed by the fused Triton GEMM, with an optional fused activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 negative_slope: float | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        ops.resolve_activation(activation, **activation_kwargs(activation, negative_slope))  # fail early
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None,
                    negative_slope: float | None = None) -> "TritonLinear":
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


def _linear_converter(module: nn.Module, activation: str | None, negative_slope: float | None) -> nn.Module:
    return TritonLinear.from_linear(module, activation, negative_slope)


# module type -> converter(module, activation name or None, negative slope) -> the Triton module
FUSABLE: dict[type[nn.Module], Callable[[nn.Module, str | None, float | None], nn.Module]] = {
    nn.Linear: _linear_converter}
ALREADY_SWAPPED: tuple[type[nn.Module], ...] = (TritonLinear, TritonActivation, TritonConv2dSame,
                                                 TritonMultiheadAttention)  # conv appends its module
# module type -> check(module) -> why the Triton module cannot stand in for it (None: it can)
UNSUPPORTED: dict[type[nn.Module], Callable[[nn.Module], str | None]] = {}


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
    """Why the kernels cannot run `module` here, or None if they can: its settings (UNSUPPORTED), forward hooks
    (weight_norm, spectral_norm and pruning recompute the weight in one, which a fused chain would not call),
    or the dtype or device of its parameters and buffers (a BatchNorm's running stats)."""
    check = next((check for kind, check in UNSUPPORTED.items() if isinstance(module, kind)), None)
    if check is not None and (reason := check(module)) is not None:
        return reason
    if module._forward_pre_hooks or module._forward_hooks:
        return "it has forward hooks, which a fused kernel would not run"
    return _placement_reason([*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])


def _fusable_converter(module: nn.Module) -> Callable[[nn.Module, str | None, float], nn.Module] | None:
    if isinstance(module, ALREADY_SWAPPED):
        return None
    return next((converter for kind, converter in FUSABLE.items() if behaves_as(module, kind)), None)


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
                setattr(parent, name, converter(child, None, None))
                records.append(SwapRecord(path, type(child).__name__, "swapped", "no activation to fuse"))
        elif act is not None and kept_layer:
            records.append(SwapRecord(path, type(child).__name__, "kept", f"follows {kept_layer}, left in torch"))
        elif act is not None and activations_reason:
            records.append(SwapRecord(path, type(child).__name__, "kept", f"its container's {activations_reason}"))
        elif act is not None:
            setattr(parent, name, TritonActivation(*act))
            records.append(SwapRecord(path, type(child).__name__, "swapped", act[0]))
        elif isinstance(child, ALREADY_SWAPPED) or adapters.claimed(child):
            pass  # on the kernels already, or an adapter's module left in PyTorch (`adapters.adapt` said why)
        elif len(child._modules) > 0:
            setattr(parent, name, _swap_module(child, f"{path}.", records))
        elif not isinstance(child, nn.Identity) and not _empty_container(child):
            records.append(SwapRecord(path, type(child).__name__, "kept", reason or "no Triton kernel for this module"))
        kept_layer = path if converter is not None and reason is not None else ""


def _empty_container(module: nn.Module) -> bool:
    """An nn.Sequential / ModuleList / ModuleDict with no modules and nothing of its own: nothing to run or keep."""
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and not (
        module._modules or module._parameters or module._buffers)


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


def _swap_module(module: nn.Module, prefix: str, records: list[SwapRecord]) -> nn.Module:
    """`module` rewritten by the fusion pass (a GraphModule), or, where one graph cannot stand for it,
    `module` with its children swapped by module walk (`_swap_children`, which traces child containers)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and type(module).forward is nn.Module.forward:
        _swap_children(module, prefix, records)  # a container without a forward: its children run, not it
        return module
    try:
        traced = fusion.trace(module, _leaves(module))
        why = _graph_falls_short(module, traced)
    except Exception as error:  # any failure of symbolic tracing in the user's code: fall back, say why
        why = f"torch.fx cannot trace it ({(str(error).strip().splitlines() or [type(error).__name__])[0][:80]})"
    if why is not None:
        records.append(SwapRecord(prefix.rstrip(".") or "(model)", type(module).__name__, "walked",
                                  f"{why}; its children swapped one by one"))
        _swap_children(module, prefix, records)
        return module
    reason = _activations_reason(module)
    found = fusion.fuse(traced, _unsupported_reason, f"the model's {reason}" if reason else None)
    records += [SwapRecord(prefix + r.path, r.module, r.action, r.detail) for r in found]
    return traced


def _leaves(module: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module types a trace keeps as calls: those on the kernels, and those of modules an adapter claims but
    left in PyTorch (timm's Conv2dSame pads in Python a trace cannot follow; so does MultiheadAttention)."""
    return ALREADY_SWAPPED + tuple({type(inner) for inner in module.modules() if adapters.claimed(inner)})


def _graph_falls_short(module: nn.Module, traced: nn.Module) -> str | None:
    """Why `traced` would not do what `module` does, or None: a forward hook on a module the trace runs
    through (the graph would skip it), or a forward that depends on `self.training` (frozen into the graph
    at trace time, e.g. F.dropout(x, p, self.training)): traced again in the other mode, the code or a tensor
    made in forward differs (one made at random differs too, and is frozen as much)."""
    for name, inner in module.named_modules():
        if (not name or len(inner._modules)) and (inner._forward_pre_hooks or inner._forward_hooks):
            return f"{name or 'it'} has forward hooks, which a traced graph would skip"
    modes = {inner: inner.training for inner in module.modules()}
    try:
        for inner, training in modes.items():
            inner.training = not training
        other = fusion.trace(module, _leaves(module))
    finally:
        for inner, training in modes.items():
            inner.training = training
    difference = _difference(module, traced, other)
    if difference == "code":
        return "its forward depends on self.training, which tracing would freeze"
    if difference == "tensor":
        return "a tensor its forward makes differs between calls (random, or set by self.training), " \
               "which tracing would freeze"
    return None


def _difference(module: nn.Module, traced: fx.GraphModule, other: fx.GraphModule) -> str | None:
    """How two traces of `module` differ: "code" (an op, target or argument), "tensor" (a tensor made in forward,
    which torch.fx stows on the GraphModule under a name of its own: compared by value, whatever its name), or None."""
    if len(traced.graph.nodes) != len(other.graph.nodes):
        return "code"
    pairs = dict(zip(other.graph.nodes, traced.graph.nodes))
    difference = None
    for node, twin in pairs.items():
        if node.op != twin.op or fx.map_arg((node.args, node.kwargs), pairs.get) != (twin.args, twin.kwargs):
            return "code"
        made = [getattr(gm, n.target) if n.op == "get_attr" and "." not in n.target and not hasattr(module, n.target)
                else None for gm, n in ((traced, twin), (other, node))]
        if not all(isinstance(value, torch.Tensor) for value in made):
            if node.target != twin.target:
                return "code"
            continue
        try:
            torch.testing.assert_close(*made, rtol=0, atol=0, equal_nan=True)
        except AssertionError:
            difference = "tensor"
    return difference


def swap(model: nn.Module, verbose: bool = False, channels_last: bool = False) -> nn.Module:
    """`model` with every supported layer, BatchNorm and activation running on the Triton kernels: use the
    model this returns.

    The fusion pass fuses conv -> BN -> (+ residual) -> activation, BN -> activation, conv -> activation and
    linear -> activation chains wherever they are in the model's forward (see `kernels.fusion`). Parameters,
    buffers and state_dict keys are the model's own (an optimizer built before the swap keeps working;
    checkpoints load both ways), and `train()` / `eval()` switch BatchNorm between batch and running
    statistics as in PyTorch. Layers whose parameters have a dtype or device the kernels do not take here
    stay in PyTorch, and so do the activations of a model none of whose parameters can run on the kernels:
    a swap never turns a working model into a failing one. Modules with a forward of their own that an adapter
    knows (`kernels.adapters`: timm's Conv2dSame, nn.MultiheadAttention) are first replaced, in the model's own
    tree, by Triton modules sharing their parameters. With `channels_last`, a model with a swapped conv
    runs channels_last end to end (`use_channels_last`): the layout the conv kernels read fastest. It is
    opt-in because the model's intermediate tensors then come out channels_last, and code of its own that
    calls `.view` on them (rather than `.reshape`/`flatten`) would fail. Logs a one-line summary; `verbose`
    prints a table of every chain fused and everything left in PyTorch, and why; the returned model keeps
    that table's records as `swap_records`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _fusable_converter(model) is not None or activation_of(model) is not None or adapters.claimed(model):
        raise ValueError("model must be a container: swap rewrites what the model runs, not a single layer")
    adapted = adapters.adapt(model, _unsupported_reason)  # subclasses with their own forward, MultiheadAttention
    records = list(adapted)
    swapped = _swap_module(model, "", records)
    records = _tidy(adapted, records[len(adapted):], model)
    convs = any(r.module == "Conv2d" and r.action in ("fused", "swapped") for r in records)
    if channels_last and convs:
        use_channels_last(swapped)
    counts = {action: sum(r.action == action for r in records) for action in ("fused", "swapped", "kept", "walked")}
    log.info("kernels.nn.swap: %d chains fused, %d modules swapped alone, %d left in PyTorch, %d untraceable "
             "modules walked", counts["fused"], counts["swapped"], counts["kept"], counts["walked"])
    if verbose:
        print(format_table(records))
    swapped.swap_records = records
    return swapped


def _tidy(adapted: list[SwapRecord], later: list[SwapRecord], model: nn.Module) -> list[SwapRecord]:
    """The adapter rows, then the fusion pass's and module walk's rows less those on the adapters' paths and
    those calling a module already on the kernels (ALREADY_SWAPPED) kept; a conv or linear subclass kept for want
    of a kernel is said to be one whose forward no adapter knows."""
    paths = {record.path for record in adapted}
    rows = list(adapted)
    for record in later:
        module = _module_at(model, record.path)
        kept_for_no_kernel = record.action == "kept" and record.detail == NO_KERNEL and module is not None and \
            record.module == type(module).__name__
        if record.path in paths or (kept_for_no_kernel and isinstance(module, ALREADY_SWAPPED)):
            continue
        if kept_for_no_kernel and isinstance(module, (nn.Conv2d, nn.Linear)):
            record = SwapRecord(record.path, record.module, "kept",
                                f"{adapters.qualified_name(type(module))} has a forward of its own that no adapter "
                                "knows (kernels.adapters) and no trace could follow")
        rows.append(record)
    return rows


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


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
                 activation: str | None = None, negative_slope: float | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        ops.resolve_activation(activation, **activation_kwargs(activation, negative_slope))  # fail early
        self.activation, self.negative_slope = activation, negative_slope

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str | None = None,
                  negative_slope: float | None = None) -> "TritonConv2d":
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


def _conv2d_converter(module: nn.Module, activation: str | None, negative_slope: float | None) -> nn.Module:
    return TritonConv2d.from_conv(module, activation, negative_slope)


def _conv_unsupported(module: nn.Module) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} not supported (only 'zeros')"
    return None


FUSABLE[nn.Conv2d] = _conv2d_converter
UNSUPPORTED[nn.Conv2d] = UNSUPPORTED[nn.Conv1d] = UNSUPPORTED[nn.ConvTranspose2d] = _conv_unsupported
ALREADY_SWAPPED += (TritonConv2d,)
