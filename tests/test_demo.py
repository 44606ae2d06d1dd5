"""The demo's plan: every step is a valid `workbench` command line, for both sizes."""

import pytest

from triton_workbench.kernels import runtime
from triton_workbench.workbench.cli import build_parser
from triton_workbench.workbench.demo import SIZES, pick_size, steps


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_step_parses_as_a_workbench_command_against_the_demo_database(size, tmp_path):
    plan = steps(SIZES[size], tmp_path, tmp_path / "workbench.db", landscapes=tmp_path)
    parser = build_parser()
    commands = []
    for title, arguments in plan:
        parsed = parser.parse_args(arguments)  # argparse exits on a bad step
        assert parsed.db in (str(tmp_path / "workbench.db"), tmp_path / "workbench.db"), title
        commands.append(parsed.command)
    assert commands[:3] == ["tune", "tune", "tune-model"] and commands.count("train") == 2
    assert commands[-2:] == ["strategies", "report"]
    benches = [arguments[1] for _, arguments in plan if arguments[0] == "bench"]
    assert "model" in benches  # the fused-against-eager traffic count runs everywhere (shapes only)
    assert ("gemm" in benches) == SIZES[size].benchmark


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_tune_step_tunes_a_problem_its_kernel_looks_up(size, tmp_path):
    from triton_workbench.workbench.commands.tune import build_problem, spec_for

    parser = build_parser()
    for _, arguments in steps(SIZES[size], tmp_path, tmp_path / "workbench.db", landscapes=tmp_path):
        parsed = parser.parse_args(arguments)
        if parsed.command == "tune":  # build_problem validates it against the kernel's spec
            build_problem(spec_for(parsed.kernel), parsed.shape, parsed.dtype, parsed.activation, parsed.problem)


def test_without_landscapes_the_strategy_step_is_left_out(tmp_path):
    commands = [arguments[0] for _, arguments in steps(SIZES["cpu"], tmp_path, tmp_path / "db", landscapes=None)]
    assert "strategies" not in commands and commands[-1] == "report"


def test_size_follows_the_machine_and_a_bad_size_names_the_argument():
    assert pick_size("auto") == ("cpu" if runtime.INTERPRETER else "gpu")
    assert pick_size("gpu") == "gpu"
    with pytest.raises(ValueError, match="size"):
        pick_size("huge")
