"""The fused GEMM (forward and backward) against PyTorch in float64, and its KernelSpec."""

import importlib

import pytest
import torch

from triton_workbench import kernels
from triton_workbench.kernels.activation import NAMES
from triton_workbench.kernels.gemm import GEMM_SPEC, backward, forward, input_precision, shared_bytes_estimate, torch_gemm

gemm_module = importlib.import_module("triton_workbench.kernels.gemm")  # `kernels.gemm` the attribute is the public function
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _operands(M, N, K, dtype, device, layout="contiguous", seed=0):
    """a [M, K] and b [K, N] in the given memory layout (the values do not depend on it)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=generator).to(device, dtype)
    b = (torch.randn(K, N, generator=generator) / max(K, 1) ** 0.5).to(device, dtype)
    if layout == "transposed":  # column-major views: only the strides change
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    elif layout == "strided":  # every other column of a wider tensor
        a = torch.zeros(M, 2 * K, dtype=dtype, device=device)[:, ::2].copy_(a)
        b = torch.zeros(K, 2 * N, dtype=dtype, device=device)[:, ::2].copy_(b)
    return a, b


def _check(M, N, K, activation, with_bias, dtype, device, layout="contiguous", config=None, tolerance=2e-5,
           needs=(True, True, True)):
    a, b = _operands(M, N, K, dtype, device, layout)
    generator = torch.Generator().manual_seed(1)
    bias = torch.randn(N, generator=generator).to(device, dtype) if with_bias else None
    grad_out = torch.randn(M, N, generator=generator).to(device, dtype)

    out, pre = forward(a, b, bias, activation, keep_pre=True, config=config)
    grads = backward(grad_out, a, b, pre, activation, None, (needs[0], needs[1], needs[2] and with_bias))

    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (a, b, bias)]
    expected = torch_gemm({"a": leaves[0], "b": leaves[1], "bias": leaves[2], "activation": activation})
    expected.backward(grad_out.double())
    scale = lambda t: max(t.abs().amax().item(), 1.0) if t.numel() else 1.0
    torch.testing.assert_close(out.double(), expected.detach(), rtol=0, atol=tolerance * scale(expected))
    for grad, leaf, need in zip(grads, leaves, needs):
        if leaf is None or not need:
            assert grad is None
            continue
        assert grad.shape == leaf.shape and grad.dtype == dtype
        torch.testing.assert_close(grad.double(), leaf.grad, rtol=0, atol=tolerance * scale(leaf.grad))


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 7, 3), (37, 70, 31), (64, 64, 64), (33, 1, 97)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_shapes_and_layouts_fp32(M, N, K, layout, device):
    _check(M, N, K, "gelu", True, torch.float32, device, layout, config=SMALL_TILES)


@pytest.mark.parametrize("activation", [None, *NAMES])
def test_every_activation_with_and_without_bias(activation, device):
    for with_bias in (True, False):
        _check(19, 35, 13, activation, with_bias, torch.float32, device, config=SMALL_TILES)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_single_gradient_paths(needs, device):
    """One consumer fuses act' into the operand load even for expensive activations."""
    _check(21, 18, 11, "silu", True, torch.float32, device, config=SMALL_TILES, needs=needs)


def test_fp16_inputs_accumulate_in_fp32(device):
    _check(40, 24, 70, "gelu_tanh", True, torch.float16, device, tolerance=5e-3)
    _check(40, 24, 70, "relu", False, torch.float16, device, layout="transposed", tolerance=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and TF32 need a CUDA device")
def test_bf16_and_tf32_on_gpu(device):
    _check(130, 200, 96, "gelu", True, torch.bfloat16, device, tolerance=3e-2)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert input_precision(torch.float32) == "tf32"
        _check(130, 200, 96, "silu", True, torch.float32, device, tolerance=5e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_interpreter_uses_ieee_fp32():
    if kernels.runtime.INTERPRETER:
        assert input_precision(torch.float32) == "ieee"
    assert input_precision(torch.float16) == "ieee"


def test_empty_and_zero_k(device):
    _check(0, 5, 3, "gelu", True, torch.float32, device)
    _check(4, 5, 0, "gelu", True, torch.float32, device)  # z = bias, grads of a and b are empty/zero
    _check(4, 5, 0, "relu", True, torch.float32, device)


def test_64_bit_offsets_path(monkeypatch, device):
    """The INT64 variant computes the same result (forced here by lowering the threshold)."""
    monkeypatch.setattr(gemm_module, "INT32_MAX", 0)
    _check(20, 9, 17, "tanh", True, torch.float32, device, layout="transposed", config=SMALL_TILES)
    big = torch.empty(2**16, 2**16, device="meta")
    assert gemm_module.max_offset(big) > 2**31 - 1


def test_default_config_launches_and_matches_reference(device):
    problem = {"M": 50, "N": 20, "K": 9, "dtype": "fp32", "activation": "leaky_relu", "bias": True}
    inputs = GEMM_SPEC.make_inputs(problem, device)
    config = kernels.tuned.config_for(GEMM_SPEC, problem)  # nothing stored: the default
    assert config == GEMM_SPEC.default_config(problem)
    expected = GEMM_SPEC.reference(inputs)
    error = (GEMM_SPEC.launch(inputs, config).double() - expected).abs().max() / expected.abs().max()
    assert error < GEMM_SPEC.tolerance(problem)
    baseline = GEMM_SPEC.baseline(inputs)
    assert baseline.dtype == torch.float32 and (baseline.double() - expected).abs().max() < 1e-4
    assert GEMM_SPEC.flops(problem) == 2 * 50 * 20 * 9
    assert GEMM_SPEC.bytes(problem) == (50 * 9 + 9 * 20 + 50 * 20 + 20) * 4
    tiles = -(-50 // config["BLOCK_M"]) * -(-20 // config["BLOCK_N"])
    assert GEMM_SPEC.grid(problem, config) == (tiles,)


def test_space_respects_shared_memory_and_defaults_are_valid():
    from triton_workbench.kernels.aot import default_space
    from triton_workbench.kernels.hardware import AMPERE_A100

    for problem in GEMM_SPEC.example_problems:
        space = default_space(GEMM_SPEC, problem)
        assert len(space) > 50
        assert all(shared_bytes_estimate(c, problem) <= AMPERE_A100.shared_bytes_per_block for c in space)
        assert GEMM_SPEC.is_valid(GEMM_SPEC.default_config(problem), problem)
    fp32 = GEMM_SPEC.example_problems[0]
    too_big = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
    assert shared_bytes_estimate(too_big, fp32) == 4 * (256 * 64 + 64 * 128) * 4
    assert not GEMM_SPEC.is_valid(too_big, fp32)
    for M, N in [(1, 1), (7, 3000), (5000, 16), (4096, 4096)]:
        for dtype in ("fp32", "fp16"):
            for backward in (False, True):  # a backward launch also pipelines the pre-activation tile
                problem = {"M": M, "N": N, "K": 5, "dtype": dtype, "activation": "gelu", "bias": True,
                           "backward": backward}
                assert GEMM_SPEC.is_valid(GEMM_SPEC.default_config(problem), problem)
    assert kernels.SPECS["gemm"] is GEMM_SPEC
