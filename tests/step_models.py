"""Models for tests/test_step_compile.py, imported by name in compile workers (`module:function`)."""

from torch import nn


class ResidualNet(nn.Module):
    """A BatchNorm on the input (its statistics from kernels of its own), then a residual block with a
    strided 1x1 downsample (conv -> BN -> + residual -> ReLU, the statistics in the convs' epilogues), a
    mean pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.act0 = nn.BatchNorm2d(3), nn.ReLU()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.down, self.bn_down = nn.Conv2d(3, 8, 1, 2, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act0(self.bn0(x))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + self.bn_down(self.down(x)))
        return self.head(y.mean((2, 3)))


def residual_net() -> nn.Module:
    return ResidualNet()
