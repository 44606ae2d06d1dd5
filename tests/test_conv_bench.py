"""`workbench bench conv`: the ResNet-18 case list, what each side computes when timed (run once here in the
interpreter against float64), the sweep's bookkeeping, and the CPU message. No timings are asserted."""

from __future__ import annotations

import json

import pytest
import torch

from triton_workbench.database import Database
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC
from triton_workbench.kernels.conv_geometry import conv_problem, make_geometry, problem_geometry
from triton_workbench.workbench import conv_bench
from triton_workbench.workbench.conv_bench import RESNET18_CONV_SHAPES, resnet18_problem
from triton_workbench.workbench.cli import main

LAYERS = len(RESNET18_CONV_SHAPES)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # relative to the largest float64 reference magnitude


def test_the_default_sweep_is_every_layer_at_both_batches_input_sizes_and_three_dtypes():
    cases = conv_bench.resnet18_cases()
    assert LAYERS == 11
    assert len(cases) == LAYERS * 2 * 2 * 3
    keys = {(c.layer, c.batch, c.input_size, c.dtype) for c in cases}
    assert len(keys) == len(cases)  # no case twice
    assert {c.batch for c in cases} == {64, 256}
    assert {c.input_size for c in cases} == {224, 32}
    assert {c.dtype for c in cases} == {"fp16", "bf16", "fp32"}
    for case in cases:
        p = case.problem
        assert p["n"] == case.batch and p["activation"] == "relu" and p["bias"] is True
        assert p["layout"] == ("nchw" if case.dtype == "fp32" else "nhwc")
        assert ("tf32" in p) == (case.dtype == "fp32")


def test_224_cases_are_the_recorded_shapes():
    cases = conv_bench.resnet18_cases(batches=[64], input_sizes=[224], dtypes=["fp16"])
    assert [c.layer for c in cases] == [s["name"] for s in RESNET18_CONV_SHAPES]
    for case, shape in zip(cases, RESNET18_CONV_SHAPES):
        p = case.problem
        assert (p["c_in"], p["h"], p["w"], p["c_out"], p["kh"]) == (shape["c_in"], shape["h"], shape["w"],
                                                                    shape["c_out"], shape["kh"])
        assert p["stride"] == [shape["stride"]] * 2 and p["padding"] == [shape["padding"]] * 4


def test_resnet18_shapes_give_the_published_output_sizes():
    sizes = {}
    for shape in RESNET18_CONV_SHAPES:
        problem = resnet18_problem(shape)
        geometry = problem_geometry(problem)
        sizes[shape["name"]] = geometry.output_hw(shape["h"], shape["w"], shape["kh"], shape["kw"])
    assert sizes["conv1"] == (112, 112) and sizes["layer1"] == (56, 56)
    assert sizes["layer2.0.downsample"] == (28, 28) and sizes["layer4"] == (7, 7)


def test_32_cases_have_a_cifar_stem_and_stages_at_32_16_8_4():
    cases = {c.layer: c.problem for c in conv_bench.resnet18_cases(batches=[64], input_sizes=[32], dtypes=["fp32"])}
    assert len(cases) == LAYERS
    stem = cases["conv1"]
    assert (stem["c_in"], stem["h"], stem["c_out"], stem["kh"], stem["stride"], stem["padding"]) == (
        3, 32, 64, 3, [1, 1], [1, 1, 1, 1])
    expected_hw = {"layer1": 32, "layer2.0.conv1": 32, "layer2.0.downsample": 32, "layer2": 16,
                   "layer3.0.conv1": 16, "layer3.0.downsample": 16, "layer3": 8,
                   "layer4.0.conv1": 8, "layer4.0.downsample": 8, "layer4": 4}
    assert {name: p["h"] for name, p in cases.items() if name != "conv1"} == expected_hw
    for shape in RESNET18_CONV_SHAPES[1:]:  # channels, kernel, stride and padding as in the 224 network
        p = cases[shape["name"]]
        assert p["h"] == p["w"] and shape["h"] * 32 == p["h"] * 56
        assert (p["c_in"], p["c_out"], p["kh"], p["stride"][0], p["padding"][0]) == (
            shape["c_in"], shape["c_out"], shape["kh"], shape["stride"], shape["padding"])
    # each stage's first (stride-2) conv outputs the size its stage runs at, as in the network
    for stage in ("layer2", "layer3", "layer4"):
        first = cases[f"{stage}.0.conv1"]
        assert make_geometry((3, 3), first["stride"], first["padding"][0]).output_hw(first["h"], first["w"], 3, 3) == (
            cases[stage]["h"], cases[stage]["w"])

def test_narrowing_and_the_tf32_policy():
    cases = conv_bench.resnet18_cases(batches=[64], input_sizes=[32], dtypes=["fp16"])
    assert len(cases) == LAYERS and all(c.batch == 64 and c.input_size == 32 and c.dtype == "fp16" for c in cases)
    assert all(c.problem["tf32"] is False for c in conv_bench.resnet18_cases([64], [32], ["fp32"], tf32=False))
    assert all(c.problem["tf32"] is True for c in conv_bench.resnet18_cases([64], [32], ["fp32"], tf32=True))
    with pytest.raises(ValueError, match="input_size"):
        conv_bench.resnet18_cases(input_sizes=[64])
    with pytest.raises(ValueError, match="batch"):
        conv_bench.resnet18_cases(batches=[0])
    with pytest.raises(ValueError, match="dtype"):
        conv_bench.resnet18_cases(dtypes=["fp64"])


def test_half_precision_cases_build_channels_last_tensors():
    fp16, fp32 = (next(c for c in conv_bench.resnet18_cases([64], [32], [dtype]) if c.layer == "layer4")
                  for dtype in ("fp16", "fp32"))
    inputs = CONV_FWD_SPEC.make_inputs(fp16.problem, torch.device("cpu"))
    for name in ("x", "weight", "grad_output"):
        assert inputs[name].dtype == torch.float16
        assert inputs[name].is_contiguous(memory_format=torch.channels_last) and not inputs[name].is_contiguous()
    assert CONV_FWD_SPEC.make_inputs(fp32.problem, torch.device("cpu"))["x"].is_contiguous()


def _tiny_case(dtype: str, layout: str) -> conv_bench.ConvBenchCase:
    """5 channels in, 7 out, 3x3 stride 2 on 9x11 images, batch 3: odd sizes below every block size."""
    problem = conv_problem(3, 5, 9, 11, 7, 3, 3, make_geometry((3, 3), 2, 1), dtype, layout, "relu", True)
    (case,) = conv_bench.explicit_cases([problem], tf32=False)
    return case


@pytest.mark.parametrize("dtype,layout", [("fp32", "nchw"), ("fp16", "nhwc")])
def test_timed_calls_compute_what_cudnn_computes(dtype, layout):
    """Both sides' fwd and fwd+bwd outputs (y; y, dx, dw, db) against the unfused op in float64."""
    case = _tiny_case(dtype, layout)
    inputs = CONV_FWD_SPEC.make_inputs(case.problem, torch.device("cpu"))
    exact = {key: value.to(torch.float64) if isinstance(value, torch.Tensor) else value
             for key, value in inputs.items()}  # memory format kept
    references = conv_bench.pass_callables("cudnn", case.problem, exact)
    for side in ("ours", "cudnn"):
        calls = conv_bench.pass_callables(side, case.problem, inputs)
        for pass_name in conv_bench.PASSES:
            outputs, expected = calls[pass_name](), references[pass_name]()
            assert len(outputs) == {"fwd": 1, "fwd+bwd": 4}[pass_name]
            for what, output, reference in zip(("y", "dx", "dw", "db"), outputs, expected):
                assert output.dtype == inputs["x"].dtype and output.shape == reference.shape
                error = (output.double() - reference).abs().max().item()
                scale = reference.abs().max().item()
                assert error <= TOLERANCE[dtype] * scale, f"{side} {pass_name} {what}: {error:.3g} vs {scale:.3g}"
            if layout == "nhwc":
                assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    # a call leaves no gradient behind to accumulate into the next one
    assert inputs["x"].grad is None and not inputs["x"].requires_grad


def test_fwd_bwd_counts_three_convolutions():
    problem = _tiny_case("fp32", "nchw").problem
    ho, wo = 5, 6
    assert conv_bench.pass_flops(problem, "fwd") == 2 * 3 * ho * wo * 7 * 5 * 3 * 3
    assert conv_bench.pass_flops(problem, "fwd+bwd") == 3 * conv_bench.pass_flops(problem, "fwd")


def test_relative_difference_flags_mismatches():
    a = torch.tensor([1.0, -2.0])
    assert conv_bench.max_relative_difference((a,), (a.clone(),)) == 0.0
    assert conv_bench.max_relative_difference((a + torch.tensor([0.0, 0.2]),), (a,)) == pytest.approx(0.1)
    assert conv_bench.max_relative_difference((a,), (a, a)) == float("inf")
    assert conv_bench.max_relative_difference((torch.tensor([float("nan"), 0.0]),), (a,)) == float("inf")


def test_sweep_stores_each_case_skips_out_of_memory_and_keeps_its_work_on_ctrl_c(monkeypatch, capsys, tmp_path):
    """The sweep's bookkeeping, on the interpreter (its times are not looked at): a case that runs out of memory
    is noted and skipped, a measured case is stored at once, and Ctrl-C on the next leaves the run 'interrupted'
    with that case stored and its table printed."""
    (good,) = conv_bench.explicit_cases([conv_problem(1, 2, 4, 4, 3, 3, 3, make_geometry((3, 3), 1, 1), "fp32",
                                                      "nchw", "relu", True)], tf32=False)
    too_big = conv_bench.ConvBenchCase("huge", 224, dict(good.problem, n=4096))
    stopped = conv_bench.ConvBenchCase("stopped", 32, good.problem)
    measure_case = conv_bench.measure_case

    def injected_faults(case, device):
        if case.layer == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if case.layer == "stopped":
            raise KeyboardInterrupt
        return measure_case(case, device)

    monkeypatch.setattr(conv_bench, "measure_case", injected_faults)
    db_path = str(tmp_path / "bench.db")
    with pytest.raises(KeyboardInterrupt):
        conv_bench.run_sweep([too_big, good, stopped], db_path, tf32=False, progress=False)
    printed = capsys.readouterr().out.splitlines()
    header = printed.index(next(line for line in printed if line.startswith("layer")))
    assert printed[header].split() == ["layer", "conv", "batch", "input", "size", "dtype", "pass", "our", "time_ms",
                                       "cuDNN", "time_ms", "our", "TFLOP/s", "cuDNN", "TFLOP/s", "ratio", "max",
                                       "rel", "diff"]
    assert [line.split()[0] for line in printed[header + 2:header + 4]] == ["1,2,4,4,3"] * 2
    assert "TF32 off on both sides" in printed[header - 1]
    assert "note: 224/huge/n4096/fp32: out of GPU memory, skipped" in printed
    database = Database(db_path)
    (run,) = database.runs().itertuples()
    assert (run.kind, run.name, run.status, run.meta["cases"]) == ("bench", "conv2d", "interrupted", 3)
    rows = database.read("baselines", run.run_id)
    assert list(rows["pass"]) == ["fwd", "fwd+bwd"] and set(rows["kernel"]) == {"conv2d"}
    assert json.loads(rows["problem"][0]) == good.problem
    assert (rows["ratio"] == rows["baseline_time_ms"] / rows["time_ms"]).all()
    assert (rows["max_rel_diff"] < 1e-4).all()  # both sides computed the same thing before they were timed


def test_cli_on_cpu_says_it_needs_a_gpu_and_exits_0(capsys):
    assert main(["bench", "conv"]) == 0
    out = capsys.readouterr().out
    assert "needs a GPU" in out and f"{LAYERS * 12} case(s)" in out
    assert main(["bench", "conv", "--batch", "64", "--input-size", "32", "--dtype", "fp16"]) == 0
    assert f"({LAYERS} case(s)" in capsys.readouterr().out
    assert main(["bench", "conv", "--shapes", "2,8,9,9,16", "--dtype", "fp32"]) == 0
    assert "(1 case(s)" in capsys.readouterr().out
    assert Database().runs().empty  # nothing measured, nothing recorded
    assert main(["bench", "conv", "--shapes", "2,8,9,9,16", "--batch", "4"]) == 2
    assert main(["bench", "gemm", "--input-size", "32"]) == 2


def test_tf32_policy_sets_both_switches_and_cudnn_autotuning_then_restores_them():
    backends = torch.backends
    before = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark)
    for enabled in (False, True):
        with pytest.raises(KeyboardInterrupt), conv_bench.tf32_policy(enabled):
            assert (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark) == (
                enabled, enabled, True)
            raise KeyboardInterrupt
        assert (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark) == before
