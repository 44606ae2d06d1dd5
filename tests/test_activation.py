"""The activation device functions and the elementwise kernel against PyTorch in float64."""

import pytest
import torch

from triton_workbench import kernels
from triton_workbench.kernels.activation import ACTIVATION_SPEC, CODES, NAMES, activation_code, run, torch_activation

SMALL_BLOCK = {"BLOCK_SIZE": 128, "num_warps": 4}  # several programs even for small tensors


def _torch_forward_backward(x: torch.Tensor, grad: torch.Tensor, name: str, negative_slope: float = 0.01):
    x64 = x.detach().double().requires_grad_(True)
    y = torch_activation(x64, name, negative_slope)
    (grad_x,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach(), grad_x


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("numel", [1, 127, 128, 129, 389])
def test_forward_and_derivative_match_torch_fp32(name, numel, device):
    generator = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=generator) * 4).to(device)
    x[:3] = torch.tensor([0.0, -1e-3, 30.0])[: min(3, numel)]  # a kink and a saturating value
    grad = torch.randn(numel, generator=generator).to(device)
    expected, expected_grad = _torch_forward_backward(x, grad, name)
    out = run(x, name, config=SMALL_BLOCK)
    grad_x = run(x, name, grad=grad, config=SMALL_BLOCK)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_matches_torch_within_half_precision(name, device):
    x = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3).to(device, torch.float16)
    grad = torch.randn(300, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    expected, expected_grad = _torch_forward_backward(x, grad, name)
    out, grad_x = run(x, name), run(x, name, grad=grad)
    assert out.dtype == grad_x.dtype == torch.float16
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grad_x.double(), expected_grad, rtol=2e-3, atol=2e-3)


def test_leaky_relu_takes_its_negative_slope(device):
    x = torch.linspace(-2, 2, 9, device=device)
    grad = torch.ones(9, device=device)
    expected, expected_grad = _torch_forward_backward(x, grad, "leaky_relu", negative_slope=0.3)
    torch.testing.assert_close(run(x, "leaky_relu", 0.3).double(), expected)
    torch.testing.assert_close(run(x, "leaky_relu", 0.3, grad=grad).double(), expected_grad)


def test_identity_and_bad_names():
    assert activation_code(None) == activation_code("identity") == CODES[None] == 0
    assert sorted(CODES.values()) == list(range(len(CODES)))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        activation_code("swish")


def test_non_contiguous_and_scalar_inputs(device):
    x = torch.randn(6, 10, device=device).t()  # a transposed view
    torch.testing.assert_close(run(x, "silu").view(10, 6), torch.nn.functional.silu(x))
    scalar = torch.tensor(-0.5, device=device)
    assert run(scalar, "relu").shape == () and run(scalar, "relu").item() == 0.0
    assert run(torch.empty(0, 3, device=device), "gelu").shape == (0, 3)


def test_spec_launch_matches_reference_and_counts(device):
    for backward in (False, True):
        problem = {"numel": 1000, "dtype": "fp32", "activation": "gelu_tanh", "backward": backward}
        inputs = ACTIVATION_SPEC.make_inputs(problem, device)
        config = ACTIVATION_SPEC.default_config(problem)
        assert ACTIVATION_SPEC.is_valid(config, problem)
        expected = ACTIVATION_SPEC.reference(inputs)
        result = ACTIVATION_SPEC.launch(inputs, config)
        error = (result.double() - expected).abs().max() / expected.abs().max()
        assert error < ACTIVATION_SPEC.tolerance(problem)
        assert ACTIVATION_SPEC.grid(problem, config) == (-(-1000 // config["BLOCK_SIZE"]),)
        assert ACTIVATION_SPEC.bytes(problem) == (3 if backward else 2) * 1000 * 4
        assert ACTIVATION_SPEC.baseline(inputs).dtype == torch.float32


def test_default_config_is_valid_for_every_size():
    for numel in (1, 100, 1024, 10**7):
        problem = {"numel": numel, "dtype": "fp16", "activation": "relu"}
        assert ACTIVATION_SPEC.is_valid(ACTIVATION_SPEC.default_config(problem), problem)
    assert kernels.SPECS["activation"] is ACTIVATION_SPEC
