"""`KernelSpec`: everything the autotuner, the compile checker and the ops need to know of a kernel.

A *problem* is a JSON-serialisable dict that fixes one launch: shapes, dtype names ("fp32",
"fp16", "bf16"), layout, activation. A *config* is a dict of the kernel's tunable parameters
(block sizes, num_warps, num_stages, ...).

Each spec declares the entries its problems have (`problem_schema`: `size`, `ints`, `choice`, `flag`)
and the rules across them (`problem_rules`); `KernelSpec.validate_problem` checks a problem against
them, and against the device's memory, before anything is stored or run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from triton_workbench.kernels import jit_sources, runtime
from triton_workbench.kernels.errors import UsageError

Config = dict[str, int]
Problem = dict[str, Any]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT64_MAX = 2**63 - 1  # the largest size a tensor can have
INT32_MAX = 2**31 - 1  # kernel arguments such as strides and paddings are 32-bit


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


class ProblemError(UsageError):
    """A problem its kernel cannot run: an entry unknown, missing, of the wrong type or out of range, or tensors
    too large for the device. The message names the entry (or the size)."""


@dataclass(frozen=True)
class Entry:
    """What one problem entry may hold: one of `choices`, else an int from `minimum` to `maximum` (a list of
    `length` of them when `length` is set). A bool is never taken for an int, nor 1 for True."""

    choices: tuple[Any, ...] = ()
    minimum: int = 0
    maximum: int = INT64_MAX
    length: int = 0
    required: bool = True  # must be present (else it may be left out)

    def why_not(self, value: Any) -> str:
        """'' when `value` may stand here, else what it should be."""
        if self.choices:
            if any(type(value) is type(choice) and value == choice for choice in self.choices):
                return ""
            allowed = ", ".join(json.dumps(choice) for choice in self.choices)
            allowed = f"one of {allowed}" if len(self.choices) > 1 else allowed
            return allowed if self.required else f"{allowed} or left out"

        def fits(v: Any) -> bool:
            return type(v) is int and self.minimum <= v <= self.maximum

        if not self.length:
            return "" if fits(value) else f"an integer from {self.minimum} to {self.maximum}"
        if isinstance(value, list) and len(value) == self.length and all(map(fits, value)):
            return ""
        return f"a list of {self.length} integers from {self.minimum} to {self.maximum}"


def size(minimum: int = 1) -> Entry:
    """A problem entry that is a size (an int >= minimum)."""
    return Entry(minimum=minimum)


def ints(length: int, minimum: int) -> Entry:
    """A list of `length` 32-bit ints >= minimum (strides, paddings, dilations)."""
    return Entry(minimum=minimum, maximum=INT32_MAX, length=length)


def choice(*values: Any, required: bool = True) -> Entry:
    """One of `values` (None included when it is one)."""
    return Entry(choices=values, required=required)


def flag(required: bool = True) -> Entry:
    return choice(False, True, required=required)


DTYPE_ENTRY = choice(*DTYPES)


def tf32_with_fp32(problem: Problem) -> str:
    """A problem rule: fp32 problems say whether TF32 is on ("tf32"), and no other problem does."""
    if (problem["dtype"] == "fp32") != ("tf32" in problem):
        return "tf32 (true or false) is an entry of every fp32 problem and of no other"
    return ""


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    grid: Callable[[Problem, Config], tuple[int, ...]]
    baseline: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # PyTorch's own op, unfused
    example_problems: Sequence[Problem] = field(default_factory=tuple)  # one per dtype, for compile checks
    shape_keys: Sequence[str] = field(default_factory=tuple)  # problem entries that are sizes (bucketed)
    problem_schema: Mapping[str, Entry] | None = None  # every entry a problem may have (None: not checked)
    problem_rules: Sequence[Callable[[Problem], str]] = ()  # checks across entries: '' or why a problem is invalid

    def is_valid(self, config: Config, problem: Problem) -> bool:
        return all(constraint(config, problem) for constraint in self.constraints)

    def validate_problem(self, problem: Any, check_memory: bool = True) -> None:
        """Raise ProblemError unless this kernel can run `problem` and its lookups can find it: exactly the
        entries of `problem_schema`, each of its type and range, every one of `problem_rules` met, and (when
        `check_memory`) its tensors (`bytes`) fitting the device's memory (`runtime.device_memory`).

        `autotune.tune`, `workbench tune`, `tune-model` and `import` call it before anything is stored or run.
        """
        if not isinstance(problem, dict):
            raise ProblemError(f"a {self.name} problem must be a JSON object, got {_shown(problem)}")
        schema = self.problem_schema
        if schema is not None:
            unknown = [key for key in problem if key not in schema]
            if unknown:
                raise ProblemError(f"{self.name} problem: unknown entr{'ies' if len(unknown) > 1 else 'y'} "
                                   f"{', '.join(map(_shown, unknown))} (its entries are {', '.join(schema)})")
            missing = [key for key, entry in schema.items() if entry.required and key not in problem]
            if missing:
                raise ProblemError(f"{self.name} problem: {', '.join(missing)} missing")
            for key, value in problem.items():
                why = schema[key].why_not(value)
                if why:
                    raise ProblemError(f"{self.name} problem: {key} must be {why}, got {_shown(value)}")
            for rule in self.problem_rules:
                why = rule(problem)
                if why:
                    raise ProblemError(f"{self.name} problem: {why}")
        if check_memory:
            self._check_memory(problem)

    def _check_memory(self, problem: Problem) -> None:
        try:
            needed = self.bytes(problem)
        except (KeyError, TypeError, ValueError) as error:  # a spec without a schema, given a problem not its own
            raise ProblemError(f"{self.name} problem {_shown(problem)} does not fit the kernel "
                               f"({type(error).__name__}: {error})") from None
        capacity, where = runtime.device_memory()
        if capacity is not None and needed > capacity:
            shape = ", ".join(f"{key}={problem[key]}" for key in self.shape_keys if key in problem)
            raise ProblemError(f"{self.name} problem {shape or _shown(problem)} needs {needed / 1e9:.3g} GB for its "
                               f"tensors ({needed} bytes), more than the {capacity / 1e9:.3g} GB of {where}")

    def tolerance(self, problem: Problem) -> float:
        """Relative error (max-abs error over max-abs reference) allowed for the problem's dtype."""
        return {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}[problem.get("dtype", "fp32")]

    @functools.cached_property
    def source_hash(self) -> str:
        """Hash of the kernel's source and of every @jit function it calls, transitively (see
        `jit_sources`): tuned results are keyed by it. Read once per process, so editing a file during a
        sweep cannot change the sweep's key halfway."""
        return jit_sources.source_hash(self.kernel)
