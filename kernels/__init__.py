"""Fused Triton kernels (GEMM, conv2d, activations) and their PyTorch faces."""

from kernels import runtime  # first: decides interpreter vs GPU before any kernel is defined
from kernels.activation import ACTIVATION_SPEC
from kernels.conv import CONV_DGRAD_SPEC, CONV_FWD_SPEC, CONV_WGRAD_SPEC
from kernels.gemm import GEMM_SPEC
from kernels.ops import activation, conv2d, gemm, linear
from kernels import nn  # kernels.nn.swap, TritonLinear, TritonActivation (after ops: it builds on them)
from kernels.spec import KernelSpec

# every kernel by name (the compile check and the autotuner look kernels up here)
SPECS: dict[str, KernelSpec] = {"gemm": GEMM_SPEC, "activation": ACTIVATION_SPEC, "conv_fwd": CONV_FWD_SPEC,
                               "conv_dgrad": CONV_DGRAD_SPEC, "conv_wgrad": CONV_WGRAD_SPEC}

__all__ = ["SPECS", "activation", "conv2d", "gemm", "linear", "nn", "runtime"]
