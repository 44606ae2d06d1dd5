"""swap on the activations of MobileNet-style models (ReLU6, Hardswish, Hardsigmoid, Mish, ELU, CELU, SELU,
Softplus): module and functional forms are found, fused where the existing activations are (conv -> BN, conv and
linear epilogues, the elementwise kernel), and the swapped model matches PyTorch in float64; settings the kernels
do not take stay in PyTorch, with the reason."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_workbench.kernels.nn as knn
from numerics import relative_error


def _records(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {record.path: (record.action, record.detail) for record in model.swap_records}


def _check_against_float64(model: nn.Module, swapped: nn.Module, x: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Output and every parameter's gradient of `swapped` (train mode), then its eval output, against a float64
    copy of `model` in PyTorch."""
    reference = copy.deepcopy(model).double()
    outputs = []
    for net, inputs in ((swapped, x), (reference, x.double())):
        net.zero_grad()
        out = net(inputs)  # once each: a train-mode forward updates BN's running stats
        if not outputs:
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(out.dtype))
        outputs.append(out)
    assert relative_error(*outputs) < tolerance
    for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
        assert relative_error(ours.grad, theirs.grad) < tolerance, name
    swapped.eval(), reference.eval()
    assert relative_error(swapped(x), reference(x.double())) < tolerance


class _Block(nn.Module):
    """One activation module at each place a kernel fuses it: after conv -> BN (the BN kernel in training, the
    conv epilogue with BN folded in eval), after a depthwise conv (its direct kernel's epilogue), after a linear
    (the GEMM epilogue), and alone (the elementwise kernel)."""

    def __init__(self, make_activation):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act1 = make_activation()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1, groups=4), make_activation()
        self.act3 = make_activation()
        self.fc, self.act4 = nn.Linear(4, 3), make_activation()

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.conv2(y))
        y = self.act3(y * 2.0)
        return self.act4(self.fc(y.mean((2, 3))))


MODULES = {
    "relu6": nn.ReLU6, "hardtanh_0_6": lambda: nn.Hardtanh(0.0, 6.0), "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish, "elu": lambda: nn.ELU(alpha=0.7), "celu": lambda: nn.CELU(1.3),
    "selu": nn.SELU, "softplus": nn.Softplus, "relu6_in_place": lambda: nn.ReLU6(inplace=True),
}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_activation_modules_fuse_everywhere_and_match_pytorch(kind):
    torch.manual_seed(0)
    block = _Block(MODULES[kind])
    x = torch.randn(2, 3, 5, 5) * 3  # wide enough to reach the saturating and the kinked parts
    swapped = knn.swap(copy.deepcopy(block))
    assert _records(swapped) == {
        "conv1": ("fused", "conv1 -> bn1 -> act1"),
        "conv2": ("fused", "conv2 -> act2"),
        "act3": ("swapped", "act3"),
        "fc": ("fused", "fc -> act4"),
    }
    _check_against_float64(block, swapped, x)


class _Head(nn.Module):
    """A linear followed by a functional activation call (`function`), so the call is fused into the GEMM."""

    def __init__(self, function):
        super().__init__()
        self.fc, self.function = nn.Linear(5, 7), function

    def forward(self, x):
        return self.function(self.fc(x))


FUNCTIONS = [  # (call, the graph node's name)
    (F.relu6, "relu6"), (lambda t: F.relu6(t, inplace=True), "relu6"), (lambda t: F.hardtanh(t, 0.0, 6.0), "hardtanh"),
    (lambda t: F.hardtanh_(t, min_val=0.0, max_val=6.0), "hardtanh_"), (F.hardswish, "hardswish"),
    (lambda t: F.hardsigmoid(t, inplace=True), "hardsigmoid"), (F.mish, "mish"), (lambda t: F.elu(t, alpha=0.5), "elu"),
    (lambda t: F.elu_(t, 0.5), "elu_"), (F.elu_, "elu_"), (lambda t: F.celu(t, 1.5), "celu"),
    (lambda t: torch.celu(t, alpha=0.8), "celu"), (torch.celu_, "celu_"), (F.selu, "selu"), (torch.selu, "selu"),
    (torch.selu_, "selu_"), (F.softplus, "softplus"), (lambda t: F.softplus(t, beta=1, threshold=20), "softplus"),
]


@pytest.mark.parametrize("function, node", FUNCTIONS, ids=[f"{i}-{node}" for i, (_, node) in enumerate(FUNCTIONS)])
def test_functional_forms_and_in_place_variants_fuse_and_match_pytorch(function, node):
    torch.manual_seed(1)
    head = _Head(function)
    swapped = knn.swap(copy.deepcopy(head))
    assert _records(swapped) == {"fc": ("fused", f"fc -> {node}")}
    _check_against_float64(head, swapped, torch.randn(6, 5) * 3)


@pytest.mark.parametrize("function, node, reason", [
    (F.hardtanh, "hardtanh", "hardtanh(-1.0, 1.0): the kernels have (0, 6) only"),
    (lambda t: F.softplus(t, beta=2.0), "softplus", "got beta=2.0"),
    (lambda t: F.softplus(t, threshold=5.0), "softplus", "got threshold=5.0"),
    (lambda t: F.elu_(t, 1.0, 2.0), "elu_", "elu with a scale or input_scale other than 1"),
])
def test_functional_forms_with_settings_the_kernels_lack_stay_in_pytorch_with_the_reason(function, node, reason):
    torch.manual_seed(2)
    head = _Head(function)
    swapped = knn.swap(copy.deepcopy(head))
    records = _records(swapped)
    assert records["fc"] == ("swapped", "fc")
    assert records[node][0] == "kept" and reason in records[node][1]
    _check_against_float64(head, swapped, torch.randn(6, 5) * 3)


@pytest.mark.parametrize("module, reason", [
    (nn.Hardtanh(), "hardtanh(-1.0, 1.0)"), (nn.Softplus(beta=3.0), "got beta=3.0"),
    (nn.CELU(alpha=0.0), "alpha must not be 0 for celu"),
])
def test_activation_modules_with_settings_the_kernels_lack_stay_in_pytorch_with_the_reason(module, reason):
    model = knn.swap(nn.Sequential(nn.Linear(3, 4), module))
    records = _records(model)
    assert records["0"] == ("swapped", "0") and records["1"][0] == "kept" and reason in records["1"][1]


def test_the_module_walk_passes_alpha_to_the_kernels():
    """A model torch.fx cannot trace: its direct activation children become TritonActivation with their alpha,
    and a linear -> ELU in an nn.Sequential child is traced and fused with it."""
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(4, 5), nn.ELU(alpha=0.3))
            self.act = nn.CELU(alpha=2.5)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = x * 2
            return self.act(self.head(x) - 1.0)

    torch.manual_seed(3)
    model = DataDependent()
    x = torch.rand(3, 4) + 1.0
    expected = copy.deepcopy(model)(x)
    swapped = knn.swap(model)
    records = _records(swapped)
    assert records["(model)"][0] == "walked" and records["act"] == ("swapped", "celu")
    assert records["head.0"] == ("fused", "0 -> 1")
    assert isinstance(model.act, knn.TritonActivation) and (model.act.name, model.act.negative_slope) == ("celu", 2.5)
    torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-6)
