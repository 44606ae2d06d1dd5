"""The workbench:: custom ops: opcheck, PyTorch's own OpInfo samples, argument checking."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

from triton_workbench import kernels
from triton_workbench.kernels import ops

# OpInfo name -> how kernels computes the same function from (input, *args, **kwargs)
OPINFO_FUNCTIONS = {
    "nn.functional.linear": lambda x, *args, **kwargs: kernels.linear(x, *args, **kwargs),
    "nn.functional.relu": lambda x, **kwargs: kernels.activation(x, "relu", **kwargs),
    "nn.functional.leaky_relu": lambda x, *args, **kwargs: kernels.activation(x, "leaky_relu", *args, **kwargs),
    "nn.functional.gelu": lambda x, **kwargs: kernels.activation(x, "gelu", **kwargs),
    "nn.functional.silu": lambda x, **kwargs: kernels.activation(x, "silu", **kwargs),
    "sigmoid": lambda x, **kwargs: kernels.activation(x, "sigmoid", **kwargs),
    "tanh": lambda x, **kwargs: kernels.activation(x, "tanh", **kwargs),
}
OPINFOS = [op for op in op_db if op.name in OPINFO_FUNCTIONS and op.variant_test_name == ""]


def test_every_opinfo_is_found():
    assert sorted(op.name for op in OPINFOS) == sorted(OPINFO_FUNCTIONS)


def _clone_leaves(sample):
    """(input, args, kwargs) with fresh leaf tensors, so two computations get separate grads."""
    clone = lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    return clone(sample.input), [clone(a) for a in sample.args], dict(sample.kwargs)


@pytest.mark.parametrize("op", OPINFOS, ids=lambda op: op.name)
def test_matches_torch_on_opinfo_samples(op, device):
    samples = list(op.sample_inputs(device, torch.float32, requires_grad=True))
    assert samples
    for sample in samples:
        x, args, kwargs = _clone_leaves(sample)
        expected = op(x, *args, **kwargs)
        ours_x, ours_args, ours_kwargs = _clone_leaves(sample)
        ours = OPINFO_FUNCTIONS[op.name](ours_x, *ours_args, **ours_kwargs)
        torch.testing.assert_close(ours, expected)
        leaves = [t for t in (x, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
        our_leaves = [t for t in (ours_x, *ours_args) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not leaves or expected.numel() == 0:
            continue
        grad = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, leaves, grad)
        our_grads = torch.autograd.grad(ours, our_leaves, grad)
        for got, want in zip(our_grads, expected_grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", [None, "gelu", "leaky_relu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_op_passes_opcheck(activation, with_bias, device):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=generator).to(device).requires_grad_(True)
    b = torch.randn(3, 4, generator=generator).t().contiguous().t().to(device).requires_grad_(True)  # column-major
    bias = torch.randn(4, generator=generator).to(device).requires_grad_(True) if with_bias else None
    torch.library.opcheck(ops._gemm_op, (a, b, bias, activation, 0.2, activation is not None))


def test_activation_op_passes_opcheck(device):
    x = torch.randn(3, 7, device=device, requires_grad=True)
    torch.library.opcheck(ops._activation_op, (x, "gelu_tanh", 0.01))
    torch.library.opcheck(ops._activation_op, (x[:, ::2], "leaky_relu", 0.3))
    nhwc = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(ops._activation_op, (nhwc, "relu", 0.01))  # the fake keeps channels_last, as the kernel
    torch.library.opcheck(ops._activation_backward_op, (torch.randn_like(nhwc), nhwc.detach(), "silu", 0.01))


def test_linear_with_fused_activation_and_any_leading_dims(device):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, generator=generator).to(device).transpose(1, 2).requires_grad_(True)  # strided
    weight = torch.randn(4, 6, generator=generator).to(device).requires_grad_(True)
    bias = torch.randn(4, generator=generator).to(device).requires_grad_(True)
    ours = kernels.linear(x, weight, bias, "gelu", approximate="tanh")
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    expected = F.gelu(F.linear(x64, w64, b64), approximate="tanh")
    assert ours.shape == (2, 5, 3, 4)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ours.shape, generator=generator).to(device)
    for got, want in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                         torch.autograd.grad(expected, (x64, w64, b64), grad.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_backward_recomputes_pre_activation_when_forward_did_not_keep_it(device):
    a = torch.randn(6, 4, device=device, requires_grad=True)
    b = torch.randn(4, 3, device=device, requires_grad=True)
    out = ops._gemm_op(a, b, None, "silu", 0.01, False)[0]  # as if traced with no grad
    out.sum().backward()
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    F.silu(a64 @ b64).sum().backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


def test_fp16_gemm_and_activation(device):
    a = torch.randn(9, 17, device=device).half()
    b = torch.randn(17, 5, device=device).half()
    torch.testing.assert_close(kernels.gemm(a, b, activation="sigmoid"), torch.sigmoid(a.float() @ b.float()).half(),
                               rtol=2e-3, atol=2e-3)
    assert kernels.activation(a, "relu").dtype == torch.float16


def test_empty_inputs_give_empty_results_of_the_right_shape(device):
    empty = lambda *shape: torch.empty(*shape, device=device)
    assert kernels.linear(empty(0, 3), torch.randn(4, 3, device=device)).shape == (0, 4)
    assert torch.equal(kernels.gemm(empty(2, 0), empty(0, 6)), torch.zeros(2, 6, device=device))
    assert kernels.activation(empty(1, 0, 3), "silu").shape == (1, 0, 3)


def test_identity_activation_returns_input(device):
    x = torch.randn(3, device=device)
    assert kernels.activation(x, None) is x and kernels.activation(x, "identity") is x


@pytest.mark.parametrize("call,error,match", [
    (lambda t: kernels.gemm(t(2, 3), t(4, 5)), ValueError, "share K"),
    (lambda t: kernels.gemm(t(2, 3, 1), t(3, 5)), ValueError, "a must have 2"),
    (lambda t: kernels.gemm(t(2, 3), t(3, 5), bias=t(4)), ValueError, "bias"),
    (lambda t: kernels.gemm(t(2, 3), t(3, 5).half()), TypeError, "b has dtype"),
    (lambda t: kernels.gemm(t(2, 3).double(), t(3, 5).double()), TypeError, "a has dtype"),
    (lambda t: kernels.gemm(t(2, 3), [[1.0]]), TypeError, "b must be a torch.Tensor"),
    (lambda t: kernels.gemm(t(2, 3), t(3, 5), activation="swish"), ValueError, "activation"),
    (lambda t: kernels.linear(t(2, 3), t(4, 5)), ValueError, "in_features"),
    (lambda t: kernels.linear(t(2, 3), t(4, 3), t(3)), ValueError, "bias"),
    (lambda t: kernels.linear(t(1)[0], t(4, 1)), ValueError, "x must have at least"),
    (lambda t: kernels.activation(t(3), "relu", negative_slope=0.2), TypeError, "negative_slope"),
    (lambda t: kernels.activation(t(3), "gelu", approximate="erf"), ValueError, "approximate"),
    (lambda t: kernels.activation(t(3), "tanh", alpha=1.0), TypeError, "alpha"),
    (lambda t: kernels.activation(t(3), "swish"), ValueError, "activation must be"),
])
def test_bad_input_raises_naming_the_argument(call, error, match, device):
    with pytest.raises(error, match=match):
        call(lambda *shape: torch.randn(*shape, device=device))


def test_tensors_on_the_wrong_device_are_rejected(device):
    where = "meta"  # a device kernels never run on, on every machine
    with pytest.raises(ValueError, match="bias is on meta"):
        kernels.gemm(torch.randn(2, 3, device=device), torch.randn(3, 5, device=device),
                     bias=torch.randn(5, device=where))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the Triton ops needs a CUDA device")
def test_model_under_torch_compile_matches_eager(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8), torch.nn.Tanh())
    model = kernels.nn.swap(model.to(device))
    x = torch.randn(16, 32, device=device)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for parameter, grad in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(parameter.grad, grad)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_autocast_runs_our_kernels_in_the_autocast_dtype(op, device):
    # As torch's own matmul and conv2d do: fp32 inputs are cast to fp16 inside the autocast region, and
    # gradients return to the fp32 leaves in fp32.
    torch.manual_seed(0)
    if op == "linear":
        x, w, b = torch.randn(5, 7, device=device), torch.randn(3, 7, device=device), torch.randn(3, device=device)
        ours, reference = kernels.linear, F.linear
    else:
        x, w, b = torch.randn(2, 3, 7, 5, device=device), torch.randn(4, 3, 3, 3, device=device), torch.randn(4, device=device)
        ours, reference = (lambda *t, **k: kernels.conv2d(*t, padding=1, **k)), (lambda *t: F.conv2d(*t, padding=1))
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with torch.autocast(device.type, dtype=torch.float16):
        y = ours(*leaves, activation="relu")
    assert y.dtype == torch.float16
    expected = F.relu(reference(*(t.detach().half().double() for t in leaves)))  # float64 of the fp16 inputs
    assert (y.double() - expected).abs().max() <= 2e-3 * expected.abs().max()
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.parametrize("op", ["linear", "activation", "conv2d", "batch_norm", "conv_transpose2d"])
def test_double_backward_says_it_is_not_supported(op):
    from triton_workbench.kernels.batch_norm_ops import batch_norm_act
    from triton_workbench.kernels.conv_transpose import conv_transpose2d

    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    run = {"linear": lambda: kernels.linear(x, torch.randn(3, 4), activation="gelu"),
           "activation": lambda: kernels.activation(x, "gelu"),
           "conv2d": lambda: kernels.conv2d(x, torch.randn(3, 2, 3, 3), activation="relu"),
           "batch_norm": lambda: batch_norm_act(x, torch.nn.BatchNorm2d(2), activation="silu"),
           "conv_transpose2d": lambda: conv_transpose2d(x, torch.randn(2, 3, 3, 3), activation="tanh")}[op]
    (grad,) = torch.autograd.grad(run().square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"workbench::\w+_backward: double backward .* not supported"):
        grad.sum().backward()
