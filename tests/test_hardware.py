"""The hardware table: lookups by device name and compute capability, and the limits its users read."""

import pytest

from triton_workbench.kernels import hardware, runtime
from triton_workbench.kernels.gemm import GEMM_SPEC, shared_bytes_estimate


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA A10", "A10"), ("Quadro K620", None), ("", None), (None, None),
])
def test_known_gpus_by_device_name(name, model):
    found = hardware.gpu_by_name(name)
    assert (found.name if found else None) == model


@pytest.mark.parametrize("capability", [90, "9.0", "sm_90", "90", (9, 0), " SM_90 "])
def test_architecture_by_compute_capability(capability):
    assert hardware.architecture(capability) is hardware.HOPPER


def test_unknown_and_malformed_capabilities():
    assert hardware.architecture("7.5") is None
    with pytest.raises(ValueError, match="not a compute capability: 'hopper'"):
        hardware.architecture("hopper")


def test_published_numbers():
    limits = {arch: record.shared_bytes_per_block for arch, record in hardware.ARCHITECTURES.items()}
    assert limits == {70: 96 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
    h100 = hardware.gpu_by_name("NVIDIA H100 80GB HBM3")
    assert (h100.sm_count, h100.bandwidth_gbps, h100.architecture.target) == (132, 3350, "sm_90")
    assert h100.compute_tflops == {"FP32": 67.0, "TF32 tensor": 494.7, "FP16/BF16 tensor": 989.4}
    assert hardware.gpus_of("8.0") == (hardware.A100_80GB_PCIE, hardware.A100_80GB_SXM, hardware.A100_40GB)
    assert all(gpu.architecture is hardware.ARCHITECTURES[gpu.architecture.capability] for gpu in hardware.GPUS)


@pytest.mark.skipif(not runtime.INTERPRETER, reason="a GPU reports its own limits")
def test_interpreter_limits_are_the_sm90_compile_target():
    from triton_workbench.database import environment

    limits = {"shared_bytes": 232448, "registers_per_sm": 65536, "registers_per_thread": 255}
    assert environment.device_limits() == limits


def test_spaces_are_bounded_by_the_smallest_compile_target():
    fp32 = GEMM_SPEC.example_problems[0]
    just_over_sm80 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    assert 163 * 1024 < shared_bytes_estimate(just_over_sm80, fp32) <= 227 * 1024
    assert not GEMM_SPEC.constraints[0](just_over_sm80, fp32)
