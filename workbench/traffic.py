"""Kernel launches and bytes of one training step (forward and backward), counted without a GPU.

The step runs on the meta device (shapes only) under a dispatch mode that records every kernel:

- a PyTorch op is one kernel that reads each of its tensor inputs and writes each output once; views,
  allocations, detach and ops on empty tensors move nothing and launch nothing. Two ops follow PyTorch's own CUDA kernels instead:
  BatchNorm in training is two kernels each way (statistics, then the elementwise pass:
  `batch_norm_collect_statistics` / `batch_norm_transform_input`, and their backward pair) reading
  the input in both, and `convolution_backward` is one kernel per gradient it computes (dgrad reads
  dy and the weight, wgrad dy and the input, the bias gradient dy);
- a Triton op (`workbench::*`) runs its real launcher on the meta tensors with every Triton kernel's
  launch recorded instead of run, together with the PyTorch ops the launcher itself calls: a launch
  reads each tensor that existed before the op in full; a tensor the op creates is written once by
  the kernel that first touches it (a depthwise dgrad's stride phases each read all of dz and together
  write dx once) and read in full by each other kernel that touches it later.

So the figures are an analytic model of DRAM traffic (no cache reuse, no partial writes: an upper
bound for a kernel that reads only part of an input), not a measurement. One undercount: a kernel that
reads back what it wrote in the same launch (the split-K or moments partials its last programs merge,
`kernels.arrival`) is charged for the write only. The step counted is a second one: the first of a
process also does one-time work a training loop does not repeat (zeroing the cached arrival counters).
The optimizer step is the same for both models and left out.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from triton_workbench.kernels.aot import Launch

CATEGORIES = {  # substring of the op name -> what it is, in the table; the first match wins (addmm is linear)
    "conv2d_backward": "conv backward", "convolution_backward": "conv backward", "conv2d_input_grad": "conv backward",
    "conv": "conv forward",
    "batch_norm": "batch norm", "relu": "activation", "threshold_backward": "activation",
    "activation": "activation", "gemm": "linear", "mm": "linear", "add": "add",
}
_NOTHING_MOVED = ("empty", "detach", "lift_fresh", "promote_types", "as_strided")  # allocations and metadata


@dataclass
class Kernel:
    op: str  # the op (aten::... or workbench::...) that launched it
    name: str  # the kernel: the aten op itself, or the Triton kernel's name
    bytes: int
    layer: str = ""  # the block it belongs to (see `StepRecorder`)


def category(op: str) -> str:
    return next((label for key, label in CATEGORIES.items() if key in op), "other")


def _key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage()._cdata, tensor.storage_offset(), tensor.shape  # (id() of the wrapper is not stable)


def _tensors(*trees: Any) -> list[torch.Tensor]:
    """The distinct tensors (by storage, offset and shape) among the leaves of `trees`."""
    seen, tensors = set(), []
    for leaf in tree_leaves(trees):
        if isinstance(leaf, torch.Tensor) and leaf.numel():
            key = _key(leaf)
            if key not in seen:
                seen.add(key)
                tensors.append(leaf)
    return tensors


def _bytes(*trees: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(*trees))


def _moved(inputs: Any, outputs: Any) -> int:
    """Bytes a kernel reads and writes: an in-place op's output (its input, aliased) is both."""
    return _bytes(inputs) + _bytes(outputs)


def _is_view(func: torch._ops.OpOverload) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _pytorch_kernels(name: str, args: tuple, kwargs: dict, out: Any) -> list[Kernel]:
    """The kernels of one PyTorch op (see the module docstring)."""
    if name == "aten::native_batch_norm" and args[5]:  # training: statistics pass, then normalise pass
        return [Kernel(name, "bn statistics", _bytes(args[0])), Kernel(name, "bn transform", _moved(args, out))]
    if name == "aten::native_batch_norm_backward" and args[7]:
        return [Kernel(name, "bn backward reduce", _bytes(args[:2])),
                Kernel(name, "bn backward elementwise", _moved(args[:2], out[0]))]
    if name == "aten::convolution_backward":
        grad, x, weight = args[:3]
        wanted = zip(("dgrad", "wgrad", "bias grad"), args[-1], out, ((grad, weight), (grad, x), (grad,)))
        return [Kernel(name, kernel, _moved(inputs, result)) for kernel, needed, result, inputs in wanted if needed]
    return [Kernel(name, name, _moved((args, kwargs), out))]


def _block(parameter: str) -> str:
    """The block a parameter belongs to: its path up to the first index (layer1.0 for layer1.0.conv1.weight
    and layer1.0.downsample.1.bias), else its module (conv1 for conv1.weight)."""
    parts = parameter.split(".")[:-1]
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[: index + 1] if index is not None else parts) or "(top)"


class StepRecorder(TorchDispatchMode):
    """Records the kernels of everything run under it (see the module docstring), each with the block it
    belongs to: that of the parameter an op reads (`_block`), else that of a tensor it reads which such an op
    produced (a ReLU's, an add's, a gradient's), else "other" (the batch counters: buffers)."""

    def __init__(self, model: nn.Module, on_launch: Callable[[Any, Launch], None] | None = None) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []
        self._on_launch = on_launch  # also told of each Triton launch: the kernel and what it was passed
        self._parameters = {_key(p): _block(name) for name, p in model.named_parameters()}
        self._produced: dict[tuple, str] = {}  # tensor -> the module of the op that produced it
        self._layer = "other"  # the module of the op running now
        self._inside: str | None = None  # the workbench op whose launcher is running
        self._created: set[tuple] = set()  # tensors that op has allocated so far ...
        self._writer: dict[tuple, str] = {}  # ... and the Triton kernel that wrote each of them first
        self._launched: set[tuple] = set()  # (created tensor, kernel) pairs already charged their write

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self._inside is None:
            self._layer = self._layer_of(args, kwargs)
        if func.namespace == "workbench" and self._inside is None:
            return self._owned(self._run_launcher(name, args, kwargs))
        out = func(*args, **kwargs)
        if self._inside is not None:
            self._created.update(_key(t) for t in _tensors(out))
        moved = _moved((args, kwargs), out)
        if moved and not (_is_view(func) or any(word in name for word in _NOTHING_MOVED)):
            self.kernels += [Kernel(self._inside or k.op, k.name, k.bytes, self._layer)
                             for k in _pytorch_kernels(name, args, kwargs, out)]
        return self._owned(out) if self._inside is None else out

    def _layer_of(self, *trees: Any) -> str:
        keys = [_key(t) for t in _tensors(*trees)]
        found = [self._parameters[k] for k in keys if k in self._parameters] or [
            self._produced[k] for k in keys if k in self._produced]
        return found[0] if found else "other"

    def _owned(self, out: Any) -> Any:
        """`out`, its tensors now known as the current op's module's (for the ops that read them later)."""
        for tensor in _tensors(out):
            self._produced.setdefault(_key(tensor), self._layer)
        return out

    def _run_launcher(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The op's real implementation on the meta tensors, its Triton launches recorded instead of run."""
        implementation = torch._library.custom_ops.OPDEFS[name]._init_fn
        self._inside, self._created, self._writer, self._launched = name, set(), {}, set()
        try:
            with self, _recording_launches(self._launch):
                return implementation(*args, **kwargs)
        finally:
            self._inside = None

    def _launch(self, kernel: Any, launch: Launch) -> None:
        """A Triton launch reads each tensor that existed before its op in full. A tensor its op created is
        written by the first kernel that touches it -- further launches of that kernel write other parts
        of it (a depthwise dgrad's stride phases) -- and read in full by any other kernel after that."""
        if self._on_launch is not None:
            self._on_launch(kernel, launch)
        kernel_name = kernel.__name__
        moved = 0
        for tensor in _tensors(launch.args):
            key = _key(tensor)
            writer = self._writer.setdefault(key, kernel_name) if key in self._created else None
            if writer is None or writer != kernel_name or self._first_launch_of(key, kernel_name):
                moved += tensor.numel() * tensor.element_size()
        self.kernels.append(Kernel(self._inside, kernel_name, moved, self._layer))

    def _first_launch_of(self, key: tuple, kernel_name: str) -> bool:
        """Whether this is the writer's first launch touching the created tensor `key` (it writes it then)."""
        first = (key, kernel_name) not in self._launched
        self._launched.add((key, kernel_name))
        return first


@contextmanager
def _recording_launches(record: Callable[[Any, Launch], None]) -> Iterator[None]:
    """Every project Triton kernel's launch passed to `record(kernel, Launch)` instead of run."""
    from triton_workbench.kernels import runtime

    found = list({id(value): value for module_name, module in list(sys.modules.items())
                  if module_name.startswith("triton_workbench.kernels.")
                  for value in vars(module).values() if runtime.is_kernel(value)}.values())
    for kernel in found:
        kernel.run = lambda *args, grid, warmup, _kernel=kernel, **kwargs: record(_kernel, Launch(args, kwargs, grid))
    try:
        yield
    finally:
        for kernel in found:
            del kernel.run


def step_kernels(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype,
                 on_launch: Callable[[Any, Launch], None] | None = None) -> list[Kernel]:
    """The kernels of a training step (forward, cross-entropy, backward) of `model` on the meta device,
    channels_last in `dtype`, after a first step (see the module docstring); `on_launch(kernel, Launch)` is also
    told of each Triton launch. The model is moved to the meta device."""
    model = model.to(device="meta", dtype=dtype, memory_format=torch.channels_last).train()
    x = torch.empty(input_shape, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(input_shape[0], device="meta", dtype=torch.long)
    for told in (None, on_launch):
        model.zero_grad(set_to_none=True)  # as an optimizer's zero_grad: no accumulation into the first's
        with StepRecorder(model, told) as recorder:
            F.cross_entropy(model(x), labels).backward()
    return recorder.kernels


def bench_models() -> dict[str, Callable[[], nn.Module]]:
    """The models `workbench bench model` knows: torchvision-style ResNet-18/50 (1000 classes) and the demo's
    ResNet (10 classes; its own input is 32x32)."""
    from triton_workbench.workbench.models import build_model
    from triton_workbench.workbench.torchvision_resnet import resnet18, resnet50

    return {"resnet18": resnet18, "resnet50": resnet50, "demo": lambda: build_model("resnet", 3, 10, 32)}


def num_classes(model_name: str) -> int:
    """The classes a model of `bench_models` is built with."""
    return 10 if model_name == "demo" else 1000


def default_image_size(model_name: str) -> int:
    """The input resolution a model is benched at by default: the demo's 32, ImageNet's 224 for the rest."""
    return 32 if model_name == "demo" else 224


def compare(model_name: str, batch: int, image_size: int, dtype: torch.dtype
            ) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(the traffic tables of one training step of `model_name`, eager against swapped, per category and per
    block, and swap's records)."""
    from triton_workbench.kernels.nn import swap

    build = bench_models()[model_name]
    shape = (batch, 3, image_size, image_size)
    eager = step_kernels(build(), shape, dtype)
    swapped = swap(build().to("meta"))  # meta: the kernels take it on any machine (a GPU machine's take CUDA)
    ours = step_kernels(swapped, shape, dtype)
    return traffic_table(eager, ours), block_table(eager, ours), swapped.swap_records


def block_table(eager: list[Kernel], swapped: list[Kernel]) -> pd.DataFrame:
    """Launches and GB per block (`StepRecorder`), in the order the models first run them."""
    def totals(kernels: list[Kernel], side: str) -> pd.DataFrame:
        frame = pd.DataFrame([(k.layer, k.bytes) for k in kernels], columns=["block", "bytes"])
        grouped = frame.groupby("block", sort=False)["bytes"].agg(["count", "sum"])
        return grouped.rename(columns={"count": f"launches_{side}", "sum": f"gb_{side}"})

    table = totals(eager, "eager").join(totals(swapped, "triton"), how="outer", sort=False).fillna(0)
    order = list(dict.fromkeys(k.layer for k in eager + swapped))
    table = table.loc[order]
    for side in ("eager", "triton"):
        table[f"launches_{side}"] = table[f"launches_{side}"].astype(int)
        table[f"gb_{side}"] = table[f"gb_{side}"] / 1e9
    table["bytes_ratio"] = table["gb_triton"] / table["gb_eager"]
    return table.reset_index()


def traffic_table(eager: list[Kernel], swapped: list[Kernel]) -> pd.DataFrame:
    """Launches and GB per category and in total, eager PyTorch against the swapped model, with the ratios."""
    def totals(kernels: list[Kernel], side: str) -> pd.DataFrame:
        frame = pd.DataFrame([(category(k.op), k.bytes) for k in kernels], columns=["category", "bytes"])
        grouped = frame.groupby("category")["bytes"].agg(["count", "sum"])
        return grouped.rename(columns={"count": f"launches_{side}", "sum": f"gb_{side}"})

    table = totals(eager, "eager").join(totals(swapped, "triton"), how="outer").fillna(0)
    table.loc["total"] = table.sum()
    for side in ("eager", "triton"):
        table[f"launches_{side}"] = table[f"launches_{side}"].astype(int)
        table[f"gb_{side}"] = table[f"gb_{side}"] / 1e9
    table["launches_ratio"] = table["launches_triton"] / table["launches_eager"]
    table["bytes_ratio"] = table["gb_triton"] / table["gb_eager"]
    return table.reset_index()
