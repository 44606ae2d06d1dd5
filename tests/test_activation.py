"""The activation device functions and the elementwise kernel against PyTorch in float64."""

import pytest
import torch

from triton_workbench import kernels
from triton_workbench.kernels.activation import (ACTIVATION_SPEC, CODES, NAMES, PARAMETERS, activation_code,
                                               default_parameter, run, torch_activation)
from triton_workbench.kernels.ops import activation_kwargs, resolve_activation

SMALL_BLOCK = {"BLOCK_SIZE": 128, "num_warps": 4}  # several programs even for small tensors


def _torch_forward_backward(x: torch.Tensor, grad: torch.Tensor, name: str, negative_slope: float | None = None):
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


# the points where an activation switches branch, each side of them, and values PyTorch takes a branch for
KINKS = {
    "relu6": [-0.0, 0.0, 1e-30, 6.0, 5.9999995, 6.0000005],
    "hardswish": [-3.0, -3.0000002, -2.9999998, 3.0, 2.9999998, 3.0000002],
    "hardsigmoid": [-3.0, -2.9999998, 3.0, 2.9999998],
    "softplus": [20.0, 19.999998, 20.000002, -88.0, -104.0],
    "elu": [-0.0, 0.0, -1e-30, 1e-30, -1e-7, -100.0],
    "celu": [-0.0, 0.0, -1e-30, 1e-30, -1e-7, -100.0],
    "selu": [-0.0, 0.0, -1e-30, 1e-30, -1e-7, -100.0],
    "mish": [-0.0, 0.0, 1e-30, -30.0, 30.0, 45.0, -90.0],
}


@pytest.mark.parametrize("name", sorted(KINKS))
def test_new_activations_at_their_kinks_match_torch_float64(name, device):
    """Branch points, where the kernel must take PyTorch's side (`<` versus `<=`), and inputs where exp/log
    lose their precision without care (expm1 and log1p near 0, mish's tanh(softplus(x)) near saturation)."""
    x = torch.tensor(KINKS[name], device=device)
    grad = torch.ones_like(x)
    expected, expected_grad = _torch_forward_backward(x, grad, name)
    torch.testing.assert_close(run(x, name).double(), expected.float().double(), rtol=2e-6, atol=1e-40)
    torch.testing.assert_close(run(x, name, grad=grad).double(), expected_grad.float().double(), rtol=2e-6,
                               atol=1e-40)
    assert torch.equal(run(x, name).signbit(), expected.float().signbit())  # elu(-0.0) = -0.0, relu6(-0.0) = -0.0


def test_derivatives_at_the_kinks_take_pytorchs_side(device):
    """The one-sided values PyTorch picks: relu6' is 0 at 0 and 6, hardswish' 0 at -3 and 1 at 3, hardsigmoid'
    0 at +-3, elu' alpha at 0 (the x <= 0 branch), celu' 1 there, selu' alpha * scale there."""
    def slope(name, value, parameter=None):
        x = torch.tensor([value], device=device)
        return run(x, name, parameter, grad=torch.ones_like(x)).item()

    assert slope("relu6", 0.0) == slope("relu6", 6.0) == 0.0
    assert slope("hardswish", -3.0) == 0.0 and slope("hardswish", 3.0) == 1.0
    assert slope("hardsigmoid", -3.0) == slope("hardsigmoid", 3.0) == 0.0
    assert slope("elu", 0.0, 0.5) == 0.5 and slope("celu", 0.0, 0.5) == 1.0
    assert slope("selu", 0.0) == pytest.approx(1.7580993408473766) and slope("selu", 1e-30) == pytest.approx(1.0507010)


@pytest.mark.parametrize("name, alpha", [("elu", 0.5), ("elu", 2.0), ("elu", -0.7), ("celu", 0.5), ("celu", 3.0),
                                         ("celu", -1.5)])
def test_elu_and_celu_take_alpha_in_the_parameter_slot(name, alpha, device):
    x = torch.linspace(-6, 3, 37, device=device)
    grad = torch.randn(37, generator=torch.Generator().manual_seed(0)).to(device)
    expected, expected_grad = _torch_forward_backward(x, grad, name, negative_slope=alpha)
    torch.testing.assert_close(run(x, name, alpha).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(x, name, alpha, grad=grad).double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_the_public_op_defaults_and_keywords_are_pytorchs(device):
    """kernels.activation against torch.nn.functional called directly: alpha defaults to 1 for elu and celu
    (the kernels' parameter defaults to leaky_relu's 0.01 for the others), keywords keep PyTorch's names."""
    functional = torch.nn.functional
    x = torch.linspace(-4, 4, 33, device=device)
    torch.testing.assert_close(kernels.activation(x, "elu"), functional.elu(x))
    torch.testing.assert_close(kernels.activation(x, "celu"), functional.celu(x))
    torch.testing.assert_close(kernels.activation(x, "celu", alpha=0.3), functional.celu(x, alpha=0.3))
    torch.testing.assert_close(kernels.activation(x, "leaky_relu"), functional.leaky_relu(x))
    torch.testing.assert_close(kernels.activation(x, "softplus", beta=1, threshold=20), functional.softplus(x))
    torch.testing.assert_close(kernels.activation(x, "relu6"), functional.hardtanh(x, 0.0, 6.0))


def test_resolve_activation_maps_keywords_and_names_the_argument_it_rejects():
    assert resolve_activation("elu", alpha=0.5) == ("elu", 0.5)
    assert resolve_activation("celu") == ("celu", 1.0)
    assert resolve_activation("leaky_relu", negative_slope=0.2) == ("leaky_relu", 0.2)
    for name in NAMES:  # the one helper every caller uses turns a parameter back into the keywords
        expected = 0.25 if name in PARAMETERS else default_parameter(name)
        assert resolve_activation(name, **activation_kwargs(name, 0.25))[1] == expected
    with pytest.raises(TypeError, match="alpha applies to elu, celu only, not to 'relu'"):
        resolve_activation("relu", alpha=0.5)
    with pytest.raises(TypeError, match="negative_slope applies to leaky_relu only, not to 'elu'"):
        resolve_activation("elu", negative_slope=0.5)
    with pytest.raises(TypeError, match="alpha must be a number"):
        resolve_activation("celu", alpha="1")
    with pytest.raises(ValueError, match="alpha must not be 0 for celu"):
        resolve_activation("celu", alpha=0.0)
    with pytest.raises(ValueError, match="got beta=2.0"):
        resolve_activation("softplus", beta=2.0)
    with pytest.raises(ValueError, match="got threshold=10"):
        resolve_activation("softplus", threshold=10)
    with pytest.raises(TypeError, match="beta applies to softplus only"):
        resolve_activation("mish", beta=1.0)
