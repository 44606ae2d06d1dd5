"""Standard PyTorch CNNs (torch modules only) for 8x8 digits and 32x32 CIFAR-10 images.

The models use `nn.Conv2d`, `nn.Linear`, `nn.BatchNorm2d` and activation *modules* (never
functional calls), so `kernels.nn.swap(model)` can replace every layer it supports after the
model is built.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from triton_workbench.kernels.errors import UsageError


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, one residual block per stage (stride 2 after the first), pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks = []
        for index, width in enumerate(widths):
            previous = widths[max(index - 1, 0)]
            blocks.append(ResidualBlock(previous, width, stride=1 if index == 0 else 2))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


class ConvNet(nn.Module):
    """A plain conv-net: (conv-ReLU, conv-ReLU, max-pool) per stage, then a two-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        spatial = image_size // 2 ** len(widths)
        hidden = 2 * widths[-1]
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * spatial * spatial, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _widths(image_size: int) -> tuple[int, ...]:
    """Channel widths per stage: two narrow stages for 8x8 digits, three for 32x32 images."""
    return (8, 16) if image_size <= 8 else (16, 32, 64)


def _stem_stride(image_size: int) -> int:
    """8x8 digits: a stride-2 stem (blocks at 4x4 and 2x2) costs a quarter of the interpreter time per step
    for about the same held-out accuracy (97-98% after 4 epochs either way); 32x32: stride 1."""
    return 2 if image_size <= 8 else 1


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet": lambda c, k, s: ResNet(c, k, _widths(s), _stem_stride(s)),
    "convnet": lambda c, k, s: ConvNet(c, k, _widths(s), s),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model (uses the current torch RNG: seed before calling for a fixed init)."""
    if name not in _BUILDERS:
        raise UsageError(f"model {name!r} is unknown: expected one of {', '.join(MODEL_NAMES)}")
    for argument, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{argument} must be a positive int, got {value!r}")
    if image_size < 4 or image_size % 4:
        raise UsageError(f"image_size must be a multiple of 4 (two stride-2 stages), got {image_size}")
    return _BUILDERS[name](in_channels, num_classes, image_size)
