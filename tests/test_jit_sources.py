"""Tuning keys: a kernel's source hash covers its own source and its @jit callees', nothing else."""

import importlib
import shutil
from pathlib import Path

import torch
from triton.runtime.jit import JITFunction

from triton_workbench.kernels import SPECS, jit_sources

TEMPLATE = Path(__file__).parent / "jit_sharing"
KERNELS = ("double_kernel", "double_offset_kernel", "plain_kernel")


def load(tmp_path, monkeypatch, variant: str, edits: dict[str, tuple[str, str]] | None = None):
    """A copy of tests/jit_sharing as package `<test>_<variant>`, with `edits` (file -> (old, new)) applied."""
    name = f"{tmp_path.name}_{variant}".replace("-", "_")
    package = tmp_path / name
    shutil.copytree(TEMPLATE, package, ignore=shutil.ignore_patterns("__pycache__"))
    for file, (old, new) in (edits or {}).items():
        text = (package / file).read_text()
        assert old in text, f"{old!r} not in {file}"
        (package / file).write_text(text.replace(old, new))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"{name}.kernels")


def hashes(module) -> dict[str, str]:
    return {kernel: jit_sources.source_hash(getattr(module, kernel)) for kernel in KERNELS}


def test_the_template_kernels_run(tmp_path, monkeypatch):
    module = load(tmp_path, monkeypatch, "run")
    x = torch.arange(8, dtype=torch.float32)
    out = torch.empty_like(x)
    module.double_offset_kernel[(1,)](x, out, 8, BLOCK=8)
    torch.testing.assert_close(out, x * 2 + 1)


def test_editing_a_shared_helper_changes_exactly_its_users(tmp_path, monkeypatch):
    before = hashes(load(tmp_path, monkeypatch, "v1"))
    after = hashes(load(tmp_path, monkeypatch, "v2", {"helpers.py": ("return x * 2.0", "return x + x")}))
    assert after["double_kernel"] != before["double_kernel"]
    assert after["double_offset_kernel"] != before["double_offset_kernel"]
    assert after["plain_kernel"] == before["plain_kernel"]
    assert len(set(before.values())) == 3


def test_line_shifts_and_unrelated_edits_change_nothing(tmp_path, monkeypatch):
    before = hashes(load(tmp_path, monkeypatch, "v1"))
    shifted = {
        "helpers.py": ("@jit\ndef twice",
                       "# a comment\n\n\n@jit\ndef unrelated(x):\n    return x\n\n\n@jit\ndef twice"),
        "kernels.py": ("OFFSET = tl.constexpr(1.0)\n", "\n\nOFFSET = tl.constexpr(1.0)\nOTHER = 5\n\n"),
    }
    assert hashes(load(tmp_path, monkeypatch, "shifted", shifted)) == before
    unused_edit = {"helpers.py": ("return x + 3.0", "return x - 3.0")}
    assert hashes(load(tmp_path, monkeypatch, "unused", unused_edit)) == before


def test_a_global_constexpr_counts_for_the_kernels_reading_it(tmp_path, monkeypatch):
    before = hashes(load(tmp_path, monkeypatch, "v1"))
    after = hashes(load(tmp_path, monkeypatch, "v2", {"kernels.py": ("tl.constexpr(1.0)", "tl.constexpr(2.0)")}))
    assert after["double_offset_kernel"] != before["double_offset_kernel"]
    assert after["double_kernel"] == before["double_kernel"]
    assert after["plain_kernel"] == before["plain_kernel"]
    (entry,) = [entry for entry in jit_sources.dependencies(load(tmp_path, monkeypatch, "v3").double_offset_kernel)
                if entry.constants]
    assert entry.constants == (("OFFSET", "1.0"),)


def test_compiled_and_interpreted_functions_hash_alike(tmp_path, monkeypatch):
    module = load(tmp_path, monkeypatch, "v1")
    compiled = JITFunction(module.double_kernel.fn)
    assert jit_sources.source_hash(compiled) == jit_sources.source_hash(module.double_kernel)
    assert [entry.name.rsplit(".", 1)[1] for entry in jit_sources.dependencies(compiled)] == ["double_kernel", "twice"]


def test_the_project_kernels_reach_their_helpers_across_modules():
    def names(spec):
        return {entry.name.rsplit(".", 1)[1] for entry in jit_sources.dependencies(SPECS[spec].kernel)}

    assert {"gemm_kernel", "tile_coordinates", "apply", "derivative", "_sigmoid", "_tanh"} <= names("gemm")
    assert {"activation_kernel", "apply", "derivative", "_sigmoid", "_tanh"} <= names("activation")
    assert "tile_coordinates" not in names("activation") and "gemm_kernel" not in names("activation")
    assert {"tile_coordinates", "apply"} <= names("conv_fwd")
    assert "apply" not in names("conv_dgrad")
    assert SPECS["gemm"].source_hash == jit_sources.source_hash(SPECS["gemm"].kernel)
