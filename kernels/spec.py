"""`KernelSpec`: everything the autotuner, the compile checker and the ops need to know of a kernel.

A *problem* is a JSON-serialisable dict that fixes one launch: shapes, dtype names ("fp32",
"fp16", "bf16"), layout, activation. A *config* is a dict of the kernel's tunable parameters
(block sizes, num_warps, num_stages, ...).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from triton_workbench.kernels import jit_sources

Config = dict[str, int]
Problem = dict[str, Any]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_POINTER_TYPES: dict[str, str] = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ("fp32", "fp16", "bf16") of a supported floating dtype."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise TypeError(f"dtype {dtype} is not supported: expected one of {', '.join(map(str, DTYPES.values()))}")


def canonical_json(value: Mapping[str, Any]) -> str:
    """One string per mapping whatever its key order: how problems and configs are keyed and stored."""
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))


def problem_id(problem: Problem) -> str:
    """A canonical string for a problem (the database key)."""
    return canonical_json(problem)


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """A tunable Triton kernel: its parameters and how to build, run, check and count a problem.

    Specs compare and hash by identity: each kernel has one, and lookups are cached per spec.
    """

    name: str
    kernel: Any  # the @triton.jit function that is tuned and compiled ahead of time
    params: Mapping[str, Sequence[int]]  # tunable parameter -> candidate values, in order
    constraints: Sequence[Callable[[Config, Problem], bool]]  # a config is valid if all hold
    default_config: Callable[[Problem], Config]  # the heuristic used when nothing is tuned
    make_inputs: Callable[[Problem, torch.device], dict[str, torch.Tensor]]
    launch: Callable[[dict[str, torch.Tensor], Config], torch.Tensor]  # run with a config
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # PyTorch result in float64
    flops: Callable[[Problem], int]
    bytes: Callable[[Problem], int]  # minimum bytes moved to and from memory
    aot_signature: Callable[[Problem, Config], tuple[dict[str, str], dict[str, Any]]]  # for triton.compile
    grid: Callable[[Problem, Config], tuple[int, ...]]
    baseline: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # PyTorch's own op, unfused
    example_problems: Sequence[Problem] = field(default_factory=tuple)  # one per dtype, for compile checks
    shape_keys: Sequence[str] = field(default_factory=tuple)  # problem entries that are sizes (bucketed)

    def is_valid(self, config: Config, problem: Problem) -> bool:
        return all(constraint(config, problem) for constraint in self.constraints)

    def tolerance(self, problem: Problem) -> float:
        """Relative error (max-abs error over max-abs reference) allowed for the problem's dtype."""
        return {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}[problem.get("dtype", "fp32")]

    @functools.cached_property
    def source_hash(self) -> str:
        """Hash of the kernel's source and of every @jit function it calls, transitively (see
        `jit_sources`): tuned results are keyed by it. Read once per process, so editing a file during a
        sweep cannot change the sweep's key halfway."""
        return jit_sources.source_hash(self.kernel)
