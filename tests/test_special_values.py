"""NaN, +-inf, -0.0 and denormals through every activation, fused or not, forward and backward, as
PyTorch treats them (the reference is PyTorch in float64; where PyTorch's own float32 CPU kernels
differ from it, e.g. gelu(+inf) = nan there, float64 and CUDA agree on the mathematical value)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_workbench import kernels
from triton_workbench.kernels.activation import NAMES, torch_activation

SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -1e-40, 1e-8, -1e-8, 3.0, -3.0, 6.0, 20.0, -20.0, 1e13,
           -1e13]


def assert_same_values(actual: torch.Tensor, expected64: torch.Tensor, gradient: bool = False,
                       atol: float | None = None, signed_zeros: bool = True) -> None:
    """NaN where the reference is NaN, the same infinities, the sign of zeros, and finite values close.

    Tolerances: the kernel dtype's relative precision, and an absolute `atol` (default: the dtype's
    smallest normal, since denormal results lose precision; a sum of products needs one of its
    rounding, ~1e-6 of its terms). For gradients, a zero's sign comes from the order of saturated
    terms, and a saturated slope may be a rounded 0 on one side (float64's 1 - tanh(20)^2 is 0, the
    kernel's 1.7e-17): zeros' signs are not compared, and absolute differences up to 1e-12 are allowed.
    Nor are they after a sum of products (`signed_zeros=False`): an accumulator that starts at +0.0 turns
    a lone -0.0 product into +0.0 (as cuBLAS does), so the sign a GEMM gives an activation is not the
    activation's semantics.
    """
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3}[actual.dtype]
    atol = atol if atol is not None else 1e-12 if gradient else torch.finfo(actual.dtype).tiny
    expected = expected64.to(actual.dtype).double()
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    assert torch.equal(actual.isposinf(), expected.isposinf()) and torch.equal(actual.isneginf(), expected.isneginf())
    if signed_zeros and not gradient:
        zeros = expected == 0
        assert torch.equal(actual[zeros].signbit(), expected[zeros].signbit()), "sign of zero differs"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol)


def _pytorch(t: torch.Tensor, name: str) -> torch.Tensor:
    """torch_activation element by element: PyTorch's scalar CPU kernels, whose semantics its CUDA ones share;
    its vectorised CPU kernels, taken on longer tensors, give some gradients at NaN differently (relu6, elu,
    celu, selu, hardswish: see kernels.activation)."""
    return torch.stack([torch_activation(value, name) for value in t.reshape(-1).unbind()]).view(t.shape)


def _reference(function, *tensors):
    """function(*tensors) in float64 with the gradients of every input for an all-ones output gradient."""
    leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    out = function(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, torch.ones_like(out))


def _ours(function, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = function(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, torch.ones_like(out))


@pytest.mark.parametrize("name", NAMES)
def test_activation_forward_and_backward_on_special_values(name):
    x = torch.tensor(SPECIAL, dtype=torch.float32)
    out, (grad,) = _ours(lambda t: kernels.activation(t, name), x)
    expected, (expected_grad,) = _reference(lambda t: _pytorch(t, name), x)
    assert_same_values(out, expected)
    assert_same_values(grad, expected_grad, gradient=True)


def test_relu_keeps_nan_and_passes_its_gradient():
    x = torch.tensor([math.nan, -1.0, 2.0], requires_grad=True)
    kernels.activation(x, "relu").sum().backward()
    assert math.isnan(kernels.activation(x.detach(), "relu")[0].item())
    assert x.grad.tolist() == [1.0, 0.0, 1.0]  # torch.nn.functional.relu's threshold_backward passes NaN's gradient


def test_tanh_keeps_tiny_inputs():
    x = torch.tensor([1e-40, -1e-8, 3e-4, 0.06, 0.07])
    torch.testing.assert_close(kernels.activation(x, "tanh").double(), torch.tanh(x.double()), rtol=1e-6, atol=1e-44)


@pytest.mark.parametrize("name", NAMES)
def test_fused_linear_propagates_special_values_like_pytorch(name):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(SPECIAL), 5, generator=generator)
    x[:, 0] = torch.tensor(SPECIAL)  # one special value per row
    weight, bias = torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator)
    out, grads = _ours(lambda a, w, b: kernels.linear(a, w, b, activation=name), x, weight, bias)
    expected, expected_grads = _reference(
        lambda a, w, b: _pytorch(torch.nn.functional.linear(a, w, b), name), x, weight, bias)
    assert_same_values(out, expected, atol=1e-5, signed_zeros=False)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_same_values(grad, expected_grad, gradient=True, atol=1e-5)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "relu6", "hardswish", "hardsigmoid", "mish", "elu", "celu",
                                  "selu", "softplus"])
def test_fused_conv_propagates_special_values_like_pytorch(name):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 6, 6, generator=generator)
    x[0, 0, 1, 1], x[0, 1, 4, 2], x[0, 0, 5, 5] = math.nan, math.inf, -math.inf
    weight, bias = torch.randn(3, 2, 3, 3, generator=generator), torch.randn(3, generator=generator)
    out, grads = _ours(lambda a, w, b: kernels.conv2d(a, w, b, padding=1, activation=name), x, weight, bias)
    expected, expected_grads = _reference(
        lambda a, w, b: _pytorch(torch.nn.functional.conv2d(a, w, b, padding=1), name), x, weight, bias)
    assert_same_values(out, expected, atol=1e-5, signed_zeros=False)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_same_values(grad, expected_grad, gradient=True, atol=1e-5)


@pytest.mark.parametrize("name", [None, "relu", "gelu", "tanh"])
def test_fp16_gemm_that_overflows_gives_inf_as_pytorch(name):
    a = torch.full((4, 16), 300.0, dtype=torch.float16)
    a[1] = -300.0
    b = torch.full((16, 5), 300.0, dtype=torch.float16)  # every product 9e4, past fp16's 65504
    out = kernels.gemm(a, b, None, activation=name)
    expected = torch_activation(a.double() @ b.double(), name)
    assert out.dtype == torch.float16 and (out.isinf().any() or name == "tanh")
    assert_same_values(out, expected, signed_zeros=False)


_floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every run
@given(name=st.sampled_from(NAMES), values=st.lists(_floats32, min_size=1, max_size=70),
       columns=st.integers(1, 7), transpose=st.booleans(), half=st.booleans())
def test_activation_property_against_float64_pytorch(name, values, columns, transpose, half):
    rows = -(-len(values) // columns)
    x = torch.tensor(values + [0.0] * (rows * columns - len(values)), dtype=torch.float32).view(rows, columns)
    if half:
        x = x.half()
    if transpose:
        x = x.t()  # a strided view
    out, (grad,) = _ours(lambda t: kernels.activation(t, name), x)
    expected, (expected_grad,) = _reference(lambda t: _pytorch(t, name), x)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_same_values(out, expected)
    assert_same_values(grad, expected_grad, gradient=True)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(name=st.sampled_from(NAMES), m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 9),
       special=st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_linear_property_against_float64_pytorch(name, m, n, k, special, seed):
    generator = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    flat = x.view(-1)
    for position, value in zip(torch.randint(0, m * k, (len(special),), generator=generator).tolist(), special):
        flat[position] = value
    out, grads = _ours(lambda a, w: kernels.linear(a, w, None, activation=name), x, weight)
    expected, expected_grads = _reference(lambda a, w: _pytorch(torch.nn.functional.linear(a, w), name),
                                          x, weight)
    assert_same_values(out, expected, atol=1e-5, signed_zeros=False)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_same_values(grad, expected_grad, gradient=True, atol=1e-5)
