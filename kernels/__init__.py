"""Fused Triton kernels (GEMM, conv2d, activations) and their PyTorch faces."""

from triton_workbench.kernels import runtime
from triton_workbench.kernels.activation import ACTIVATION_SPEC
from triton_workbench.kernels.conv_depthwise import DEPTHWISE_FWD_SPEC
from triton_workbench.kernels.conv_depthwise_grad import DEPTHWISE_DGRAD_SPEC, DEPTHWISE_WGRAD_SPEC
from triton_workbench.kernels.conv_dgrad import CONV_DGRAD_SPEC
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
from triton_workbench.kernels.conv_wgrad import CONV_WGRAD_SPEC
from triton_workbench.kernels.gemm import GEMM_SPEC
from triton_workbench.kernels.ops import activation, conv2d, gemm, linear
from triton_workbench.kernels import nn  # nn.swap, TritonLinear, TritonActivation (after ops: it builds on them)
from triton_workbench.kernels.spec import KernelSpec

# every kernel by name (the compile check and the autotuner look kernels up here)
SPECS: dict[str, KernelSpec] = {"gemm": GEMM_SPEC, "activation": ACTIVATION_SPEC, "conv_fwd": CONV_FWD_SPEC,
                               "conv_dgrad": CONV_DGRAD_SPEC, "conv_wgrad": CONV_WGRAD_SPEC,
                               "depthwise_fwd": DEPTHWISE_FWD_SPEC, "depthwise_dgrad": DEPTHWISE_DGRAD_SPEC,
                               "depthwise_wgrad": DEPTHWISE_WGRAD_SPEC}

__all__ = ["SPECS", "activation", "conv2d", "gemm", "linear", "nn", "runtime"]
