"""The one hook between the kernels and tuned configs: `kernels.tuned` sources and observers, and the seams around it."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_workbench import kernels
from triton_workbench.autotune import DatabaseConfigSource, TuningDatabase, tune
from triton_workbench.kernels import tuned
from triton_workbench.kernels.activation import ACTIVATION_SPEC
from triton_workbench.kernels.spec import problem_id
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.model_problems import recording_launches

activation_module = importlib.import_module("triton_workbench.kernels.activation")  # kernels.activation is the op
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "database", "autotune", "profiler", "reports", "workbench")
TUNED = {"BLOCK_SIZE": 128, "num_warps": 1}  # valid for 300 elements, and not the default (512, 4)


def _problem(numel: int = 300) -> dict:
    return {"numel": numel, "dtype": "fp32", "activation": "relu", "backward": False}


class _RecordingKernel:
    """Stands in for a @triton.jit kernel: notes the meta-parameters of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.launches.append({"BLOCK_SIZE": kwargs["BLOCK_SIZE"], "num_warps": kwargs["num_warps"]})
            return launch(*args, **kwargs)

        return record


def test_the_op_launches_with_the_config_the_installed_source_returns(monkeypatch):
    asked, observed = [], []

    def source(spec, problem):
        asked.append((spec.name, problem_id(problem)))
        return dict(TUNED) if spec is ACTIVATION_SPEC else None

    recording = _RecordingKernel(activation_module.activation_kernel)
    monkeypatch.setattr(activation_module, "activation_kernel", recording)
    x = torch.randn(300)
    assert ACTIVATION_SPEC.default_config(_problem()) != TUNED
    kernels.activation(x, "relu")
    assert recording.launches == [{"BLOCK_SIZE": 512, "num_warps": 4}]  # nothing installed: the default

    assert tuned.install_config_source(source) is None
    with tuned.observing(lambda spec, problem, config: observed.append((spec.name, problem, config))):
        result = kernels.activation(x, "relu")
        kernels.activation(x, "relu")
    assert recording.launches[1:] == [TUNED, TUNED]
    assert observed == [("activation", _problem(), TUNED)] * 2
    assert asked == [("activation", problem_id(_problem()))]  # asked once, then cached
    torch.testing.assert_close(result, torch.relu(x))
    kernels.activation(x, "relu")
    assert len(observed) == 2  # observers see lookups only inside their block


def test_invalid_or_failing_sources_give_the_default_and_installing_forgets_cached_answers(caplog):
    default = ACTIVATION_SPEC.default_config(_problem())
    tuned.install_config_source(lambda spec, problem: {"BLOCK_SIZE": 8192, "num_warps": 1})  # breaks a constraint
    assert tuned.config_for(ACTIVATION_SPEC, _problem()) == default

    def broken(spec, problem):
        raise RuntimeError("the database went away")

    previous = tuned.install_config_source(broken)
    assert previous is not None and tuned.config_source() is broken
    with caplog.at_level("WARNING", logger="triton_workbench.kernels"):
        assert tuned.config_for(ACTIVATION_SPEC, _problem()) == default
    assert "the database went away" in caplog.text
    tuned.install_config_source(lambda spec, problem: dict(TUNED))
    assert tuned.config_for(ACTIVATION_SPEC, _problem()) == TUNED  # not the cached default of the source before
    assert tuned.install_config_source(None) is not None and tuned.config_for(ACTIVATION_SPEC, _problem()) == default
    with pytest.raises(TypeError, match="source"):
        tuned.install_config_source("workbench.db")
    with pytest.raises(TypeError, match="observer"):
        with tuned.observing(None):
            pass


def test_model_problems_records_through_the_observer_without_replacing_config_for():
    original = tuned.config_for
    tuned.install_config_source(lambda spec, problem: dict(TUNED))
    also_seen = []
    with tuned.observing(lambda spec, problem, config: also_seen.append(config)):
        with recording_launches() as seen:
            assert tuned.config_for is original
            kernels.activation(torch.randn(300), "relu")
            kernels.activation(torch.randn(300), "relu")
            kernels.activation(torch.randn(7), "gelu")
    assert tuned.config_for is original
    assert seen[("activation", problem_id(_problem()))].calls == 2
    assert seen[("activation", problem_id({**_problem(7), "activation": "gelu"}))].calls == 1
    assert also_seen == [TUNED] * 3  # observers nest: both saw every launch


def test_the_cli_installs_its_database_and_tune_the_one_it_stored_into(tmp_path):
    from tiny_spec import SPEC

    target = tmp_path / "elsewhere.db"
    TuningDatabase(target).runs()  # export refuses a --db that does not exist
    assert main(["export", "-o", str(tmp_path / "best.json"), "--db", str(target)]) == 0
    assert tuned.config_source() == DatabaseConfigSource(target)
    assert main(["export", "-o", str(tmp_path / "best.json")]) == 0
    assert tuned.config_source() == DatabaseConfigSource(TuningDatabase().path)  # $WORKBENCH_DB

    tuned.install_config_source(None)
    database = TuningDatabase(tmp_path / "library.db")  # a library user's tune(), not the default database
    tune(SPEC, {"n": 37, "dtype": "fp32"}, strategy="exhaustive", budget=1, db=database, progress=False,
         interpreter_reps=1)  # fmt: skip
    assert tuned.config_source() == DatabaseConfigSource(database.path)
    assert tuned.config_for(SPEC, {"n": 37, "dtype": "fp32"}) == database.lookup_best(SPEC, {"n": 37, "dtype": "fp32"})


def test_importing_the_packages_installs_nothing():
    code = ("from triton_workbench import kernels, database, autotune, profiler, reports\n"
            "from triton_workbench.workbench import cli, model_problems, demo\n"
            "from triton_workbench.kernels import tuned\n"
            "assert tuned.config_source() is None, tuned.config_source()\n")  # fmt: skip
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("kernels", ("database", "autotune", "profiler", "reports", "workbench")),
    ("database", ("autotune", "profiler", "reports", "workbench")),
    ("autotune", ("profiler", "reports", "workbench")),
    ("profiler", ("autotune", "reports", "workbench")),
])  # fmt: skip
def test_imports_point_one_way(package, forbidden):
    wrong = {f"{path.relative_to(ROOT)}: {module}" for path in (ROOT / package).rglob("*.py")
             for module in _imported_modules(path)
             if any(module == f"triton_workbench.{p}" or module.startswith(f"triton_workbench.{p}.") for p in forbidden)}
    assert not wrong, sorted(wrong)
    assert not {m for m in _imported_modules(ROOT / "kernels" / "tuned.py") if "autotune" in m}


def test_no_mock_in_production_code():
    found = [f"{path.relative_to(ROOT)}:{number}" for package in PACKAGES for path in (ROOT / package).rglob("*")
             if path.is_file() and path.suffix in (".py", ".md")
             for number, line in enumerate(path.read_text().splitlines(), 1) if "mock" in line]
    assert not found, found
