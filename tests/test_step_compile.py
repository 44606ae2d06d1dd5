"""`workbench check-compile model`: every Triton launch of a swapped training step compiled for sm_90 in
compile workers, no GPU needed. (The interpreter runs code the compiler rejects: a BatchNorm kernel that
used a loop's variable after the loop passed every interpreted test and failed to compile.)"""

import pytest
import torch

from step_models import residual_net
from triton_workbench.kernels import aot
from triton_workbench.kernels.nn import swap
from triton_workbench.workbench import step_compile, traffic
from triton_workbench.workbench.cli import main as workbench

MODEL = "step_models:residual_net"


def test_every_launch_of_the_step_compiles_and_each_is_counted_once():
    results = step_compile.compile_step(MODEL, batch=2, image_size=9, dtype="fp16", archs=(90,), workers=2,
                                        progress=False)
    assert results["ok"].all(), results.loc[~results["ok"], ["kernel", "reason"]].to_string()
    assert {"partial_moments_kernel", "finalize_kernel", "normalize_kernel", "backward_sums_kernel",
            "backward_apply_kernel", "conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel",
            "gemm_kernel"} <= set(results["kernel"])
    assert (results["registers"] > 0).all() and (results["spills"] == 0).all()
    recorded = traffic.step_kernels(swap(residual_net()), (2, 3, 9, 9), torch.float16)  # this process's launches
    assert results["launches"].sum() == sum(kernel.name.endswith("_kernel") for kernel in recorded)
    summary = step_compile.summary(results)
    assert summary["launches"].sum() == results["launches"].sum() and (summary["failures"] == 0).all()


def test_a_compile_error_is_a_result_with_its_reason():
    broken = aot.Specialisation({"y_ptr": "*fp16"}, {}, {}, {"num_warps": 4, "num_stages": 2}, (1, 1, 1))
    pool = aot.compile_pool(1)
    try:
        result = pool.submit(step_compile.compile_in_worker, "triton_workbench.kernels.batch_norm:normalize_kernel",
                             broken, 90).result()
    finally:
        pool.shutdown()
    assert result["ok"] is False and result["reason"].startswith(("CompilationError", "KeyError", "IndexError"))


@pytest.mark.parametrize("argv, message", [
    (["model"], "needs MODEL"),
    (["model", "nosuch_module:build"], "MODEL 'nosuch_module:build' names no function"),
    (["model", "builtins:dict"], "returned dict, not a torch.nn.Module"),
    (["model", "demo", "--batch", "0"], "--batch must be positive"),
    (["model", "demo", "--input-size", "-3"], "--input-size must be positive"),
    (["model", "demo", "--sample", "3"], "--sample and --seed apply to a kernel's space"),
    (["gemm", "resnet18"], "MODEL apply to `workbench check-compile model` only"),
    (["gemm", "--batch", "8", "--dtype", "fp32"], "--batch, --dtype apply to `workbench check-compile model` only"),
])
def test_check_compile_model_arguments_fail_in_one_line_naming_the_argument(argv, message, capsys):
    assert workbench(["check-compile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_check_compile_model_defaults_to_this_machines_gpu_else_every_target(monkeypatch):
    from triton_workbench.workbench.commands import check_compile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_compile.model_archs() == "80,90"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert check_compile.model_archs() == "90"
