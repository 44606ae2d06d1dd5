"""kernels.conv2d against PyTorch in float64: forward and every gradient, PyTorch's own OpInfo samples,
odd shapes, layouts, groups, strides, every fused activation; the op's registration; the module swap;
the three KernelSpecs. Shapes stay tiny: the kernels run in Triton's interpreter here."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triton_workbench import kernels
from triton_workbench.kernels import arrival, batch_norm, conv_dgrad, conv_fwd, conv_wgrad, ops
from triton_workbench.kernels.conv_geometry import conv_problem, make_geometry, pad_channels, stem_channels
from triton_workbench.kernels.activation import NAMES, torch_activation
from triton_workbench.kernels.activation import run as activation_run
from triton_workbench.kernels.nn import TritonConv2d, swap
from triton_workbench.workbench.conv_bench import RESNET18_CONV_SHAPES, resnet18_problem

FP32_TOLERANCE = 1e-4  # relative to the largest reference magnitude
FP16_TOLERANCE = 2e-2


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance} * {scale:.3g}"


def _check_against_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         tolerance: float = FP32_TOLERANCE, activation: str | None = None,
                         **conv_args) -> torch.Tensor:
    """Forward and gradients (x, weight, bias) of kernels.conv2d vs F.conv2d + activation in float64."""
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias) if t is not None]  # strides kept
    references = [t.detach().double().requires_grad_(True) for t in leaves]
    with_bias = bias is not None
    out = kernels.conv2d(leaves[0], leaves[1], leaves[2] if with_bias else None, activation=activation, **conv_args)
    expected = torch_activation(
        F.conv2d(references[0], references[1], references[2] if with_bias else None, **conv_args), activation)
    _assert_close(out, expected, tolerance, "output")
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    expected_grads = torch.autograd.grad(expected, references, grad_out)
    for name, grad, expected_grad in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected_grads):
        _assert_close(grad, expected_grad, tolerance, name)
    return out


# ---------------------------------------------------------------------------------------------
# PyTorch's own samples for conv2d


def _opinfo_samples() -> list:
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [op for op in op_db if op.name == "nn.functional.conv2d"]
    return list(op.sample_inputs("cpu", torch.float32, requires_grad=True))


def test_matches_pytorch_on_every_opinfo_sample():
    samples = _opinfo_samples()
    assert len(samples) >= 20  # the list PyTorch's test suite iterates (30 in torch 2.13)
    for sample in samples:
        weight, bias = sample.args[0], sample.args[1] if len(sample.args) > 1 else None
        _check_against_torch(sample.input, weight, bias, **sample.kwargs)


# ---------------------------------------------------------------------------------------------
# semantics beyond the samples


CASES = {
    # name: (x shape, weight shape, conv args)
    "odd_sizes_primes": ((2, 3, 7, 5), (5, 3, 3, 2), {"padding": (1, 0)}),
    "one_by_one": ((1, 5, 3, 3), (2, 5, 1, 1), {}),
    "single_pixel_output": ((1, 2, 3, 3), (3, 2, 3, 3), {}),
    "stride_2_dgrad": ((2, 3, 7, 7), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
    "stride_3_uneven": ((1, 2, 7, 6), (3, 2, 2, 3), {"stride": (3, 2), "padding": (1, 2)}),
    "stride_larger_than_kernel": ((1, 2, 7, 7), (2, 2, 1, 1), {"stride": 3}),
    "stride_phases_with_one_tap": ((1, 4, 9, 9), (2, 4, 3, 3), {"stride": 4, "padding": 1}),
    "stride_phases_without_taps": ((1, 3, 9, 8), (2, 3, 3, 3), {"stride": 2, "dilation": 2, "padding": 2}),
    "dilation": ((1, 3, 7, 7), (2, 3, 3, 3), {"dilation": (2, 3), "padding": 2}),
    "same_even_kernel": ((1, 2, 6, 5), (3, 2, 4, 2), {"padding": "same", "dilation": (1, 3)}),
    "valid": ((1, 2, 5, 6), (2, 2, 3, 3), {"padding": "valid"}),
    "groups": ((2, 4, 5, 5), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    "depthwise": ((2, 5, 5, 5), (5, 1, 3, 3), {"groups": 5, "padding": 1, "stride": 2}),
    "depthwise_multiplier": ((1, 3, 5, 4), (6, 1, 3, 3), {"groups": 3}),
    "channels_above_16": ((1, 17, 4, 3), (18, 17, 1, 2), {"padding": (0, 1)}),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pytorch(case, layout):
    x_shape, w_shape, conv_args = CASES[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(w_shape, generator=generator)
    bias = torch.randn(w_shape[0], generator=generator)
    out = _check_against_torch(x, weight, bias, **conv_args)
    if layout == "channels_last" and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize("dtype, c_in", [(torch.float32, 3), (torch.float16, 3), (torch.float16, 2), (torch.float32, 5)])
def test_stem_k_tiles_cover_whole_kernel_rows(dtype, c_in):
    """Few channels, channels_last: padded to whole 8-byte channel runs, a K tile spans a kernel row's
    (kw, channel) run (the stem's 7x7x3 path); wgrad's columns span the whole kernel where the channels are
    fewer than a 16-byte vector holds; forward and gradients still match PyTorch."""
    generator = torch.Generator().manual_seed(c_in)
    x = torch.randn(2, c_in, 11, 10, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, c_in, 7, 7, generator=generator).to(dtype)
    bias = torch.randn(6, generator=generator).to(dtype)
    geometry = make_geometry((7, 7), 2, 3)
    channels = stem_channels(c_in, x.element_size())
    padded_x, padded_weight = pad_channels(x, channels), pad_channels(weight, channels)
    assert padded_x.shape[1] == padded_weight.shape[1] == channels and channels * x.element_size() % 8 == 0
    assert padded_x.is_contiguous(memory_format=torch.channels_last)
    problem = conv_problem(2, c_in, 11, 10, 6, 7, 7, geometry, "fp32" if dtype == torch.float32 else "fp16", "nhwc")
    config = conv_fwd.CONV_FWD_SPEC.default_config(problem)
    assert config["BLOCK_K"] >= 7 * channels == conv_fwd.flat_row(problem)
    assert conv_fwd.flat_channels(problem, config["BLOCK_K"]) == channels
    assert conv_wgrad.flat_rows(problem) == (c_in < 16 // x.element_size())  # (fp32, 5): per tap
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else FP16_TOLERANCE
    _check_against_torch(x, weight, bias, tolerance, activation="relu", stride=2, padding=3)


@pytest.mark.parametrize("block_k", [16, 32])
def test_channels_last_channel_tails_and_one_by_one_strided(block_k):
    """K tails (40 channels in tiles of 16/32) and a strided 1x1 conv on the channels_last forward path."""
    generator = torch.Generator().manual_seed(block_k)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 2, "num_stages": 2}
    for w_shape, stride, padding in (((20, 40, 3, 3), 1, 1), ((24, 40, 1, 1), 2, 0)):
        x = torch.randn(2, 40, 7, 6, generator=generator).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(w_shape, generator=generator), torch.randn(w_shape[0], generator=generator)
        geometry = make_geometry(w_shape[2:], stride, padding)
        out = conv_fwd.conv2d_forward(x, weight, bias, geometry, "relu", config=config).y
        expected = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride, padding))
        _assert_close(out, expected, FP32_TOLERANCE, f"{w_shape} stride {stride}")


@pytest.mark.parametrize("activation", NAMES)
def test_every_activation_fused_with_its_derivative(activation):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 4, generator=generator)
    weight = torch.randn(4, 3, 3, 3, generator=generator) * 0.5
    bias = torch.randn(4, generator=generator)
    _check_against_torch(x, weight, bias, activation=activation, stride=2, padding=1)


def test_leaky_relu_slope_and_gelu_tanh_spelling():
    generator = torch.Generator().manual_seed(3)
    x, weight = torch.randn(1, 2, 4, 4, generator=generator), torch.randn(3, 2, 3, 3, generator=generator)
    slope = kernels.conv2d(x, weight, activation="leaky_relu", negative_slope=0.3)
    _assert_close(slope, F.leaky_relu(F.conv2d(x.double(), weight.double()), 0.3), FP32_TOLERANCE, "leaky 0.3")
    tanh = kernels.conv2d(x, weight, activation="gelu", approximate="tanh")
    _assert_close(tanh, F.gelu(F.conv2d(x.double(), weight.double()), approximate="tanh"), FP32_TOLERANCE, "gelu")


def test_strided_views_are_read_through_their_strides():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 9, 7, generator=generator)[:, ::2, 1::2]  # neither NCHW nor channels_last
    weight = torch.randn(3, 4, 3, 3, generator=generator).transpose(0, 1)  # [C_out 4, C_in 3, 3, 3], permuted
    bias = torch.randn(8, generator=generator)[::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    _check_against_torch(x, weight, bias, padding=1)


def test_no_bias_unbatched_and_fp16():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 5, generator=generator)
    weight = torch.randn(4, 3, 3, 3, generator=generator)
    assert _check_against_torch(x, weight, None, padding=1).shape == (4, 6, 5)
    half = [t.half() for t in (torch.randn(2, 3, 5, 5, generator=generator), weight * 0.3, torch.randn(4))]
    out = _check_against_torch(*half, tolerance=FP16_TOLERANCE, activation="silu", padding=1)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("int64", [False, True], ids=["int32_offsets", "int64_offsets"])
def test_multiple_tiles_split_k_and_channel_tails(int64, monkeypatch):
    """Small explicit configs: several M/N tiles with GROUP_M ordering, channels 17 and 18 crossing
    BLOCK_K = 16, wgrad split three ways, strided dgrad; channels_last x and weight; both offset widths
    (64-bit offsets are chosen for tensors of 2**30 elements or more, too big to allocate in a test)."""
    for launcher_module in (conv_fwd, conv_dgrad, conv_wgrad):
        monkeypatch.setattr(launcher_module, "needs_int64", lambda *tensors: int64)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 17, 6, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(18, 17, 3, 2, generator=generator).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(18, generator=generator)
    geometry = make_geometry((3, 2), stride=(2, 1), padding=(1, 1))
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 2, "num_stages": 2}
    y, pre = conv_fwd.conv2d_forward(x, weight, bias, geometry, "gelu", keep_pre=True, config=config)[:2]
    reference = F.conv2d(x.double(), weight.double(), bias.double(), (2, 1), (1, 1))
    _assert_close(pre, reference, FP32_TOLERANCE, "pre-activation")
    _assert_close(y, F.gelu(reference), FP32_TOLERANCE, "output")
    assert y.is_contiguous(memory_format=torch.channels_last)

    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, weight, bias))
    out64 = F.gelu(F.conv2d(x64, w64, b64, (2, 1), (1, 1)))
    grad_out = torch.randn(out64.shape, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(out64, (x64, w64, b64), grad_out)
    dz = activation_run(pre, "gelu", grad=grad_out.float().contiguous(memory_format=torch.channels_last))
    assert dz.is_contiguous(memory_format=torch.channels_last)  # formed in pre's layout, as the backward reads it
    grad_x = conv_dgrad.conv2d_input_grad(dz, weight, x, geometry, config=config)
    grad_w, grad_b = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, config=config | {"SPLIT_K": 3})
    for name, actual, wanted in zip(("grad_input", "grad_weight", "grad_bias"), (grad_x, grad_w, grad_b), expected):
        _assert_close(actual, wanted, FP32_TOLERANCE, name)
    assert grad_x.stride() == x.stride() and grad_w.stride() == weight.stride()


# ---------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize("kwargs, error, words", [
    ({"x": torch.randn(2, 3, 4)[0]}, ValueError, "x must have 3 or 4"),
    ({"weight": torch.randn(4, 3, 3)}, ValueError, "weight must have 4"),
    ({"groups": 2}, ValueError, "channels"),
    ({"weight": torch.randn(3, 1, 3, 3), "groups": 2, "x": torch.randn(1, 2, 5, 5)}, ValueError, "divisible by groups"),
    ({"groups": 0}, ValueError, "groups"),
    ({"weight": torch.randn(4, 3, 3, 3, dtype=torch.float64)}, TypeError, "weight"),
    ({"weight": torch.randn(4, 3, 3, 3).half()}, TypeError, "weight has dtype"),
    ({"bias": torch.randn(4, device="meta")}, ValueError, "bias is on meta"),
    ({"bias": torch.randn(5)}, ValueError, "bias must have C_out"),
    ({"activation": "swish"}, ValueError, "activation"),
    ({"padding": "same", "stride": 2}, ValueError, "padding='same'"),
    ({"padding": "full"}, ValueError, "padding"),
    ({"stride": (1, 0)}, ValueError, "stride"),
    ({"dilation": 1.5}, TypeError, "dilation"),
    ({"x": torch.randn(1, 3, 2, 2)}, ValueError, "too small"),
    # where F.conv2d raises: no output channel, a kernel with no tap; and no input channel, where PyTorch
    # returns 0 output channels whatever the weight's C_out
    ({"weight": torch.randn(0, 3, 3, 3)}, ValueError, "weight has 0 output channels"),
    ({"weight": torch.randn(2, 3, 3, 3), "groups": 3, "x": torch.randn(1, 9, 5, 5)}, ValueError, "at least groups"),
    ({"weight": torch.randn(4, 3, 0, 3)}, ValueError, "kernel size must be at least 1x1, got 0x3"),
    ({"weight": torch.randn(4, 3, 3, 0)}, ValueError, "kernel size"),
    ({"x": torch.randn(1, 0, 5, 5), "weight": torch.randn(4, 0, 3, 3)}, ValueError, "0 input channels"),
])
def test_bad_arguments_name_the_argument(kwargs, error, words):
    arguments = {"x": torch.randn(1, 3, 5, 5), "weight": torch.randn(4, 3, 3, 3), "bias": None} | kwargs
    with pytest.raises(error, match=words):
        kernels.conv2d(**arguments)


# ---------------------------------------------------------------------------------------------
# the custom op


@pytest.mark.parametrize("activation, keep_pre, channels_last, residual",
                         [(None, False, False, False), ("relu", True, True, False), ("gelu", True, True, True)])
def test_opcheck(activation, keep_pre, channels_last, residual):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3, 5, 4, generator=generator, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(4, 3, 3, 2, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    shortcut = torch.randn(1, 4, 2, 5, generator=generator).contiguous(
        memory_format=torch.channels_last).requires_grad_(True) if residual else None
    torch.library.opcheck(torch.ops.workbench.conv2d.default,
                          (x, weight, bias, [2, 1], [1, 0, 1, 1], [1, 1], 1, activation, 0.01, keep_pre, shortcut))
    if activation is None:  # BatchNorm statistics from the same launch, updating running stats in place
        for momentum in (0.1, None):
            torch.library.opcheck(torch.ops.workbench.conv2d_statistics.default,
                                  (x.detach(), weight.detach(), bias.detach(), [2, 1], [1, 0, 1, 1], [1, 1], 1,
                                   torch.zeros(4), torch.ones(4), torch.tensor(0), momentum, 1e-5))
        # a stem: 3 channels_last channels the kernel pads to 4, returned for the wgrad (fake and real agree)
        stem = (x.detach().contiguous(memory_format=torch.channels_last), torch.randn(4, 3, 7, 7, generator=generator))
        torch.library.opcheck(torch.ops.workbench.conv2d_statistics.default,
                              (*stem, None, [2, 2], [3, 3, 3, 3], [1, 1], 1, None, None, None, 0.1, 1e-5))
        assert torch.ops.workbench.conv2d_statistics(*stem, None, [2, 2], [3, 3, 3, 3], [1, 1], 1, None, None, None,
                                                     0.1, 1e-5)[2].shape == (1, 4, 5, 4)


def test_gradient_without_kept_preactivation_recomputes_it():
    """A forward run under no_grad-free autograd with keep_pre=False must still give the right gradients."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 4, 4, generator=generator, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=generator, requires_grad=True)
    y = torch.ops.workbench.conv2d(x, weight, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "tanh", 0.01, False, None)[0]
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.tanh(F.conv2d(x64, weight.double(), padding=1)).sum(), x64)
    _assert_close(grad_x, expected, FP32_TOLERANCE, "grad_input")


# ---------------------------------------------------------------------------------------------
# modules and swap


def test_triton_conv2d_has_conv2d_state_dict_keys():
    reference = nn.Conv2d(3, 4, 3, stride=2, padding="valid", bias=True)
    module = TritonConv2d(3, 4, 3, stride=2, padding="valid", activation="relu")
    assert module.state_dict().keys() == reference.state_dict().keys()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 7, 7)
    _assert_close(module(x), F.relu(reference(x)).double(), FP32_TOLERANCE, "module output")


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, words", [
    (3, 0, 3, "0 output channels"), (3, 4, 0, "kernel size"), (3, 4, (0, 3), "kernel size"),
    (0, 4, 3, "0 input channels"),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_triton_conv2d_refuses_empty_channels_and_kernels(in_channels, out_channels, kernel_size, words):
    x = torch.randn(1, in_channels, 5, 5)
    if in_channels:  # PyTorch refuses these too (with 0 input channels it returns 0 output channels instead)
        with pytest.raises(RuntimeError):
            nn.Conv2d(in_channels, out_channels, kernel_size)(x)
    with pytest.raises(ValueError, match=words):
        TritonConv2d(in_channels, out_channels, kernel_size)(x)


def test_swap_keeps_outputs_and_gradients_and_reports_unsupported_padding_mode():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4, stride=2), nn.SiLU(),
        nn.Conv2d(4, 2, 1, padding_mode="reflect"),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    )
    original = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    model = swap(model)
    fused = {record.path: record for record in model.swap_records}
    assert fused["0"].action == "fused" and fused["0"].detail == "0 -> 1"
    assert fused["2"].action == "fused" and fused["2"].detail == "2 -> 3"  # a grouped conv with its silu
    assert fused["4"].action == "kept"  # padding_mode 'reflect' is left alone
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))
    out = model(x)
    _assert_close(out, expected.double(), FP32_TOLERANCE, "swapped output")
    for grad, wanted in zip(torch.autograd.grad(out.square().sum(), list(model.parameters())), expected_grads):
        _assert_close(grad, wanted.double(), FP32_TOLERANCE, "swapped gradient")


def test_swap_reports_the_kept_conv(capsys):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    swap(model, verbose=True)
    assert "padding_mode 'circular' not supported" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the KernelSpecs

SPECS = (conv_fwd.CONV_FWD_SPEC, conv_dgrad.CONV_DGRAD_SPEC, conv_wgrad.CONV_WGRAD_SPEC)


def test_specs_are_registered():
    for spec in SPECS:
        assert kernels.SPECS[spec.name] is spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_spec_launch_matches_its_reference_and_baseline(spec):
    geometry = make_geometry((3, 3), stride=2, padding=1)
    activation = "leaky_relu" if spec is conv_fwd.CONV_FWD_SPEC else None  # the backward kernels take dz formed
    problem = conv_problem(2, 3, 5, 6, 4, 3, 3, geometry, "fp32", "nhwc", activation, True)
    spec.validate_problem(problem)
    inputs = spec.make_inputs(problem, torch.device("cpu"))
    config = spec.default_config(problem)
    assert spec.is_valid(config, problem)
    result = spec.launch(inputs, config)
    reference = spec.reference(inputs)
    assert reference.dtype == torch.float64
    _assert_close(result, reference, spec.tolerance(problem), spec.name)
    _assert_close(spec.baseline(inputs), reference, spec.tolerance(problem), f"{spec.name} baseline")
    assert spec.flops(problem) == 2 * 2 * 3 * 3 * 4 * 3 * 3 * 3  # N * Ho * Wo * C_out * C_in * kH * kW, times 2
    assert spec.bytes(problem) > 0
    assert all(dim >= 1 for dim in spec.grid(problem, config))


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_constraints_exclude_configs_that_cannot_fit(spec):
    problem = resnet18_problem(RESNET18_CONV_SHAPES[4], dtype="fp32")
    names = list(spec.params)
    configs = [dict(zip(names, values)) for values in itertools.product(*spec.params.values())]
    valid = [config for config in configs if spec.is_valid(config, problem)]
    assert 0 < len(valid) < len(configs)
    too_big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 8,
               "num_stages": 4}
    assert not spec.is_valid(too_big, problem)  # 4 stages of fp32 128x64 + 64x128 tiles: 256 KiB of shared memory
    depthwise = conv_problem(8, 32, 14, 14, 32, 3, 3, make_geometry((3, 3), 1, 1, 1, 32), "fp16")
    for example in (*spec.example_problems, depthwise):
        assert spec.is_valid(spec.default_config(example), example)
    assert {p["dtype"] for p in spec.example_problems} == {"fp32", "fp16", "bf16"}


def test_ops_exports():
    assert kernels.conv2d is ops.conv2d


def test_default_config_is_valid_across_shapes():
    """The heuristic must satisfy the constraints for any problem, tiny, depthwise or large."""
    for c_in, c_out, size, kernel, stride, depthwise, dtype in itertools.product(
            [1, 3, 16, 512], [1, 4, 512], [1, 7, 224], [1, 3, 7], [1, 2], [False, True], ["fp32", "fp16"]):
        if depthwise and c_out % c_in:
            continue
        geometry = make_geometry((kernel, kernel), stride, kernel // 2, 1, c_in if depthwise else 1)
        problem = conv_problem(8, c_in, size, size, c_out, kernel, kernel, geometry, dtype)
        for spec in SPECS:
            assert spec.is_valid(spec.default_config(problem), problem), (spec.name, problem)



@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_every_spec_has_a_tunable_space_and_a_valid_default(layout):
    """The stem's K tiles must cover a whole kernel row (7 x 4 channels: 28 -> 32): the space keeps them."""
    for shape in (RESNET18_CONV_SHAPES[0], RESNET18_CONV_SHAPES[1], {**RESNET18_CONV_SHAPES[1], "c_in": 8},
                  {**RESNET18_CONV_SHAPES[1], "c_in": 2}):  # a 3-wide row of 2 channels: 6 values, K tile 16
        for dtype in ("fp16", "fp32"):
            problem = resnet18_problem(shape, batch=2, dtype=dtype, layout=layout)
            for spec in SPECS:
                if spec is not conv_fwd.CONV_FWD_SPEC:
                    problem = problem | {"activation": None}
                default = spec.default_config(problem)
                assert spec.is_valid(default, problem), (spec.name, problem)
                assert all(default[name] in values for name, values in spec.params.items()), (spec.name, default)
                assert any(spec.is_valid(config, problem) for config in _sample_space(spec)), (spec.name, problem)


def _sample_space(spec):
    names = list(spec.params)
    return [dict(zip(names, values)) for values in itertools.islice(itertools.product(*spec.params.values()), 0, None, 7)]


@pytest.mark.parametrize("layout, c_in, groups, stride", [("nhwc", 3, 1, 2), ("nhwc", 16, 1, 1), ("nchw", 6, 3, 2)])
def test_wgrad_writes_every_partial_it_sums(monkeypatch, layout, c_in, groups, stride):
    """The split-K partial buffer is allocated uninitialised: filled with NaN here, a single element no program
    wrote would reach the weight gradient."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, c_in, 7, 6, generator=generator)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, c_in // groups, 3, 3, generator=generator)
    geometry = make_geometry((3, 3), stride, 1, 1, groups)
    dz = torch.randn(2, 6, *geometry.output_hw(7, 6, 3, 3), generator=generator)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))
    grad_weight, _ = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, bias_grad=False)
    monkeypatch.undo()
    expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dz.double(), stride=stride, padding=1,
                                           groups=groups)
    _assert_close(grad_weight, expected, FP32_TOLERANCE, "grad_weight")


def test_wgrad_split_reduction_is_deterministic_and_leaves_its_counters_zero():
    """The last split of each tile sums the partials in split order (`kernels.arrival`): the same bits on a
    second run, and every arrival counter back at zero for the next launch -- also after a launch that failed."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 9, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 16, 3, 3, generator=generator)
    geometry = make_geometry((3, 3), 1, 1, 1, 1)
    dz = torch.randn(2, 8, 9, 9, generator=generator)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 1, "num_stages": 1, "SPLIT_K": 5}
    first, _ = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, bias_grad=False, config=config)
    second, _ = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, bias_grad=False, config=config)
    assert torch.equal(first, second)
    with arrival.counters(x.device, 1) as counter:
        assert not counter.any()
    with pytest.raises(RuntimeError, match="part-way"):
        with arrival.counters(x.device, 1) as counter:
            counter[:3] = 2  # programs that arrived before the launch failed
            raise RuntimeError("failed part-way")
    with arrival.counters(x.device, 1) as counter:
        assert not counter.any()
    expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dz.double(), padding=1)
    _assert_close(first, expected, FP32_TOLERANCE, "grad_weight")


@pytest.mark.parametrize("momentum, groups, hw, block_m, block_n", [(None, 1, (7, 5), 32, 16),
                                                                    (0.3, 2, (41, 37), 128, 32)])
def test_statistics_in_the_conv_launch_match_batch_norm_and_count_each_batch_once(momentum, groups, hw, block_m,
                                                                                    block_n):
    """Several row tiles and channel blocks per group, each block's moments merged by the last tile of each
    moments group (41x37: 4551 rows, 36 tiles in three groups of 16, 16 and 4), those by the last group, and the
    batch counted once by the last of those: mean, 1 / sqrt(var + eps), the running stats (momentum or the
    cumulative average) and num_batches_tracked over three batches, against F.batch_norm in float64."""
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(38, 6 // groups, 3, 3, generator=generator)
    geometry = make_geometry((3, 3), 1, 1, 1, groups)
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1}
    running = batch_norm.Running(torch.zeros(38), torch.ones(38), torch.tensor(0), momentum, 1e-3)
    expected_mean, expected_var = torch.zeros(38, dtype=torch.float64), torch.ones(38, dtype=torch.float64)
    for step in range(3):
        x = (torch.randn(3, 6, *hw, generator=generator) * 2 + step).contiguous(memory_format=torch.channels_last)
        y, _, stats, _ = conv_fwd.conv2d_forward(x, weight, None, geometry, config=config, statistics=running)
        reference = F.conv2d(x.double(), weight.double(), padding=1, groups=groups)
        _assert_close(y, reference, FP32_TOLERANCE, "y")
        factor = 1 / (step + 1) if momentum is None else momentum
        F.batch_norm(reference, expected_mean, expected_var, training=True, momentum=factor, eps=1e-3)
        _assert_close(stats[0], reference.mean((0, 2, 3)), FP32_TOLERANCE, "mean")
        _assert_close(stats[1], torch.rsqrt(reference.var((0, 2, 3), unbiased=False) + 1e-3), FP32_TOLERANCE, "invstd")
        _assert_close(running.mean, expected_mean, FP32_TOLERANCE, "running_mean")
        _assert_close(running.var, expected_var, FP32_TOLERANCE, "running_var")
        assert running.batches.item() == step + 1
    with arrival.counters(x.device, 1) as counter:
        assert not counter.any()
    reruns = [conv_fwd.conv2d_forward(x, weight, None, geometry, config=config,
                                      statistics=batch_norm.Running(None, None, None, 0.1, 1e-3)).stats
              for _ in range(2)]
    assert torch.equal(*reruns) and torch.equal(reruns[0], stats)  # merged in a fixed order: the same bits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a launch's programs run concurrently only on a GPU")
def test_statistics_merges_racing_on_a_gpu_give_the_reference_and_the_same_bits():
    """On a GPU a launch's programs run concurrently, so the last-to-arrive merges race for real (the interpreter
    runs programs one after another): ResNet-18 layer1's shape at batch 8 (25088 rows, 13 moments groups),
    default config, fp16: the statistics of y as stored against float64, ten reruns bit for bit, counters zero."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(8, 64, 56, 56, device=device, generator=generator).half()
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(64, 64, 3, 3, device=device, generator=generator) * 0.05).half()
    geometry = make_geometry((3, 3), 1, 1, 1, 1)
    y, _, stats, _ = conv_fwd.conv2d_forward(x, weight, None, geometry,
                                          statistics=batch_norm.Running(None, None, None, 0.1, 1e-5))
    reference = y.double()
    _assert_close(stats[0], reference.mean((0, 2, 3)), FP32_TOLERANCE, "mean")
    _assert_close(stats[1], torch.rsqrt(reference.var((0, 2, 3), unbiased=False) + 1e-5), FP32_TOLERANCE, "invstd")
    for _ in range(10):
        rerun = conv_fwd.conv2d_forward(x, weight, None, geometry,
                                        statistics=batch_norm.Running(None, None, None, 0.1, 1e-5)).stats
        assert torch.equal(rerun, stats)
    with arrival.counters(device, 1) as counter:
        assert not counter.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ResNet-18's sizes take hours in the interpreter")
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_resnet18_launches_match_float64_on_a_gpu(spec):
    """Every conv launch of a ResNet-18 training step as `benchmarks/resnet18_static.py` inspects it (batch 64,
    224x224, fp16 channels_last, default configs) against PyTorch in float64 on the same GPU."""
    device = torch.device("cuda")
    for shape in RESNET18_CONV_SHAPES:
        if spec is conv_dgrad.CONV_DGRAD_SPEC and shape["name"] == "conv1":
            continue  # the stem's input needs no gradient
        problem = resnet18_problem(shape, batch=64)
        if spec is not conv_fwd.CONV_FWD_SPEC:
            problem = problem | {"activation": None, "bias": spec is conv_wgrad.CONV_WGRAD_SPEC}
        inputs = spec.make_inputs(problem, device)
        _assert_close(spec.launch(inputs, spec.default_config(problem)), spec.reference(inputs), 3e-3,
                      f"{spec.name} {shape['name']}")  # fp16 outputs round by < 5e-4 of the largest; a lost box is more


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_wgrad_without_masks_where_every_tile_is_whole_and_every_tap_inside(layout):
    """A 1x1 stride-2 downsample with whole tiles takes wgrad's unmasked loads (no padding, so every tap of every
    output position is inside x); a padded 3x3 does not. Both against float64, split three ways."""
    generator = torch.Generator().manual_seed(14)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 1, "num_stages": 1, "SPLIT_K": 2}
    for kernel, padding, unmasked in ((1, 0, True), (3, 1, False)):
        x = torch.randn(2, 16, 8, 8, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        weight = torch.randn(32, 16, kernel, kernel, generator=generator)
        geometry = make_geometry((kernel, kernel), 2, padding, 1, 1)
        problem = conv_problem(2, 16, 8, 8, 32, kernel, kernel, geometry, "fp32", layout, None, False)
        assert conv_wgrad._unmasked(problem, config) == unmasked
        dz = torch.randn(2, 32, *geometry.output_hw(8, 8, kernel, kernel), generator=generator)
        grad_weight, _ = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, bias_grad=False, config=config)
        expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dz.double(), stride=2, padding=padding)
        _assert_close(grad_weight, expected, FP32_TOLERANCE, f"grad_weight {kernel}x{kernel}")


def test_wgrad_position_boxes():
    """wgrad's K steps are boxes of (image, row, column) output positions: the box padding the output least, the
    widest of those; whole on ResNet-18's sizes (so no position is masked there), partial elsewhere."""
    assert conv_wgrad.position_box(64, 56, 56, 64) == (1, 8, 8)
    assert conv_wgrad.position_box(64, 28, 28, 64) == (4, 4, 4)
    assert conv_wgrad.position_box(64, 7, 7, 64) == (64, 1, 1)
    assert conv_wgrad.position_box(64, 112, 112, 128) == (1, 8, 16)
    assert conv_wgrad.position_box(3, 5, 7, 16) == (1, 2, 8)  # 144 slots for 105 positions: the fewest
    for shape in RESNET18_CONV_SHAPES:
        problem = resnet18_problem(shape, batch=64) | {"activation": None}
        config = conv_wgrad.CONV_WGRAD_SPEC.default_config(problem)
        assert conv_wgrad._whole_boxes(problem, config), shape["name"]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("block_k", [16, 32])
def test_wgrad_partial_boxes_and_kernel_wide_columns(layout, block_k):
    """Odd batch and sizes (position boxes partial in images, rows and columns), stride, padding and height
    dilation: in channels_last the columns span the whole kernel's (kh, kw, channel) (`flat_rows`, a bounds
    check per element), in NCHW one tap's channels; split in up to three (as many as there are boxes).
    Against float64."""
    generator = torch.Generator().manual_seed(block_k)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k, "GROUP_M": 1, "num_warps": 2, "num_stages": 2,
              "SPLIT_K": 3}
    geometry = make_geometry((3, 2), (2, 1), (2, 0), (2, 1), 1)  # no column padding: a box's columns past the
    for h, w, partial in ((11, 7, (False, block_k == 32, True)), (1, 3, (True, False, True))):  # output read x
        x = torch.randn(3, 8, h, w, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        weight = torch.randn(20, 8, 3, 2, generator=generator)
        problem = conv_problem(3, 8, h, w, 20, 3, 2, geometry, "fp32", layout, None, False)
        ho, wo = geometry.output_hw(h, w, 3, 2)
        box = conv_wgrad.position_box(3, ho, wo, block_k)
        assert tuple(size % side != 0 for size, side in zip((3, ho, wo), box)) == partial, box
        assert conv_wgrad.flat_rows(problem) == (layout == "nhwc")
        dz = torch.randn(3, 20, ho, wo, generator=generator)
        grad_weight, _ = conv_wgrad.conv2d_weight_grad(dz, x, weight, geometry, bias_grad=False, config=config)
        expected = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dz.double(), stride=(2, 1), padding=(2, 0),
                                               dilation=(2, 1))
        _assert_close(grad_weight, expected, FP32_TOLERANCE, f"grad_weight {h}x{w}")


def test_dgrad_adds_another_readers_gradient_in_its_launch():
    """`add` (x's gradient from its other readers) summed into dx by the dgrad epilogue: stride-2 phases, add in
    the other memory format than dx, an empty dz (dx is add), and the depthwise path (added after its kernel)."""
    generator = torch.Generator().manual_seed(15)
    x = torch.randn(2, 6, 9, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    for groups, kernel in ((1, 3), (6, 3)):
        weight = torch.randn(6, 6 // groups, kernel, kernel, generator=generator)
        geometry = make_geometry((kernel, kernel), 2, 1, 1, groups)
        dz = torch.randn(2, 6, *geometry.output_hw(9, 8, kernel, kernel), generator=generator)
        add = torch.randn(x.shape, generator=generator)  # contiguous, dx channels_last
        expected = torch.nn.grad.conv2d_input(x.shape, weight.double(), dz.double(), stride=2, padding=1,
                                              groups=groups) + add.double()
        grad_x = torch.ops.workbench.conv2d_backward(dz, x, weight, x.new_empty(0), [2, 2], [1, 1, 1, 1], [1, 1],
                                                     groups, None, 0.0, True, False, False, False, add)[0]
        _assert_close(grad_x, expected, FP32_TOLERANCE, f"grad_x groups={groups}")
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
    empty = conv_dgrad.conv2d_input_grad(dz[:0], weight, x[:0], geometry, add=add[:0])
    assert empty.shape == x[:0].shape
    weight = torch.randn(6, 6, 3, 3, generator=generator)
    geometry = make_geometry((3, 3), 1, 1, 1, 1)
    no_positions = torch.zeros(2, 6, 9, 8)[:, :, :0]  # dz with no positions: dx is the other readers' gradient
    assert torch.equal(conv_dgrad.conv2d_input_grad(no_positions, weight, x, geometry, add=add), add)


def test_conv_with_statistics_hands_its_input_on_only_as_given_and_needing_a_gradient():
    """The x handed on is a view carrying the conv's backward only where x needs a gradient under grad mode and
    runs as given; else x itself (its other readers then get their gradient from autograd's own add)."""
    generator = torch.Generator().manual_seed(16)
    weight = torch.randn(4, 3, 3, 3, generator=generator, requires_grad=True)
    running = batch_norm.Running(None, None, None, 0.1, 1e-5)
    x = torch.randn(2, 3, 5, 5, generator=generator, requires_grad=True)
    handed = ops.conv2d_with_statistics(x, weight, None, 1, 1, 1, 1, running)[3]
    assert handed is not x and handed._base is x and handed.grad_fn is not None
    with torch.no_grad():
        assert ops.conv2d_with_statistics(x, weight, None, 1, 1, 1, 1, running)[3] is x
    detached = x.detach()
    assert ops.conv2d_with_statistics(detached, weight, None, 1, 1, 1, 1, running)[3] is detached
    channels_last_weight = weight.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert ops.conv2d_with_statistics(x, channels_last_weight, None, 1, 1, 1, 1, running)[3] is x  # x converted
