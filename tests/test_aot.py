"""Ahead-of-time compilation for sm_80 and sm_90 without a GPU (spawned TRITON_INTERPRET=0 workers).

What is compiled is what a launch compiles: the specialisation of every kernel is checked against Triton's
own `JITFunction.run` on the op's real tensors (tests/launch_oracle.py). The full default spaces are
checked by `workbench check-compile KERNEL`; here a seeded sample plus the extremes of each space (largest
tiles, most stages, most warps) keep the test to a handful.
"""

import dataclasses
import random

import pytest

from triton_workbench import kernels
from triton_workbench.kernels import aot, hardware
from triton_workbench.kernels.aot import compile_space, default_space
from triton_workbench.kernels.conv_geometry import conv_problem, make_geometry
from triton_workbench.kernels.spec import canonical_json, problem_id
from triton_workbench.workbench.cli import main

ARCHS = (80, 90)


def _sample_and_extremes(spec, problem, size_keys):
    """Largest tile, most stages, most warps (and, for cheap kernels, a seeded sample), deduplicated."""
    space = default_space(spec, problem)
    tile = lambda c: [c[k] for k in size_keys]
    extremes = [max(space, key=lambda c: (_product(tile(c)), c["num_warps"], c.get("num_stages", 0))),
                max(space, key=lambda c: (c.get("num_stages", 0), _product(tile(c)))),
                max(space, key=lambda c: (c["num_warps"], _product(tile(c))))]
    chosen = extremes if len(size_keys) > 1 else extremes + random.Random(0).sample(space, 1)
    return [dict(c) for i, c in enumerate(chosen) if c not in chosen[:i]]


def _product(values):
    result = 1
    for value in values:
        result *= value
    return result


def _check_ok(frame, expected_rows):
    assert len(frame) == expected_rows
    failures = frame[~frame["ok"]]
    assert failures.empty, failures[["config", "arch", "reason"]].to_string()
    assert set(frame["arch"]) == set(ARCHS)
    for arch, shared in zip(frame["arch"], frame["shared_bytes"]):
        assert 0 <= shared <= hardware.architecture(arch).shared_bytes_per_block
    assert (frame["registers"] > 0).all() and (frame["registers"] <= 255).all()
    assert (frame["compile_time_s"] > 0).all()


def test_gemm_sample_and_extremes_compile_for_sm80_and_sm90():
    spec = kernels.SPECS["gemm"]
    fp32, fp16 = spec.example_problems[0], spec.example_problems[1]
    pairs = [(c, fp16) for c in _sample_and_extremes(spec, fp16, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))]
    pairs.append((random.Random(1).choice(default_space(spec, fp32)), fp32))  # the seeded sample
    bigger = dict(fp16, M=2 * fp16["M"], K=3 * fp16["K"])
    pairs.append((pairs[0][0], bigger))  # sizes divisible by 16 as before: the same compilation, compiled once
    frame = compile_space(spec, pairs, archs=ARCHS, workers=2, progress=False)
    _check_ok(frame, 2 * len(pairs))
    twins = frame[(frame["config"] == canonical_json(pairs[0][0]))
                  & frame["problem"].isin([problem_id(fp16), problem_id(bigger)])]
    assert len(twins) == 4 and (twins.groupby("arch")["compile_time_s"].nunique() == 1).all()  # compiled once
    same = frame[frame["problem"].str.contains("fp16")].groupby("arch")["shared_bytes"].max()
    assert (same > 0).all()  # the pipelined tiles live in shared memory


def test_activation_extremes_compile_and_a_broken_config_is_a_recorded_failure():
    spec = kernels.SPECS["activation"]
    problem = spec.example_problems[1]
    pairs = [(c, problem) for c in _sample_and_extremes(spec, problem, ("BLOCK_SIZE",))]
    broken = {"BLOCK_SIZE": 100, "num_warps": 4}  # not a power of two: tl.arange refuses it
    frame = compile_space(spec, [*pairs, (broken, problem)], archs=ARCHS, workers=2, progress=False)
    is_broken = frame["config"] == canonical_json(broken)
    _check_ok(frame[~is_broken], 2 * len(pairs))
    assert (~frame[is_broken]["ok"]).all() and frame[is_broken]["reason"].str.len().gt(0).all()


def test_check_compile_command(capsys):
    assert main(["check-compile", "activation", "--sample", "1", "--arch", "90", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 compilations of activation for sm_90" in out and "0 failed" in out
    assert main(["check-compile", "nonexistent"]) == 2
    assert "unknown kernel" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not registered"):
        compile_space(dataclasses.replace(kernels.SPECS["gemm"], name="copy"), [])


def _odd_problems():
    """Sizes and layouts that take divisibility and unit strides away: what the example problems do not show."""
    conv = conv_problem(3, 5, 9, 11, 7, 3, 2, make_geometry((3, 2), 2, 1), "fp32", "nchw", "leaky_relu", False)
    depthwise = conv_problem(3, 5, 9, 11, 10, 3, 2, make_geometry((3, 2), 2, 1, 1, 5), "fp16", "nchw", None, False)
    return {"gemm": [{"M": 100, "N": 30, "K": 7, "dtype": "bf16", "activation": None, "bias": False}],
            "activation": [{"numel": 1001, "dtype": "fp16", "activation": "silu", "backward": True}],
            "conv_fwd": [conv | {"tf32": False}], "conv_dgrad": [conv | {"tf32": True}],
            "conv_wgrad": [conv | {"tf32": False, "bias": True}],
            "depthwise_fwd": [depthwise | {"activation": "leaky_relu", "bias": True}],
            "depthwise_dgrad": [depthwise], "depthwise_wgrad": [depthwise | {"bias": True}]}


def test_ahead_of_time_specialisation_is_what_the_launch_compiles():
    """For each kernel, its example problems and odd ones, the default config and a seeded sample of the space,
    sm_80 and sm_90: the signature, constants, attributes and options `aot.specialise` derives (launcher on meta
    tensors) equal what Triton's `JITFunction.run` compiles when the op launches on real tensors, launch by
    launch (a strided dgrad launches once per stride phase)."""
    import launch_oracle

    odd = _odd_problems()
    cases = []
    for name, spec in kernels.SPECS.items():
        for index, problem in enumerate([*spec.example_problems, *odd[name]]):
            sample = random.Random(f"{name}-{index}").choice(default_space(spec, problem))
            for config in (spec.default_config(problem), sample):
                cases += [(name, problem, config, ARCHS[index % 2])]
    pool = aot.compile_pool(2)
    try:
        results = list(pool.map(launch_oracle.both, *zip(*cases)))
    finally:
        pool.shutdown()
    for case, (specialised, launched) in zip(cases, results):
        assert specialised == launched, case
    divisible = set()  # arguments some launch marks 16-divisible (pointers, sizes, strides)
    for launched in (launch for _, launches in results for launch in launches):
        names = list(launched["signature"])
        divisible |= {names[path[0]] for path, attrs in launched["attrs"].items() if attrs == [["tt.divisibility", 16]]}
    assert {"a_ptr", "M", "stride_am", "x_ptr", "n_elements", "sxn"} <= divisible
    (gemm_odd,) = results[[case[1] for case in cases].index(odd["gemm"][0])][1]
    names = list(gemm_odd["signature"])
    assert gemm_odd["attrs"][(names.index("N"),)] == []  # N = 30: no divisibility, as on the GPU
    assert gemm_odd["constexprs"][(names.index("stride_ak"),)] == 1  # a unit stride is a constant
