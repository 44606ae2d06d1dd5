"""Issue 13's Done-when, one block per family, written as torchvision / timm write them (small, structurally
faithful): after `swap`, every conv, linear, BatchNorm and activation of the block runs in Triton, forward and
backward (no such PyTorch op reaches the dispatcher, and the Triton launchers inside the workbench's custom ops
ran for each: `_record_kernels`), depthwise convs run on their direct kernels (forward, dgrad and wgrad), and
outputs, input gradients, parameter gradients and running stats match the unswapped block computed by PyTorch in
float64, in train mode and (for the BatchNorm families) in eval mode.

What may stay in PyTorch is listed in OUT_OF_SCOPE (module types the swap table may mark "kept") and follows from
`_forbidden` (the aten ops that must not run): LayerNorm, pooling, dropout, cat, pad, permute, mul and add are not
conv, linear, BatchNorm or activation, and no kernel of the workbench claims them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import batch_norm, ops
from numerics import relative_error

# ---------------------------------------------------------------------------------------------
# the blocks, as torchvision (torchvision/ops/misc.py, models/*.py) and the U-Net most people copy write them


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: conv (bias only without a norm) -> norm -> activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU, dilation: int = 1,
                 inplace: bool | None = True) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                                             groups=groups, bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(**({} if inplace is None else {"inplace": inplace})))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation (EfficientNet's: SiLU, sigmoid)."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class HardSqueezeExcitation(nn.Module):
    """MobileNetV3's SE as torchvision wrote it first (models/mobilenetv3.py, 0.9-0.10): F.adaptive_avg_pool2d,
    1x1 conv, ReLU, 1x1 conv, F.hardsigmoid in place, multiply."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)

    def _scale(self, input: Tensor, inplace: bool) -> Tensor:
        scale = F.adaptive_avg_pool2d(input, 1)
        scale = self.fc1(scale)
        scale = self.relu(scale)
        scale = self.fc2(scale)
        return F.hardsigmoid(scale, inplace=inplace)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input, True)
        return scale * input


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision.ops.stochastic_depth."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class MobileNetV2InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV3InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv3.InvertedResidual (use_hs, use_se; BatchNorm2d(eps=0.001, momentum=0.01))."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int, out_channels: int,
                 stride: int = 1) -> None:
        super().__init__()
        norm_layer = lambda channels: nn.BatchNorm2d(channels, eps=0.001, momentum=0.01)  # noqa: E731
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers: list[nn.Module] = [
            Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1, norm_layer=norm_layer,
                                 activation_layer=nn.Hardswish),
            Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                 groups=expanded_channels, norm_layer=norm_layer, activation_layer=nn.Hardswish),
            HardSqueezeExcitation(expanded_channels, max(8, expanded_channels // 4)),
            Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1, norm_layer=norm_layer,
                                 activation_layer=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MBConv(nn.Module):
    """torchvision.models.efficientnet.MBConv (stochastic depth at p = 0: off)."""

    def __init__(self, input_channels: int, expand_ratio: float, kernel: int, out_channels: int, stride: int = 1,
                 stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        norm_layer, activation_layer = nn.BatchNorm2d, nn.SiLU
        expanded_channels = int(input_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        squeeze_channels = max(1, input_channels // 4)
        layers.append(SqueezeExcitation(expanded_channels, squeeze_channels,
                                        activation=lambda: nn.SiLU(inplace=True)))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class CNBlock(nn.Module):
    """torchvision.models.convnext.CNBlock (LayerNorm eps 1e-6; a layer scale of 0.5 rather than 1e-6, so that the
    block's branch is not lost in the residual's rounding)."""

    def __init__(self, dim: int, layer_scale: float = 0.5, stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class _DenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer (memory_efficient=False)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: list[Tensor] | Tensor) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        if self.memory_efficient:
            raise NotImplementedError("checkpointing is not part of this test")
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """torchvision.models.densenet._Transition."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetTail(nn.Module):
    """torchvision's DenseNet from its first dense block on: a dense block, a transition, the final norm, then
    DenseNet.forward's functional `F.relu(features, inplace=True)`, pooling and the classifier."""

    def __init__(self, channels: int, growth_rate: int = 4, bn_size: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        grown = channels + 2 * growth_rate
        self.features = nn.Sequential(OrderedDict([
            ("denseblock1", _DenseBlock(2, channels, bn_size, growth_rate)),
            ("transition1", _Transition(grown, grown // 2)),
            ("norm5", nn.BatchNorm2d(grown // 2)),
        ]))
        self.classifier = nn.Linear(grown // 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


class VGGBN(nn.Module):
    """torchvision.models.vgg.VGG with make_layers(batch_norm=True): one stage (conv -> BN -> ReLU(inplace) x2,
    max pool), the average pool, and a classifier Linear -> ReLU(inplace) -> Dropout -> Linear."""

    def __init__(self, in_channels: int, width: int, hidden: int = 16, num_classes: int = 3,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for v in (width, width, "M"):
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(width * 2 * 2, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class DoubleConv(nn.Module):
    """(convolution => [BN] => ReLU) * 2, as in milesial/Pytorch-UNet's unet_parts.py."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """Pytorch-UNet's Up (bilinear=False): ConvTranspose2d up-sampling, pad to the skip's size, cat, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = self.up(x1)
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class FunctionalActivations(nn.Module):
    """Activations called as functions: F.relu after a conv, a torch.sigmoid gate, F.silu alone, F.gelu after a
    linear, x.relu_() after a residual add."""

    def __init__(self, channels: int, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x))
        y = y * torch.sigmoid(self.conv2(y))
        y = F.silu(y)
        y = (self.conv3(y) + x).relu_()
        return self.fc2(F.gelu(self.fc1(y.mean((2, 3)))))


# ---------------------------------------------------------------------------------------------
# the families


@dataclasses.dataclass
class Family:
    name: str
    make: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]  # the inputs'
    batch_norm: bool  # whether eval mode (running statistics) is checked too
    channels_last: bool = False  # channels_last inputs, and `swap(..., channels_last=True)`


FAMILIES = [
    Family("mobilenet_v2", lambda: MobileNetV2InvertedResidual(8, 8, stride=1, expand_ratio=2), ((2, 8, 8, 8),),
           True, channels_last=True),
    Family("mobilenet_v3", lambda: MobileNetV3InvertedResidual(8, 5, 16, 8), ((2, 8, 8, 8),), True),
    Family("efficientnet", lambda: MBConv(8, 2, 5, 8), ((2, 8, 8, 8),), True, channels_last=True),
    Family("convnext", lambda: CNBlock(8), ((2, 8, 8, 8),), False),
    Family("densenet", lambda: DenseNetTail(8), ((2, 8, 8, 8),), True),
    Family("vgg_bn", lambda: VGGBN(3, 8), ((2, 3, 8, 8),), True),
    Family("unet_decoder", lambda: Up(8, 4), ((2, 8, 4, 4), (2, 4, 9, 9)), True),
    Family("functional_activations", lambda: FunctionalActivations(8), ((2, 8, 8, 8),), False),
]

# module types the swap table may mark "kept": not conv, linear, BatchNorm or activation, and no kernel claims them
OUT_OF_SCOPE = {
    "LayerNorm": "a normalisation over channels-last rows, not BatchNorm: no kernel (ConvNeXt)",
    "MaxPool2d": "pooling: no kernel (VGG)",
    "AvgPool2d": "pooling: no kernel (DenseNet's transition)",
    "AdaptiveAvgPool2d": "pooling: no kernel (SE blocks, VGG)",
    "Dropout": "random masking: no kernel (VGG's classifier)",
}

# aten ops (schema names) that must not run in a swapped block: PyTorch's conv, matmul, BatchNorm, activations
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "addmv", "mv", "dot", "_addmm_activation"}
_ACTIVATIONS = {
    "relu", "relu_", "relu6", "relu6_", "threshold", "threshold_", "threshold_backward", "hardtanh", "hardtanh_",
    "hardtanh_backward", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardswish",
    "hardswish_", "hardswish_backward", "hardsigmoid", "hardsigmoid_", "hardsigmoid_backward", "silu", "silu_",
    "silu_backward", "sigmoid", "sigmoid_", "sigmoid_backward", "gelu", "gelu_", "gelu_backward", "tanh", "tanh_",
    "tanh_backward", "mish", "mish_", "mish_backward", "elu", "elu_", "elu_backward", "celu", "celu_", "selu",
    "selu_", "leaky_relu", "leaky_relu_", "leaky_relu_backward", "softplus", "softplus_backward", "prelu",
    "_prelu_kernel", "_prelu_kernel_backward", "log_sigmoid_forward", "log_sigmoid_backward", "glu",
}


def _forbidden(name: str) -> bool:
    """Whether an op (schema name, 'namespace::op') is PyTorch's conv, matmul, BatchNorm or activation."""
    namespace, _, op = name.partition("::")
    if namespace not in ("aten", "mkldnn", "cudnn", "miopen"):
        return False  # workbench::* is ours; prims and the like are not what the kernels replace
    return "conv" in op or "batch_norm" in op or op in _MATMUL or op in _ACTIVATIONS


class _Ops(TorchDispatchMode):
    """The name of every op reaching the dispatcher below autograd (aten ops and the workbench's custom ops; a
    custom op's own implementation runs with this mode off, so what it calls inside is not listed: the launchers
    it calls are wrapped instead, `_record_kernels`)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One call of a Triton launcher from inside a workbench:: custom op."""
    launcher: str
    backward: bool
    activation: bool  # whether the launch computes an activation (forward) or its derivative (backward)
    key: object  # conv: (weight shape, groups); GEMM: the linear's weight shape; BN: its BN weights' data pointers


def _conv_key(weight_at: int) -> Callable:
    return lambda args, kwargs: (tuple(args[weight_at].shape), args[3].groups)


def _activation_at(args: tuple, index: int) -> bool:
    """Whether a launcher was given an activation at position `index` (absent: none, as for BN statistics)."""
    return len(args) > index and args[index] is not None


def _bn_key(norm_at: int) -> Callable:
    """The data pointers of the BN weights in a launch's Norm (argument norm_at) and residual Norm (2 after it)."""
    return lambda args, kwargs: frozenset(norm.weight.data_ptr() for norm in (args[norm_at], args[norm_at + 2])
                                          if norm is not None and norm.weight is not None)


# The launchers the workbench:: custom ops call, whose insides a TorchDispatchMode cannot see (a custom op runs
# its implementation with the mode off): name -> (module, attribute, backward(args, kwargs), activation(args,
# kwargs), key(args, kwargs)). Conv: the direct depthwise kernels or the implicit GEMM (geometry at argument 3; an
# activation's derivative is formed by the activation kernel first). GEMM: b is the linear's weight transposed.
# BatchNorm: the normalise (+ residual + activation) kernel and its backward, on Norms holding the BN's weight.
# Activation: the elementwise kernel, forward or (with `grad`) backward.
_LAUNCHERS = {
    "depthwise_forward": (ops, "depthwise_forward", False, lambda a, k: _activation_at(a, 4), _conv_key(1)),
    "depthwise_input_grad": (ops, "depthwise_input_grad", True, lambda a, k: False, _conv_key(1)),
    "depthwise_weight_grad": (ops, "depthwise_weight_grad", True, lambda a, k: False, _conv_key(2)),
    "conv2d_forward": (ops, "conv2d_forward", False, lambda a, k: _activation_at(a, 4), _conv_key(1)),
    "conv2d_input_grad": (ops, "conv2d_input_grad", True, lambda a, k: False, _conv_key(1)),
    "conv2d_weight_grad": (ops, "conv2d_weight_grad", True, lambda a, k: False, _conv_key(2)),
    "gemm_forward": (ops.gemm_kernels, "forward", False, lambda a, k: a[3] is not None,
                     lambda a, k: tuple(a[1].shape)[::-1]),
    "gemm_backward": (ops.gemm_kernels, "backward", True, lambda a, k: a[4] is not None,
                      lambda a, k: tuple(a[2].shape)[::-1]),
    "bn_forward": (batch_norm, "normalize", False, lambda a, k: a[4] != 0, _bn_key(1)),
    "bn_max_pool_forward": (batch_norm, "normalize_max_pool", False, lambda a, k: a[2] != 0,
                            lambda a, k: frozenset([a[1].weight.data_ptr()] if a[1].weight is not None else [])),
    "bn_backward": (batch_norm, "normalize_backward", True, lambda a, k: a[5] != 0, _bn_key(2)),
    "activation": (ops, "run_activation", None, lambda a, k: True, lambda a, k: None),
}


def _record_kernels(monkeypatch) -> list[_Launch]:
    """Wrap the launchers in _LAUNCHERS: each call appends a _Launch."""
    calls: list[_Launch] = []
    for name, (module, attribute, backward, activation, key) in _LAUNCHERS.items():
        original = getattr(module, attribute)

        def wrapper(*args, _name=name, _original=original, _backward=backward, _activation=activation, _key=key,
                    **kwargs):
            direction = _backward if _backward is not None else kwargs.get("grad") is not None
            calls.append(_Launch(_name, direction, _activation(args, kwargs), _key(args, kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)
    return calls


def _relative_error(ours: Tensor, reference: Tensor) -> float:
    return relative_error(ours, reference, floor=5e-2)


def _step(model: nn.Module, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Forward and backward of `model` on leaf copies of `inputs` (a fixed output gradient, the same dropout draws
    for every model): (output, the inputs' gradients)."""
    inputs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for x in inputs]
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        out = model(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return out, [x.grad for x in inputs]


def _depthwise_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The model's depthwise convs (a group per input channel), by the definition, not by the code under test."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_every_conv_linear_and_activation_runs_in_triton_with_pytorchs_numerics(family, monkeypatch):
    torch.manual_seed(0)
    block = family.make()
    for module in block.modules():  # running stats away from (0, 1), so that eval mode tests the folding
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    inputs = [torch.randn(shape) for shape in family.shapes]
    if family.channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    reference = copy.deepcopy(block).double()
    swapped = knn.swap(copy.deepcopy(block), channels_last=family.channels_last)

    # (a) the table: nothing but OUT_OF_SCOPE modules left in PyTorch, and every node traced
    left = [(r.path, r.module, r.action, r.detail) for r in swapped.swap_records
            if r.action in ("kept", "walked") and r.module not in OUT_OF_SCOPE]
    assert not left, f"left in PyTorch by swap: {left}"

    calls = _record_kernels(monkeypatch)
    depthwise = {(tuple(conv.weight.shape), conv.groups) for conv in _depthwise_convs(block)}
    linears = {tuple(m.weight.shape) for m in block.modules() if isinstance(m, nn.Linear)}
    norms = {m.weight.data_ptr() for m in swapped.modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    for mode in ("train", "eval") if family.batch_norm else ("train",):
        swapped.train(mode == "train"), reference.train(mode == "train")
        calls.clear()
        with _Ops() as seen:
            out, input_grads = _step(swapped, inputs)
        with _Ops() as eager:
            expected, expected_grads = _step(reference, [x.double() for x in inputs])

        # (a) no PyTorch conv, matmul, BatchNorm or activation ran, forward or backward
        ran = sorted({name for name in seen.names if _forbidden(name)})
        assert not ran, f"{mode}: PyTorch ops ran in the swapped block: {ran}"
        assert any(_forbidden(name) for name in eager.names), "the recorder saw none of the eager block's ops"
        assert any(name.startswith("workbench::") for name in seen.names)

        # (b) each depthwise conv ran its direct kernels (forward, dgrad, wgrad), no depthwise conv the implicit GEMM
        for launcher in ("depthwise_forward", "depthwise_input_grad", "depthwise_weight_grad"):
            assert {call.key for call in calls if call.launcher == launcher} == depthwise, (mode, launcher)
        gemm_depthwise = [call for call in calls if call.launcher.startswith("conv2d_") and call.key in depthwise]
        assert not gemm_depthwise, f"{mode}: depthwise convs on the implicit GEMM: {gemm_depthwise}"

        # (b) what the dispatch recorder cannot see, inside the custom ops: every linear ran the Triton GEMM forward
        # and backward; in train mode every BatchNorm ran the Triton normalise and its backward (in eval one after a
        # conv is folded into the conv's weights); and each activation op the eager block ran (one aten op forward,
        # one backward) is one Triton launch computing it, alone or fused into the conv, GEMM or BN kernel before it
        for launcher in ("gemm_forward", "gemm_backward"):
            assert {call.key for call in calls if call.launcher == launcher} == linears, (mode, launcher)
        if mode == "train":  # (a BN whose activation a max-pool reads: the pooled forward)
            for launchers in (("bn_forward", "bn_max_pool_forward"), ("bn_backward",)):
                assert set().union(*(call.key for call in calls if call.launcher in launchers)) == norms, \
                    (mode, launchers)
        activations = [op for op in (name.partition("::")[2] for name in eager.names) if op in _ACTIVATIONS]
        for backward in (False, True):
            expected_launches = sum(op.endswith("_backward") == backward for op in activations)
            launched = [call.launcher for call in calls if call.activation and call.backward == backward]
            assert len(launched) == expected_launches, (mode, "backward" if backward else "forward", launched,
                                                        activations)

        # (c) PyTorch's numerics: output, input gradients, parameter gradients, running stats
        assert out.shape == expected.shape and _relative_error(out, expected) < 2e-4, mode
        for index, (ours, theirs) in enumerate(zip(input_grads, expected_grads)):
            assert _relative_error(ours, theirs) < 2e-4, (mode, f"input {index}")
        parameters = dict(reference.named_parameters())
        assert [name for name, _ in swapped.named_parameters()] == list(parameters)
        for name, parameter in swapped.named_parameters():
            assert _relative_error(parameter.grad, parameters[name].grad) < 2e-4, (mode, name)
        buffers = dict(reference.named_buffers())
        for name, buffer in swapped.named_buffers():
            assert _relative_error(buffer, buffers[name]) < 2e-4, (mode, name)
