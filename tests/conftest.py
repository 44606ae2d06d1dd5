"""Shared fixtures: the tests pick the device (CUDA where present, else CPU + interpreter)."""

import pytest
import torch

from triton_workbench.kernels import runtime, tuned


@pytest.fixture
def device() -> torch.device:
    return runtime.default_device()


@pytest.fixture
def on_kernel_device():
    """Tensors and modules the test makes without naming a device go where the kernels run: CUDA on a GPU
    machine, the CPU (interpreter) elsewhere."""
    with torch.device(runtime.default_device()):
        yield


@pytest.fixture(autouse=True)
def _isolated_database(tmp_path, monkeypatch):
    """Every test gets its own workbench database, never the user's, and starts with no config source
    installed: one that a test installed (the CLI and `tune` do) must not serve the next test."""
    monkeypatch.setenv("WORKBENCH_DB", str(tmp_path / "workbench.db"))
    tuned.install_config_source(None)
    yield
    tuned.install_config_source(None)
