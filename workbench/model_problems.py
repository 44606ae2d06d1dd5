"""Every kernel problem a model runs: one real training step (forward and backward) with the kernels swapped in.

Each launch of a Triton kernel asks `kernels.tuned.config_for(spec, problem)` which config to use;
that question names exactly the spec and problem a tuned config must be stored for. Observing the
questions during a step (`kernels.tuned.observing`) therefore captures every conv (forward, dgrad,
wgrad), GEMM and activation problem, forward and backward, in the form `autotune.tune` takes and
the kernels look up afterwards. Modules the kernels leave to PyTorch are reported, not recorded.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from triton_workbench.kernels import tuned
from triton_workbench.kernels.spec import Config, KernelSpec, Problem, problem_id
from triton_workbench.workbench.train_kernels import swap_kernels


_TRIVIAL = {"dilation": [1, 1], "groups": 1, "layout": "nchw"}  # values not worth a column's width


@dataclass
class ModelProblem:
    """One distinct kernel problem of a model and how often one step launches it."""

    spec: KernelSpec
    problem: Problem
    calls: int

    @property
    def kernel(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        """The problem as short `key=value` pairs: unset flags dropped, uniform lists collapsed ([1, 1] -> 1)."""
        parts = []
        for key, value in self.problem.items():
            if value is None or value is False or (key in _TRIVIAL and value == _TRIVIAL[key]):
                continue
            if isinstance(value, list) and len(set(value)) == 1:
                value = value[0]
            parts.append(key if value is True else f"{key}={value}")
        return " ".join(parts)


@dataclass
class ModelProblems:
    problems: list[ModelProblem]
    left_to_torch: list[str]  # compute layers the kernels did not take over (nothing to tune for them)


@contextmanager
def recording_launches() -> Iterator[dict[tuple[str, str], ModelProblem]]:
    """Record every (spec, problem) the kernels look a config up for while the block runs (every
    kernel launch calls `tuned.config_for`, which shows each lookup to the observers of `tuned.observing`)."""
    seen: dict[tuple[str, str], ModelProblem] = {}

    def record(spec: KernelSpec, problem: Problem, config: Config) -> None:
        key = (spec.name, problem_id(problem))
        if key in seen:
            seen[key].calls += 1
        else:
            seen[key] = ModelProblem(spec, dict(problem), 1)

    with tuned.observing(record):
        yield seen


def record_model_problems(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> ModelProblems:
    """Swap the kernels into `model`, run one forward and backward on random data, and return its problems.

    input_shape: (batch, channels, height, width). The model's parameters are not updated.
    """
    if len(input_shape) != 4 or any(not isinstance(size, int) or size < 1 for size in input_shape):
        raise ValueError(f"input_shape must be 4 positive ints (batch, channels, height, width), got {input_shape}")
    model, left_to_torch = swap_kernels(model)
    model.train()
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(input_shape, generator=generator).to(parameter.device)
    labels = torch.randint(0, num_classes, (input_shape[0],), generator=generator).to(parameter.device)
    with recording_launches() as seen:
        F.cross_entropy(model(inputs), labels).backward()
    model.zero_grad(set_to_none=True)
    return ModelProblems(list(seen.values()), left_to_torch)
