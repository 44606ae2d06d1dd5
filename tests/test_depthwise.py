"""The direct depthwise conv2d kernels (conv_depthwise, conv_depthwise_grad) against PyTorch in float64: forward,
input, weight and bias gradients on odd shapes, both layouts, strides, paddings, dilation, multipliers, a fused
activation, NaN; several tiles and splits; their KernelSpecs. Shapes stay tiny: kernels run in the interpreter."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from triton_workbench import kernels
from triton_workbench.kernels import conv_depthwise, conv_depthwise_grad
from triton_workbench.kernels.activation import torch_activation
from triton_workbench.kernels.activation import run as activation_run
from triton_workbench.kernels.conv_depthwise import DEPTHWISE_FWD_SPEC, depthwise_forward, is_depthwise
from triton_workbench.kernels.conv_depthwise_grad import (DEPTHWISE_DGRAD_SPEC, DEPTHWISE_WGRAD_SPEC,
                                                          depthwise_input_grad, depthwise_weight_grad)
from triton_workbench.kernels.conv_geometry import channels_last, conv_problem, make_geometry
from triton_workbench.kernels.spec import ProblemError

FP32_TOLERANCE = 1e-4  # relative to the largest reference magnitude
SPECS = (DEPTHWISE_FWD_SPEC, DEPTHWISE_DGRAD_SPEC, DEPTHWISE_WGRAD_SPEC)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape, NaN exactly where the reference has NaN, and the rest within FP32_TOLERANCE."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN at other places than PyTorch's"
    finite = expected[~nan]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    error = (actual.double()[~nan] - finite).abs().max().item() if finite.numel() else 0.0
    assert error <= FP32_TOLERANCE * scale, f"{what}: max error {error:.3g} > {FP32_TOLERANCE} * {scale:.3g}"


def _inputs(x_shape, multiplier, kernel, channels_last, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c_out = x_shape[1] * multiplier
    weight = torch.randn(c_out, 1, *kernel, generator=generator)
    return x, weight, torch.randn(c_out, generator=generator), generator


def _check(x, weight, bias, conv_args, activation=None, grad_out=None, configs=(None, None, None)):
    """Ours (fp32: forward keeping the pre-activation, dz formed by the activation kernel as `ops` does, dgrad,
    wgrad with the bias gradient) against F.conv2d + activation in float64 and its autograd; returns ours."""
    geometry = make_geometry(tuple(weight.shape[2:]), **conv_args, groups=x.shape[1])
    reference = [t.double().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    expected = torch_activation(F.conv2d(reference[0], reference[1], reference[2] if bias is not None else None,
                                         groups=x.shape[1], **conv_args), activation)
    y, pre = depthwise_forward(x, weight, bias, geometry, activation, keep_pre=True, config=configs[0])
    _assert_close(y, expected, "output")
    if grad_out is None:
        grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, reference, grad_out)
    dy = grad_out.float().contiguous(memory_format=torch.channels_last if channels_last(y) else torch.contiguous_format)
    dz = activation_run(pre, activation, grad=dy) if activation is not None else dy
    grad_x = depthwise_input_grad(dz, weight, x, geometry, config=configs[1])
    grad_w, grad_b = depthwise_weight_grad(dz, x, weight, geometry, bias_grad=bias is not None, config=configs[2])
    for name, actual, wanted in zip(("grad_input", "grad_weight", "grad_bias"), (grad_x, grad_w, grad_b),
                                    expected_grads):
        _assert_close(actual, wanted, name)
    assert grad_b is None or bias is not None
    assert grad_x.stride() == x.stride() and grad_w.stride() == weight.stride()
    return y, grad_x, grad_w, grad_b


CASES = {
    # name: (x shape, multiplier, kernel, conv args, bias)
    "c3_k3_s1_p1": ((2, 3, 7, 5), 1, (3, 3), {"padding": 1}, True),
    "c17_k5_s2_p2": ((1, 17, 7, 5), 1, (5, 5), {"stride": 2, "padding": 2}, False),
    "c3_mult2_k3_s2_p0": ((2, 3, 7, 5), 2, (3, 3), {"stride": 2}, True),
    "c17_mult2_k3_d2_p2": ((1, 17, 7, 5), 2, (3, 3), {"dilation": 2, "padding": 2}, False),
    "stride_phases_without_taps": ((1, 3, 9, 8), 1, (3, 3), {"stride": 2, "dilation": 2, "padding": 2}, True),
    "stride_3_uneven_k2x3": ((1, 3, 7, 6), 1, (2, 3), {"stride": (3, 2), "padding": (1, 2)}, True),
    "same_even_kernel_mult3": ((1, 3, 6, 5), 3, (4, 2), {"padding": "same", "dilation": (1, 3)}, False),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pytorch(case, layout):
    x_shape, multiplier, kernel, conv_args, with_bias = CASES[case]
    x, weight, bias, _ = _inputs(x_shape, multiplier, kernel, layout == "channels_last")
    y, *_ = _check(x, weight, bias if with_bias else None, conv_args)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    if layout == "channels_last":
        assert not y.is_contiguous()


def test_fused_activation_and_residual():
    """gelu in the epilogue with its derivative through the kept pre-activation; a residual added before it."""
    x, weight, bias, generator = _inputs((2, 5, 6, 5), 1, (3, 3), True, seed=2)
    _check(x, weight, bias, {"padding": 1, "stride": 2}, activation="gelu")
    residual = torch.randn(2, 5, 6, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    y, pre = depthwise_forward(x, weight, bias, make_geometry((3, 3), 1, 1, groups=5), "silu", keep_pre=True,
                               residual=residual)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1, groups=5) + residual.double()
    _assert_close(pre, expected, "pre-activation with residual")
    _assert_close(y, F.silu(expected), "output with residual")


def test_nan_propagates_as_in_pytorch():
    """A NaN input reaches exactly the outputs whose window holds it (ReLU keeps it); a NaN output gradient
    reaches the input gradient and, through the sums, the weight and bias gradients."""
    x, weight, bias, generator = _inputs((1, 3, 7, 5), 2, (3, 3), True, seed=3)
    x[0, 1, 3, 2] = float("nan")
    y, *_ = _check(x, weight, bias, {"padding": 1, "stride": 2}, activation="relu")
    assert 0 < y.isnan().sum() < y.numel()
    x, weight, bias, generator = _inputs((1, 3, 7, 5), 1, (3, 3), False, seed=4)
    grad_out = torch.randn(1, 3, 7, 5, generator=generator, dtype=torch.float64)
    grad_out[0, 2, 4, 1] = float("nan")
    _, grad_x, grad_w, grad_b = _check(x, weight, bias, {"padding": 1}, grad_out=grad_out)
    assert grad_x[0, 2].isnan().any() and not grad_x[0, :2].isnan().any()
    assert grad_w[2].isnan().all() and grad_b[2].isnan() and not grad_b[:2].isnan().any()


@pytest.mark.parametrize("int64", [False, True], ids=["int32_offsets", "int64_offsets"])
def test_several_tiles_channel_blocks_and_splits(int64, monkeypatch):
    """Small explicit configs: several spatial tiles with tails, 17 channels in blocks of 8, the wgrad positions in
    5 splits of 16; both offset widths (64-bit offsets are chosen for tensors too big to allocate in a test)."""
    for module in (conv_depthwise, conv_depthwise_grad):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: int64)
    x, weight, bias, _ = _inputs((2, 17, 9, 7), 1, (3, 3), True, seed=5)
    spatial = {"BLOCK_H": 2, "BLOCK_W": 4, "BLOCK_C": 8, "num_warps": 1}
    wgrad = {"BLOCK_P": 16, "BLOCK_C": 8, "SPLIT": 5, "num_warps": 1}
    problem = conv_problem(2, 17, 9, 7, 17, 3, 3, make_geometry((3, 3), (2, 1), 1, groups=17), "fp32", "nhwc")
    problem |= {"activation": None}
    assert DEPTHWISE_WGRAD_SPEC.grid(problem, wgrad) == (3, 10, 5)  # 9 taps + the bias row; 5 splits of 16
    _check(x, weight, bias, {"stride": (2, 1), "padding": 1}, activation="tanh", configs=(spatial, spatial, wgrad))


def test_empty_batch_and_is_depthwise():
    x, weight, bias, _ = _inputs((0, 3, 5, 5), 2, (3, 3), True)
    geometry = make_geometry((3, 3), 1, 1, groups=3)
    y, _ = depthwise_forward(x, weight, bias, geometry)
    assert y.shape == (0, 6, 5, 5)
    grad_w, grad_b = depthwise_weight_grad(y, x, weight, geometry)
    assert not grad_w.any() and not grad_b.any()
    assert is_depthwise(3, 6, 3) and not is_depthwise(1, 4, 1)  # a single-channel conv stays on the implicit GEMM
    assert not is_depthwise(4, 4, 2) and not is_depthwise(4, 6, 4)


# ---------------------------------------------------------------------------------------------
# the KernelSpecs


def test_specs_are_registered():
    for spec in SPECS:
        assert kernels.SPECS[spec.name] is spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_spec_launch_matches_its_reference_and_baseline(spec):
    activation = "leaky_relu" if spec is DEPTHWISE_FWD_SPEC else None  # the backward kernels take dz formed
    problem = conv_problem(2, 3, 5, 6, 6, 3, 3, make_geometry((3, 3), 2, 1, groups=3), "fp32", "nhwc", activation,
                           True)
    spec.validate_problem(problem)
    inputs = spec.make_inputs(problem, torch.device("cpu"))
    config = spec.default_config(problem)
    assert spec.is_valid(config, problem)
    reference = spec.reference(inputs)
    assert reference.dtype == torch.float64
    _assert_close(spec.launch(inputs, config), reference, spec.name)
    _assert_close(spec.baseline(inputs), reference, f"{spec.name} baseline")
    assert spec.flops(problem) == 2 * 2 * 3 * 3 * 6 * 3 * 3  # N * Ho * Wo * C_out * kH * kW, times 2
    assert spec.bytes(problem) > 0 and all(dim >= 1 for dim in spec.grid(problem, config))


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_problems_must_be_depthwise(spec):
    for example in spec.example_problems:
        spec.validate_problem(example, check_memory=False)
    with pytest.raises(ProblemError, match=r"groups \(1\) must equal c_in \(144\)"):
        spec.validate_problem({**spec.example_problems[0], "groups": 1}, check_memory=False)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_default_config_is_valid_and_the_space_is_pruned(spec):
    """Across sizes, multipliers, strides and layouts the default is in the space and valid; the constraints keep
    some configs and drop others."""
    for c_in, multiplier, size, kernel, stride, layout, dtype in itertools.product(
            [1, 3, 32, 960], [1, 2], [1, 7, 112], [3, 5, 7], [1, 2], ["nchw", "nhwc"], ["fp32", "fp16"]):
        geometry = make_geometry((kernel, kernel), stride, kernel // 2, 1, c_in)
        problem = conv_problem(4, c_in, size, size, c_in * multiplier, kernel, kernel, geometry, dtype, layout,
                               "relu" if spec is DEPTHWISE_FWD_SPEC else None)
        default = spec.default_config(problem)
        assert spec.is_valid(default, problem), (spec.name, problem, default)
        assert all(default[name] in values for name, values in spec.params.items()), (spec.name, default)
    names = list(spec.params)
    configs = [dict(zip(names, values)) for values in itertools.product(*spec.params.values())]
    valid = [config for config in configs if spec.is_valid(config, spec.example_problems[0])]
    assert 0 < len(valid) < len(configs)
