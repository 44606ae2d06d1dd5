"""Adapters: Triton modules for layer classes whose `forward` is their own but whose semantics are known.

`swap` puts a subclass of nn.Conv2d / nn.Linear on the kernels when its forward is its parent's
(`fusion.behaves_as`); one that overrides forward computes something else, so it stays in PyTorch
unless an adapter here says what it computes. Classes are matched by fully qualified name (module +
qualname), so a library such as timm is never imported, and must also be instances of the adapter's
base class. A subclass of a matched class that keeps its forward is matched too.

The registry (`registry()`) is built on first use, in `_built_in`, from the modules that hold the Triton
modules: timm's `Conv2dSame` (`kernels.conv2d_same`: TensorFlow 'SAME' padding from the input size at every
call, the Triton conv with that asymmetric padding) and nn.MultiheadAttention (`kernels.attention`);
importing those modules registers nothing. `adapt` runs before the fusion pass: it replaces each matched
module in the model's tree by its adapter (sharing the Parameter objects, so state_dict keys and optimizers
are unchanged), or records why it stays in PyTorch.

Extending: `register(qualified_name, base, product, build, describe)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from triton_workbench.kernels.fusion import SwapRecord


@dataclass(frozen=True)
class Adapter:
    base: type[nn.Module]  # a matched module must be an instance of it
    product: type[nn.Module]  # the Triton module's class
    build: Callable[[nn.Module], nn.Module]  # the module -> its Triton replacement, sharing its parameters
    describe: Callable[[nn.Module, nn.Module], str]  # (module, its parent) -> the table's detail


_ADAPTERS: dict[str, Adapter] = {}  # "module.qualname" of a class -> its adapter; `registry()` fills it


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _built_in() -> dict[str, Adapter]:
    """The adapters swap knows: timm's Conv2dSame (under both of its import paths) and nn.MultiheadAttention.
    Imported here rather than at the top: those modules build their Triton modules with `share`, from this one."""
    from triton_workbench.kernels import attention, conv2d_same

    same = Adapter(nn.Conv2d, conv2d_same.TritonConv2dSame, conv2d_same.TritonConv2dSame.from_conv,
                   conv2d_same.describe)
    return {"timm.layers.conv2d_same.Conv2dSame": same,  # timm >= 0.9
            "timm.models.layers.conv2d_same.Conv2dSame": same,  # older timm
            qualified_name(nn.MultiheadAttention): Adapter(nn.MultiheadAttention, attention.TritonMultiheadAttention,
                                                           attention.TritonMultiheadAttention.from_module,
                                                           attention.describe)}


def registry() -> dict[str, Adapter]:
    """"module.qualname" of a class -> its adapter: the built-in ones (`_built_in`), then those `register` added."""
    if not _ADAPTERS:
        _ADAPTERS.update(_built_in())
    return _ADAPTERS


def register(name: str, base: type[nn.Module], product: type[nn.Module], build: Callable[[nn.Module], nn.Module],
             describe: Callable[[nn.Module, nn.Module], str]) -> None:
    """Adapt modules whose class is called `name` (module + qualname) and is a subclass of `base` by
    `build(module)`, an instance of `product`; `describe(module, parent)` is the table's detail. A name
    registered already (a built-in one too) gets the new adapter."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, a class's fully qualified name ('module.Class'), got "
                        f"{type(name).__name__}")
    if "." not in name.strip("."):
        raise ValueError(f"name must be a class's fully qualified name ('module.Class'), got {name!r}")
    for argument, value in (("base", base), ("product", product)):
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise TypeError(f"{argument} must be an nn.Module subclass, got {value!r}")
    for argument, value in (("build", build), ("describe", describe)):
        if not callable(value):
            raise TypeError(f"{argument} must be callable, got {type(value).__name__}")
    registry()[name] = Adapter(base, product, build, describe)


def _registered(module: object) -> type | None:
    """The nearest class in `module`'s class hierarchy that has an adapter, or None (also for an adapter's own)."""
    adapters = registry()
    if isinstance(module, tuple(adapter.product for adapter in adapters.values())):
        return None
    return next((cls for cls in type(module).__mro__ if qualified_name(cls) in adapters), None)


def claimed(module: object) -> bool:
    """Whether a registered class is among `module`'s classes: `adapt` decides for it, adapting or keeping it."""
    return _registered(module) is not None


def find(module: object) -> Adapter | None:
    """The adapter for `module`: its class's, or that of its nearest registered ancestor if it keeps that forward;
    None if there is none."""
    cls = _registered(module)
    return None if cls is None or _why_not(module, cls) else registry()[qualified_name(cls)]


def _why_not(module: object, cls: type) -> str | None:
    """Why the adapter of `module`'s registered class `cls` cannot stand for it (None: it can)."""
    adapter = registry()[qualified_name(cls)]
    if not isinstance(module, adapter.base):
        return f"{qualified_name(cls)} is not a subclass of {adapter.base.__name__}: its adapter does not apply"
    if getattr(type(module), "forward", None) is not getattr(cls, "forward", None):
        return f"{qualified_name(type(module))} overrides the forward of {qualified_name(cls)}: no adapter for it"
    if parametrize.is_parametrized(module):  # its class is parametrize's, whose properties an adapter's lacks
        return f"torch.nn.utils.parametrize made its class (parametrized: {', '.join(module.parametrizations)}), " \
               "whose properties the adapter's class would drop"
    return None


# the registries `share` copies: a Parameter, buffer or submodule registered on either module stays its own
_REGISTRIES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def share(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of `cls` with `module`'s state, no __init__ run: the same Parameter, buffer and child objects
    (in new registries, so neither module's registrations change the other's), and every other attribute the
    same object: the hook dicts too, so hooks registered on `module` run on its twin and a handle's `remove()`
    removes them from both."""
    twin = cls.__new__(cls)
    twin.__dict__.update({key: copy.copy(value) if key in _REGISTRIES else value
                          for key, value in vars(module).items()})
    return twin


def adapt(model: nn.Module, unsupported: Callable[[nn.Module], str | None], prefix: str = "",
          done: dict[int, nn.Module] | None = None) -> list[SwapRecord]:
    """Replace, in place, every module of `model`'s tree that an adapter matches by its Triton module, unless
    `unsupported(m)` gives a reason for it or one of its submodules (dtype, device, forward hooks): then it
    stays, with that reason, as does a claimed module no adapter matches (a subclass overriding the registered
    forward) or one that torch.nn.utils.parametrize changed. A module shared at several paths gets one adapter.
    A row per path."""
    done = {} if done is None else done
    records: list[SwapRecord] = []
    for name, child in list(model._modules.items()):
        path = prefix + name
        if child is None:
            continue
        cls = _registered(child)
        if cls is None:
            records += adapt(child, unsupported, f"{path}.", done)
            continue
        reason = _why_not(child, cls) or next(
            (why for inner in child.modules() if (why := unsupported(inner)) is not None), None)
        if reason is not None:
            records.append(SwapRecord(path, type(child).__name__, "kept", reason))
            continue
        adapter = registry()[qualified_name(cls)]
        if id(child) not in done:
            done[id(child)] = adapter.build(child)
        model._modules[name] = done[id(child)]
        records.append(SwapRecord(path, type(child).__name__, "swapped", adapter.describe(child, model)))
    return records
