"""The source a kernel's tuned results depend on: the kernel's own and that of every @jit function it calls.

Triton's own cache key (`JITFunction.cache_key`, built by `DependenciesFinder` in triton/runtime/jit.py)
walks the same graph, but keys each function by its starting line number too, so an edit to any
function above a kernel changes the kernel's key. Here a function counts by its text alone: editing a
helper changes the key of exactly the kernels that reach it, and moving code around or editing a
function no kernel calls changes nothing.

Functions are followed by name (`helper(...)`) and through modules and classes (`activation.apply(...)`),
across modules. Triton's own library (`tl.cdiv`, `tl.swizzle2d`, ...) is not: its version is a key of
its own. Globals a function reads that hold a `tl.constexpr` or a plain scalar count by their value.
Works alike for Triton's `JITFunction` and its interpreter's `InterpretedFunction` (both keep the
Python function as `.fn`).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Iterator

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITCallable

_MISSING = object()
_SCALARS = (bool, int, float, str)


def is_jit(value: Any) -> bool:
    """Whether `value` is a Triton @jit function, compiled or interpreted."""
    return isinstance(value, (JITCallable, InterpretedFunction))


def _from_triton(value: Any) -> bool:
    module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None) or ""
    return module == "triton" or module.startswith("triton.")


def _python_function(kernel: Any) -> Any:
    return getattr(kernel, "fn", kernel)


@dataclass(frozen=True)
class JitSource:
    """One @jit function as the key sees it."""

    name: str  # module.qualname, for messages: not hashed, so moving a function between modules is free
    source: str  # its text, decorators included, dedented
    constants: tuple[tuple[str, str], ...]  # (global it reads, repr of its value), sorted
    calls: tuple[Any, ...]  # the project's @jit functions it references, in first-use order


def _local_names(tree: ast.AST) -> set[str]:
    names = {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    names.update(node.id for node in ast.walk(tree)
                 if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load))
    return names


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _references(function: Any, tree: ast.AST) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every global the function's body reads, attribute chains followed
    through modules and classes outside Triton."""
    namespace = {**function.__globals__, **inspect.getclosurevars(function).nonlocals}
    local = _local_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or not isinstance(node.ctx, ast.Load):
            continue
        parts = _dotted(node)
        if parts is None or parts[0] in local:
            continue
        value = namespace.get(parts[0], _MISSING)
        for attribute in parts[1:]:
            if not isinstance(value, (types.ModuleType, type)) or _from_triton(value):
                value = _MISSING
                break
            value = getattr(value, attribute, _MISSING)
        if value is not _MISSING:
            yield ".".join(parts), value


def describe(kernel: Any) -> JitSource:
    """The source, read constants and callees of one @jit function (or plain function)."""
    function = _python_function(kernel)
    source = textwrap.dedent(inspect.getsource(function))
    constants: dict[str, str] = {}
    calls: dict[int, Any] = {}
    for name, value in _references(function, ast.parse(source)):
        if is_jit(value):
            if not _from_triton(_python_function(value)):
                calls.setdefault(id(value), value)
        elif isinstance(value, tl.constexpr):
            constants[name] = repr(value.value)
        elif isinstance(value, _SCALARS):
            constants[name] = repr(value)
    return JitSource(f"{function.__module__}.{function.__qualname__}", source, tuple(sorted(constants.items())),
                     tuple(calls.values()))


def dependencies(kernel: Any) -> list[JitSource]:
    """The kernel and every project @jit function it reaches, transitively: the kernel first, then the
    others in the order they are first reached. Each function once, cycles allowed."""
    seen: set[int] = set()
    order: list[JitSource] = []
    pending = [kernel]
    while pending:
        current = pending.pop(0)
        key = id(_python_function(current))
        if key in seen:
            continue
        seen.add(key)
        described = describe(current)
        order.append(described)
        pending.extend(described.calls)
    return order


def source_hash(kernel: Any) -> str:
    """16 hex digits over the text and read constants of the kernel and its @jit dependencies: the
    kernel's own entry first, the others sorted by content, so neither line numbers, nor the
    functions' order in their files, nor the modules they live in count."""
    root, *others = dependencies(kernel)
    entries = [[root.source, root.constants]] + sorted([entry.source, entry.constants] for entry in others)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
