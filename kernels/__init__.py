"""Fused Triton kernels (GEMM, conv2d, activations) and their PyTorch faces."""

from kernels import runtime  # first: decides interpreter vs GPU before any kernel is defined
