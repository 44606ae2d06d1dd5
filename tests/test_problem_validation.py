"""Problems are checked against their kernel's spec before anything is stored or run (issue 14, finding 3):
`workbench tune`, `tune-model`, `import` and `autotune.tune` share `KernelSpec.validate_problem`."""

import json

import pytest

from triton_workbench import kernels
from triton_workbench.autotune import TuningDatabase, TuningKey, tune
from triton_workbench.database import Database
from triton_workbench.kernels import GEMM_SPEC, runtime
from triton_workbench.kernels.errors import UsageError
from triton_workbench.kernels.spec import ProblemError
from triton_workbench.workbench.cli import main

FP32_GEMM = dict(next(p for p in GEMM_SPEC.example_problems if p["dtype"] == "fp32"))


def _nothing_stored() -> bool:
    db = TuningDatabase()
    return db.runs().empty and db.trials().empty and db.best_configs().empty


@pytest.mark.parametrize("spec", sorted(kernels.SPECS.values(), key=lambda spec: spec.name), ids=lambda spec: spec.name)
def test_every_spec_declares_its_problems(spec):
    assert spec.problem_schema is not None
    for problem in spec.example_problems:
        spec.validate_problem(problem, check_memory=False)
        with pytest.raises(ProblemError, match="unknown entry \"bogus\""):
            spec.validate_problem({**problem, "bogus": 5}, check_memory=False)
        with pytest.raises(ProblemError, match="dtype missing"):
            spec.validate_problem({k: v for k, v in problem.items() if k != "dtype"}, check_memory=False)
        with pytest.raises(ProblemError, match="dtype must be one of"):
            spec.validate_problem({**problem, "dtype": "fp64"}, check_memory=False)
        with pytest.raises(ProblemError, match="activation must be one of"):
            spec.validate_problem({**problem, "activation": "evil"}, check_memory=False)
        for key in spec.shape_keys:
            for bad in ("4", -4, 4.5, 1e40, True, None, 2**64):
                with pytest.raises(ProblemError, match=f"{key} must be an integer"):
                    spec.validate_problem({**problem, key: bad}, check_memory=False)


@pytest.mark.parametrize("change, words", [
    ({"backward": False}, "backward must be true or left out"),  # the kernels never write it false: no lookup matches
    ({"tf32": None}, "tf32 must be one of false, true"),
    ({"dtype": "fp16"}, "tf32 (true or false) is an entry of every fp32 problem and of no other"),
    ({"K": 0}, None),  # an empty sum is a problem the kernel runs
])
def test_gemm_problems_are_those_its_lookups_ask_for(change, words):
    problem = {**FP32_GEMM, "M": 8, "N": 8, "K": 8, **change}
    if words is None:
        GEMM_SPEC.validate_problem(problem)
    else:
        with pytest.raises(ProblemError, match=words.replace("(", r"\(").replace(")", r"\)")):
            GEMM_SPEC.validate_problem(problem)


def test_conv_problems_must_have_a_geometry_that_runs():
    spec = kernels.SPECS["conv_fwd"]
    problem = dict(spec.example_problems[1])
    for change, words in (({"groups": 3}, "groups \\(3\\) must divide"),
                          ({"h": 1, "w": 1, "padding": [0, 0, 0, 0]}, "output would be -1x-1"),
                          ({"stride": [1]}, "stride must be a list of 2"), ({"padding": [0, 0, -1, 0]}, "padding"),
                          ({"layout": "nwhc"}, "layout must be one of")):  # fmt: skip
        with pytest.raises(ProblemError, match=words):
            spec.validate_problem({**problem, **change})


def test_a_problem_larger_than_the_device_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(runtime, "device_memory", lambda: (10**9, "this test's device"))
    problem = {**FP32_GEMM, "M": 20000, "N": 20000, "K": 8}  # 1.6 GB of fp32
    with pytest.raises(ProblemError, match=r"M=20000, N=20000, K=8 needs 1.6 GB .* of this test's device"):
        GEMM_SPEC.validate_problem(problem)
    GEMM_SPEC.validate_problem(problem, check_memory=False)
    with pytest.raises(ProblemError, match="needs 1.6 GB"):
        tune(GEMM_SPEC, problem, budget=1, compile_ahead=False, progress=False)
    assert _nothing_stored()


@pytest.mark.parametrize("arguments, words", [
    (["--activation", "bogus"], 'activation must be one of null, "relu"'),
    (["--problem", '{"bogus": 5}'], 'unknown entry "bogus"'),
    (["--problem", '{"M": "4"}'], 'M must be an integer from 1 to'),
    (["--problem", '{"bias": 1}'], "bias must be one of false, true, got 1"),
    (["--problem", "[" * 100000 + "]" * 100000], "--problem is nested too deeply"),
    (["--shape", "12345678901234567890,4,4"], "M must be an integer from 1 to 9223372036854775807"),
    (["--shape", "1000000,1000000,1000000"], "gemm problem M=1000000, N=1000000, K=1000000 needs 1.2e+04 GB"),
])
def test_tune_refuses_a_bad_problem_before_storing_anything(arguments, words, capsys):
    base = ["--shape", "4,4,4"] if "--shape" not in arguments else []
    assert main(["tune", "gemm", *base, *arguments, "--budget", "1", "--no-compile-ahead"]) == 2
    error = capsys.readouterr().err
    assert words in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert _nothing_stored()


def test_the_python_api_refuses_a_bad_problem():
    with pytest.raises(ProblemError, match='unknown entry "bogus"') as raised:
        tune(GEMM_SPEC, {**FP32_GEMM, "bogus": 5}, budget=1, compile_ahead=False, progress=False)
    assert isinstance(raised.value, UsageError) and isinstance(raised.value, ValueError)
    assert _nothing_stored()


def test_tune_model_checks_every_problem_before_its_run_starts(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "device_memory", lambda: (1000, "this test's device"))
    arguments = ["tune-model", "--model", "convnet", "--input", "1,8,8", "--batch-size", "2", "--budget", "1",
                 "--no-compile-ahead", "--no-progress"]  # fmt: skip
    assert main(arguments) == 2
    assert "more than the 1e-06 GB of this test's device" in capsys.readouterr().err
    assert _nothing_stored()


def _document(entries: list[dict]) -> dict:
    return {"format": "triton-workbench best configs", "version": 1, "configs": entries}


def _entry(problem: dict) -> dict:
    key = TuningKey.of(GEMM_SPEC, {**FP32_GEMM, "M": 8, "N": 8, "K": 8})
    config = GEMM_SPEC.default_config({**FP32_GEMM, "M": 8, "N": 8, "K": 8})
    return {"kernel": "gemm", "source_hash": key.source_hash, "problem": problem, "device": key.device,
            "capability": key.capability, "triton_version": key.triton_version, "torch_version": key.torch_version,
            "config": config, "objective": "time", "value": 1.0, "time_ms": 1.0}  # fmt: skip


@pytest.mark.parametrize("change, words", [
    ({"problem": {"M": "4"}}, "M must be an integer"), ({"problem": {"M": -4}}, "M must be an integer"),
    ({"problem": {"M": 4.5}}, "M must be an integer"), ({"problem": {"M": 1e40}}, "M must be an integer"),
    ({"problem": {"activation": "evil"}}, "activation must be one of"),
    ({"problem": {"evil": 1}}, 'unknown entry "evil"'),
    ({"value": float("nan")}, "value must be a finite number"), ({"time_ms": float("inf")}, "time_ms must be a finite"),
    ({"value": -1.0}, "value must be a finite number >= 0"),
    ({"kernel": ["gemm"]}, "unknown kernel ['gemm']"),
    ({"config": {**GEMM_SPEC.default_config(FP32_GEMM), "BLOCK_M": 32.0}}, "BLOCK_M=32.0 is not a candidate"),
])
def test_import_refuses_problems_and_numbers_no_lookup_could_use(change, words, tmp_path, capsys):
    good = _entry({**FP32_GEMM, "M": 8, "N": 8, "K": 8})
    bad = {**good, **change}
    if "problem" in change:
        bad["problem"] = {**good["problem"], **change["problem"]}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(_document([good, bad])))
    assert main(["import", str(path)]) == 2
    error = capsys.readouterr().err
    assert words in error and "configs[1]" in error and str(path) in error and "Traceback" not in error
    assert TuningDatabase().best_configs().empty


def test_import_takes_a_problem_larger_than_this_device(monkeypatch, tmp_path):
    # a file may come from a larger GPU: its configs are stored for that problem, not run here
    monkeypatch.setattr(runtime, "device_memory", lambda: (1000, "this test's device"))
    path = tmp_path / "best.json"
    path.write_text(json.dumps(_document([_entry({**FP32_GEMM, "M": 4096, "N": 4096, "K": 4096})])))
    assert main(["import", str(path)]) == 0
    assert len(TuningDatabase().best_configs()) == 1
    assert Database().runs().empty
