"""Tiled GEMM with grouped program ordering, fp32 accumulation and a fused epilogue.

    c = act(a @ b + bias)                a: [M, K], b: [K, N], bias: [N], any strides

The epilogue adds the bias, applies the activation and can keep the pre-activation `a @ b + bias`
for the backward (STORE_PRE). The backward reuses the same kernel with transposes expressed as
stride swaps; the activation derivative is fused into the load of operand A (ACT_GRAD_A: the
A tile is multiplied by act'(pre) as it is loaded) and the bias gradient into the row sums of
A (ROWSUM_A), so grad_z = grad_out * act'(pre) need not be written to memory:

    grad_a   = grad_z   @ b^T     (A = grad_out with act'(pre), B = b^T)
    grad_b^T = grad_z^T @ a       (A = grad_out^T with act'(pre^T), B = a; stored through grad_b^T)
    grad_bias = row sums of grad_z^T, taken in the grad_b^T launch

When both grads need an expensive derivative (gelu, silu, ...), grad_z is computed once by the
elementwise activation kernel instead of twice in the operand loads (see `backward`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from triton_workbench.kernels import hardware, runtime, tuned
from triton_workbench.kernels.host_math import cdiv, next_power_of_2
from triton_workbench.kernels.runtime import jit
from triton_workbench.kernels.activation import (ACTIVATION_ENTRY, activation_code, apply, parameter,
                                                 derivative, torch_activation)
from triton_workbench.kernels.activation import run as run_activation
from triton_workbench.kernels.spec import (DTYPE_ENTRY, DTYPES, INT32_MAX, Config, KernelSpec, Problem, choice,
                                          dtype_name, flag, size, tf32_with_fp32)

CHEAP_DERIVATIVES = frozenset({None, "relu", "leaky_relu"})  # a select: recomputing costs nothing


@jit
def tile_coordinates(rows, cols, GROUP_M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program 0-axis id -> (tile row, tile column), GROUP_M row tiles walked together for L2 reuse."""
    pid = tl.program_id(0)
    tiles_per_row = tl.cdiv(cols, BLOCK_N)
    return tl.swizzle2d(pid // tiles_per_row, pid % tiles_per_row, tl.cdiv(rows, BLOCK_M), tiles_per_row, GROUP_M)


@jit
def gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    stride_aux0, stride_aux1, negative_slope, GROUP_M,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    ACT_GRAD_A: tl.constexpr, ROWSUM_A: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INT64: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of c.

    aux is the pre-activation: written [M, N] by the epilogue when STORE_PRE, read [M, K] beside
    A by the prologue when ACT_GRAD_A (A := A * act'(aux)). ROWSUM_A stores the row sums of the
    (prologue-scaled) A into rowsum_ptr from the programs of the first column of tiles.
    GROUP_M is a runtime argument: it changes the program order, not the compiled code.
    """
    pid_m, pid_n = tile_coordinates(M, N, GROUP_M, BLOCK_M, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:  # element offsets beyond 2**31: do the pointer arithmetic in 64 bits
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if ACT_GRAD_A:
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_aux0 + offs_k[None, :] * stride_aux1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        mask_a = mask_m[:, None] & (offs_k[None, :] < k_left)
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if ACT_GRAD_A:
            pre = tl.load(aux_ptrs, mask=mask_a, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * derivative(pre, ACTIVATION, negative_slope)).to(b.dtype)
            aux_ptrs += BLOCK_K * stride_aux1
        if ROWSUM_A:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROWSUM_A:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m * stride_bias, rowsum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        aux_out = aux_ptr + offs_m[:, None] * stride_aux0 + offs_n[None, :] * stride_aux1
        tl.store(aux_out, acc.to(aux_ptr.dtype.element_ty), mask=mask_c)
    if not ACT_GRAD_A:  # in the backward the activation was already differentiated in the prologue
        acc = apply(acc, ACTIVATION, negative_slope)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# ---------------------------------------------------------------------------------------------
# launcher


def input_precision(dtype: torch.dtype) -> str:
    """"tf32" for fp32 when torch.backends.cuda.matmul.allow_tf32 is on (GPU only), else "ieee"."""
    if dtype == torch.float32 and not runtime.INTERPRETER and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def max_offset(tensor: torch.Tensor) -> int:
    """The largest element offset a strided tensor reaches: whether 32-bit offsets suffice."""
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def _launch_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, bias: torch.Tensor | None = None,
                   activation_name: str | None = None, negative_slope: float | None = None,
                   pre_out: torch.Tensor | None = None, pre_in: torch.Tensor | None = None,
                   rowsum: torch.Tensor | None = None, config: Config | None = None) -> None:
    """Write act(a @ b + bias) into c (all shapes checked by the caller); see gemm_kernel for aux."""
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:  # no tile to compute (the backward avoids N = 0 with row sums wanted)
        return
    aux = pre_out if pre_out is not None else pre_in
    problem = problem_for(a, b, bias is not None or rowsum is not None, activation_name,
                          backward=pre_in is not None or rowsum is not None)
    config = config if config is not None else tuned.config_for(GEMM_SPEC, problem)
    tensors = [t for t in (a, b, c, bias, aux, rowsum) if t is not None]
    bias_like = bias if bias is not None else rowsum
    runtime.announce()
    gemm_kernel[grid(problem, config)](
        a, b, c, bias_like if bias_like is not None else c, aux if aux is not None else c,
        rowsum if rowsum is not None else c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        bias_like.stride(0) if bias_like is not None else 0,
        aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0,
        parameter(activation_name, negative_slope), config["GROUP_M"],
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation_name),
        STORE_PRE=pre_out is not None, ACT_GRAD_A=pre_in is not None, ROWSUM_A=rowsum is not None,
        INPUT_PRECISION=input_precision(a.dtype), INT64=max(map(max_offset, tensors)) > INT32_MAX,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **runtime.LAUNCH_OPTIONS,
    )


def problem_for(a: torch.Tensor, b: torch.Tensor, bias: bool, activation_name: str | None,
                backward: bool = False) -> Problem:
    """The problem dict of a launch (the key of its tuned config).

    A backward launch ("backward": True) reads act'(pre) beside operand A when there is an
    activation and takes row sums of A when "bias" is set, instead of adding a bias.
    """
    problem: Problem = {"M": a.shape[0], "N": b.shape[1], "K": a.shape[1], "dtype": dtype_name(a.dtype),
                        "activation": activation_name, "bias": bias}
    if backward:
        problem["backward"] = True
    if a.dtype == torch.float32:
        problem["tf32"] = input_precision(a.dtype) == "tf32"
    return problem


def forward(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation_name: str | None = None,
            negative_slope: float | None = None, keep_pre: bool = False,
            config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(a @ b + bias), the pre-activation if keep_pre and there is an activation, else None)."""
    c = a.new_empty((a.shape[0], b.shape[1]))
    pre = a.new_empty(c.shape) if keep_pre and activation_name is not None else None
    _launch_kernel(a, b, c, bias=bias, activation_name=activation_name, negative_slope=negative_slope,
                   pre_out=pre, config=config)
    return c, pre


def backward(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor | None,
             activation_name: str | None, negative_slope: float, needs: tuple[bool, bool, bool]
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (a, b, bias) of act(a @ b + bias), each only where `needs` says so.

    `pre` is the kept pre-activation (None when there is no activation). The derivative is fused
    into the operand loads unless two GEMMs would each recompute an expensive one; then grad_z is
    materialised once by the elementwise kernel and the GEMMs run without an activation.
    """
    need_a, need_b, need_bias = needs
    gemms = int(need_a) + int(need_b or need_bias)
    if activation_name is not None and gemms > 1 and activation_name not in CHEAP_DERIVATIVES:
        grad_out = run_activation(pre, activation_name, negative_slope, grad=grad_out)
        activation_name, pre = None, None
    grad_a = grad_b = grad_bias = None
    if need_a:
        grad_a = torch.empty_like(a)
        _launch_kernel(grad_out, b.t(), grad_a, activation_name=activation_name, negative_slope=negative_slope,
                       pre_in=pre)
    if need_b or need_bias:
        # grad_b^T = grad_z^T @ a, written through a stride swap of grad_b; with no columns in a
        # (K = 0) a zero column stands in so the bias gradient still gets its row sums
        a_operand = a if a.shape[1] else a.new_zeros(a.shape[0], 1)
        grad_b = torch.empty_like(b) if a.shape[1] else b.new_empty(1, b.shape[1])
        grad_bias = grad_out.new_empty(b.shape[1]) if need_bias else None
        _launch_kernel(grad_out.t(), a_operand, grad_b.t(), activation_name=activation_name,
                       negative_slope=negative_slope, pre_in=None if pre is None else pre.t(), rowsum=grad_bias)
    return grad_a, grad_b[: b.shape[0]] if need_b else None, grad_bias


# ---------------------------------------------------------------------------------------------
# KernelSpec


def grid(problem: Problem, config: Config) -> tuple[int, ...]:
    return (cdiv(problem["M"], config["BLOCK_M"]) * cdiv(problem["N"], config["BLOCK_N"]),)


def shared_bytes_estimate(config: Config, problem: Problem) -> int:
    """Shared memory a config needs: the pipelined A, B (and pre-activation) tiles, or the epilogue's
    layout conversion of the fp32 accumulator, whichever is larger (Triton reuses the buffers)."""
    itemsize = DTYPES[problem["dtype"]].itemsize
    tile_elements = config["BLOCK_M"] * config["BLOCK_K"] * (2 if _reads_pre(problem) else 1)
    tile_elements += config["BLOCK_K"] * config["BLOCK_N"]
    pipeline = max(config["num_stages"], 1) * tile_elements * itemsize
    epilogue = config["BLOCK_M"] * config["BLOCK_N"] * 4
    return max(pipeline, epilogue)


def _reads_pre(problem: Problem) -> bool:
    return bool(problem.get("backward")) and problem.get("activation") is not None


def fits_shared_memory(config: Config, problem: Problem) -> bool:
    """The config's shared memory fits every compile target (`hardware.COMPILE_TARGETS`: the smallest limit
    bounds it)."""
    limit = min(hardware.ARCHITECTURES[arch].shared_bytes_per_block for arch in hardware.COMPILE_TARGETS)
    return shared_bytes_estimate(config, problem) <= limit


def _fits_registers(config: Config, problem: Problem) -> bool:
    """Accumulator plus one stage of A and B tiles: at most 96 values per thread.

    Measured with `workbench check-compile gemm` (fp16 and fp32, gelu epilogue, sm_80): above
    this ptxas spills in nearly every config; at or below it in 3 of 102.
    """
    threads = 32 * config["num_warps"]
    accumulator = config["BLOCK_M"] * config["BLOCK_N"] / threads
    operands = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] / threads
    return accumulator + operands <= 96


def _uses_its_warps(config: Config, problem: Problem) -> bool:
    """Every warp gets at least a 16x16 piece of the tile (else warps idle or duplicate work)."""
    return config["BLOCK_M"] * config["BLOCK_N"] >= 256 * config["num_warps"]


def default_config(problem: Problem) -> Config:
    """A sound heuristic: 128x128 tiles for big problems, smaller ones for small M or N."""
    block_m = min(128, max(32, next_power_of_2(problem["M"])))
    block_n = min(128, max(32, next_power_of_2(problem["N"])))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8,
            "num_warps": 8 if block_m * block_n >= 128 * 128 else 4, "num_stages": 3}


def make_inputs(problem: Problem, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[problem["dtype"]]
    M, N, K = problem["M"], problem["N"], problem["K"]
    scale = max(K, 1) ** -0.5  # keeps a @ b of unit size whatever K is

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=dtype)

    return {"a": randn(M, K), "b": randn(K, N, std=scale), "bias": randn(N) if problem.get("bias") else None,
            "activation": problem.get("activation")}


def launch(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    return forward(inputs["a"], inputs["b"], inputs["bias"], inputs["activation"], config=config)[0]


def torch_gemm(inputs: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """What an unfused model computes: matmul, then a separate bias add, then the activation."""
    a, b, bias = (t.to(dtype) if t is not None and dtype is not None else t
                  for t in (inputs["a"], inputs["b"], inputs["bias"]))
    z = a @ b
    if bias is not None:
        z = z + bias
    return torch_activation(z, inputs["activation"])


def _bytes(problem: Problem) -> int:
    M, N, K = problem["M"], problem["N"], problem["K"]
    elements = M * K + K * N + M * N + (N if problem.get("bias") else 0)
    return elements * DTYPES[problem["dtype"]].itemsize


GEMM_SPEC = KernelSpec(
    name="gemm",
    kernel=gemm_kernel,
    params={
        # sized so the whole space compiles for sm_80 and sm_90 in minutes (workbench check-compile);
        # BLOCK_N reaches 256 for wide outputs, K below a block is masked (no smaller BLOCK_K needed)
        "BLOCK_M": [32, 64, 128],
        "BLOCK_N": [32, 64, 128, 256],
        "BLOCK_K": [32, 64],
        "GROUP_M": [1, 8],
        "num_warps": [4, 8],
        "num_stages": [3, 4],
    },
    constraints=(fits_shared_memory, _fits_registers, _uses_its_warps),
    default_config=default_config,
    make_inputs=make_inputs,
    launch=launch,
    reference=lambda inputs: torch_gemm(inputs, torch.float64),
    flops=lambda problem: 2 * problem["M"] * problem["N"] * problem["K"],
    bytes=_bytes,
    grid=grid,
    baseline=torch_gemm,
    example_problems=(
        {"M": 4096, "N": 4096, "K": 4096, "dtype": "fp32", "activation": "gelu", "bias": True, "tf32": True},
        {"M": 4096, "N": 4096, "K": 4096, "dtype": "fp16", "activation": "gelu", "bias": True},
        {"M": 4096, "N": 4096, "K": 4096, "dtype": "bf16", "activation": "gelu", "bias": True},
    ),
    shape_keys=("M", "N", "K"),
    # as `problem_for` writes them: "backward" only when true, "tf32" with fp32 only (K = 0 is an empty sum)
    problem_schema={"M": size(), "N": size(), "K": size(0), "dtype": DTYPE_ENTRY, "activation": ACTIVATION_ENTRY,
                    "bias": flag(), "backward": choice(True, required=False), "tf32": flag(required=False)},
    problem_rules=(tf32_with_fp32,),
)
