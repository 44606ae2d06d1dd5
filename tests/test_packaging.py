"""Packaging: the `triton_workbench` namespace as users get it.

- the kernels work whatever was imported before them (torch._dynamo and friends import triton first);
- importing the package changes no environment variable and leaves a user's own `@triton.jit` alone,
  while an explicit TRITON_INTERPRET is obeyed;
- the wheel holds `triton_workbench/...` only, ships its data, and installs into a fresh venv beside
  another distribution that owns the top-level name `kernels`;
- the declared dependencies are exactly the third-party modules the source imports.

Everything that depends on import order or on a fresh interpreter runs in a subprocess. The wheel test
builds offline (no build isolation, no index) and takes the heavy dependencies from this interpreter's
site-packages through a .pth file, so it runs in the normal suite (about 20 s; the file about 35 s).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]  # "triton_workbench.kernels": "kernels"
TOP_PACKAGES = sorted(name for name in PACKAGE_DIRS if name.count(".") == 1)
# distribution name -> top-level import name, where the two differ
IMPORT_NAMES = {"scikit-learn": "sklearn", "nvidia-ml-py": "pynvml"}


def declared_dependencies() -> dict[str, str]:
    """{distribution name: import name} of pyproject's [project] dependencies."""
    names = [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip()).group(0) for spec in PYPROJECT["project"]["dependencies"]]
    return {name: IMPORT_NAMES.get(name, name.lower().replace("-", "_").replace(".", "_")) for name in names}


def imported_names(source: str) -> set[str]:
    """Dotted names of every absolute import in `source`, including `importlib.import_module("x.y")` and
    `__import__("x")` with a literal name (`from a import b` counts as `a` and, for triton_workbench, `a.b`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "triton_workbench":
                found.update(f"triton_workbench.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.add(node.args[0].value)
    return found


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in `source` (see `imported_names`)."""
    return {name.split(".")[0] for name in imported_names(source)}


def package_sources(root: Path = ROOT) -> dict[Path, str]:
    """{source file: its path inside the installed package} for every .py file of the mapped folders."""
    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                inside = path.relative_to(root / folder).as_posix()
                files[path] = f"{package.replace('.', '/')}/{inside}"
    return files


def run_python(python: str | Path, code: str | list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run `code` (a script, or pieces each dedented on its own) with `python` from `cwd`, so that no
    checkout folder is importable by accident; fail with its output when it exits non-zero."""
    script = "\n".join(textwrap.dedent(part) for part in ([code] if isinstance(code, str) else code))
    result = subprocess.run([str(python), "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        pytest.fail(f"{python} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n"
                    f"--- stderr\n{result.stderr[-6000:]}", pytrace=False)
    return result.stdout


def subprocess_env(**changes: str | None) -> dict[str, str]:
    """This process's environment without what redirects imports or picks the interpreter, plus `changes`
    (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                             "TRITON_INTERPRET")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# every public op, forward and backward, against PyTorch on tiny tensors (runs after `import triton_workbench...`)
OPS_AGAINST_TORCH = """
import torch
import torch.nn.functional as F
from triton_workbench import kernels
from triton_workbench.kernels import runtime

device = runtime.default_device()
generator = torch.Generator().manual_seed(0)

def leaves(*shapes):
    return [torch.randn(*shape, generator=generator).to(device).requires_grad_(True) for shape in shapes]

def check(name, ours, want, inputs):
    torch.testing.assert_close(ours, want, msg=lambda m: f"{name} forward: {m}")
    grad = torch.randn(want.shape, generator=generator).to(device)
    for i, (got, expected) in enumerate(zip(torch.autograd.grad(ours, inputs, grad),
                                            torch.autograd.grad(want, inputs, grad))):
        torch.testing.assert_close(got, expected, msg=lambda m: f"{name} gradient {i}: {m}")
    print("ok", name)

x, w, b = leaves((1, 2, 5, 5), (3, 2, 3, 3), (3,))
check("conv2d", kernels.conv2d(x, w, b, stride=2, padding=1, activation="relu"),
      F.relu(F.conv2d(x, w, b, stride=2, padding=1)), (x, w, b))
x, w, b = leaves((2, 3, 4), (5, 4), (5,))
check("linear", kernels.linear(x, w, b, activation="gelu"), F.gelu(F.linear(x, w, b)), (x, w, b))
a, m = leaves((4, 3), (3, 5))
check("gemm", kernels.gemm(a, m, activation="leaky_relu", negative_slope=0.1), F.leaky_relu(a @ m, 0.1), (a, m))
(x,) = leaves((7,))
check("activation", kernels.activation(x, "silu"), F.silu(x), (x,))
"""


def test_ops_work_when_triton_and_dynamo_are_imported_first(tmp_path):
    code = ["""
    import sys
    import triton
    import torch._dynamo
    assert not any(name.startswith("triton_workbench") for name in sys.modules), "imported too early"
    """, OPS_AGAINST_TORCH]
    output = run_python(sys.executable, code, tmp_path, subprocess_env())
    assert output.split() == ["ok", "conv2d", "ok", "linear", "ok", "gemm", "ok", "activation"]


USER_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)
'''

# the project's @jit kernels and helpers: module-level values of triton_workbench.kernels' modules
PROJECT_KERNELS = """
import sys
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

def project_kernels():
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("triton_workbench.kernels"):
            for attribute, value in vars(module).items():
                if isinstance(value, (JITFunction, InterpretedFunction)) and value.fn.__module__ == name:
                    found[f"{name}.{attribute}"] = value
    assert len(found) >= 3, f"too few kernels found: {sorted(found)}"
    return found
"""


def test_import_sets_no_environment_and_leaves_user_jit_alone(tmp_path):
    (tmp_path / "user_kernels.py").write_text(USER_KERNEL)
    code = [f"""
    import importlib
    import os
    import pkgutil
    import sys
    before = dict(os.environ)  # before anything of ours, and before the dependencies they import
    assert not any(name.split(".")[0] in ("triton_workbench", "sklearn") for name in sys.modules), "imported too early"
    imported = []
    for top in {TOP_PACKAGES!r}:
        package = importlib.import_module(top)
        imported.append(top)
        for info in pkgutil.walk_packages(package.__path__, top + "."):
            if info.name.rpartition(".")[2] != "__main__":  # importing __main__ runs the CLI
                importlib.import_module(info.name)
                imported.append(info.name)
    changed = sorted(key for key in set(before) | set(os.environ) if before.get(key) != os.environ.get(key))
    assert not changed, f"importing triton_workbench changed environment variables {{changed}}"
    assert "TRITON_INTERPRET" not in os.environ
    # scikit-learn sets KMP_* variables when imported: only a search that fits its trees may import it
    assert "sklearn" not in sys.modules, "importing triton_workbench imported scikit-learn"
    print(len(imported), "modules")
    """, PROJECT_KERNELS, OPS_AGAINST_TORCH, """
    import triton.language as tl
    from triton_workbench.kernels.runtime import INTERPRETER
    assert INTERPRETER == (not torch.cuda.is_available())
    for name, kernel in project_kernels().items():
        assert isinstance(kernel, InterpretedFunction) == INTERPRETER, (name, type(kernel))
    assert type(tl.cdiv) is JITFunction, "triton.language's helpers were not restored after our kernels ran"

    from user_kernels import add_one  # a user's own kernel, defined after everything above
    assert isinstance(add_one, JITFunction) and not isinstance(add_one, InterpretedFunction), type(add_one)
    print("user kernel", type(add_one).__name__)
    """]
    output = run_python(sys.executable, code, tmp_path, subprocess_env(PYTHONPATH=str(tmp_path)))
    assert "user kernel JITFunction" in output
    assert int(output.split()[0]) > 20  # modules imported: the walk found the subpackages


@pytest.mark.parametrize("value", ["1", "0"])
def test_explicit_triton_interpret_is_obeyed(tmp_path, value):
    code = ["""
    import os
    import triton_workbench.kernels
    from triton_workbench.kernels import runtime
    """, PROJECT_KERNELS, f"""
    assert os.environ["TRITON_INTERPRET"] == {value!r}
    assert runtime.INTERPRETER is {value == "1"}
    for name, kernel in project_kernels().items():
        assert isinstance(kernel, InterpretedFunction) is {value == "1"}, (name, type(kernel))
        assert isinstance(kernel, JITFunction) is {value == "0"}, (name, type(kernel))
    print("obeyed")
    """]
    assert "obeyed" in run_python(sys.executable, code, tmp_path, subprocess_env(TRITON_INTERPRET=value))


def test_declared_dependencies_are_the_imported_ones():
    imported: dict[str, list[str]] = {}
    for path in package_sources():
        for name in imported_modules(path.read_text()):
            if name not in sys.stdlib_module_names and name != "triton_workbench":
                imported.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    declared = declared_dependencies()
    unused = sorted(dist for dist, name in declared.items() if name not in imported)
    undeclared = {name: files for name, files in sorted(imported.items()) if name not in declared.values()}
    assert not unused, f"declared in pyproject but imported nowhere in the package: {unused}"
    assert not undeclared, f"imported but not declared in pyproject's dependencies: {undeclared}"
    # the distribution -> import name mapping is the installed distributions' own
    owners = importlib.metadata.packages_distributions()
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    for dist, name in declared.items():
        if name in owners:
            assert normal(dist) in {normal(owner) for owner in owners[name]}, (dist, name, owners[name])


def test_every_imported_subpackage_is_mapped():
    """A folder the source imports as triton_workbench.X must be in pyproject's package-dir (and packages),
    or the installed package lacks it."""
    unmapped = {}
    for path in package_sources():
        for name in imported_names(path.read_text()):
            top = ".".join(name.split(".")[:2])
            if name.startswith("triton_workbench.") and top not in TOP_PACKAGES:
                unmapped.setdefault(top, []).append(path.relative_to(ROOT).as_posix())
    assert not unmapped, f"imported but not in pyproject's [tool.setuptools.package-dir]: {unmapped}"
    listed = set(PYPROJECT["tool"]["setuptools"].get("packages", []))
    assert set(TOP_PACKAGES) <= listed, f"in package-dir but not in packages: {sorted(set(TOP_PACKAGES) - listed)}"


def test_imported_modules_sees_every_form_of_import():
    source = """
import a.b, c as d
from e.f import g
from . import h
from .i import j
importlib.import_module("k.l")
import_module("m")
__import__("n")
importlib.import_module(".o", "p")
"""
    assert imported_modules(source) == {"a", "c", "e", "k", "m", "n"}


STANDIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "kernels-standin"
version = "1.0"

[tool.setuptools]
packages = ["kernels"]
"""


def copy_checkout(destination: Path) -> None:
    """The checkout's files as git sees them (tracked and new, not ignored: no venv, caches or build output)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def build_wheel(source: Path, dist: Path) -> Path:
    """The wheel of the project in `source`, built offline with this interpreter's setuptools."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--quiet", "--wheel-dir", str(dist), str(source)],
                            env=subprocess_env(), cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, f"pip wheel {source.name}:\n{result.stdout}\n{result.stderr}"
    name = tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"]
    (wheel,) = dist.glob(re.sub(r"[-_.]+", "_", name).lower() + "-*.whl")
    return wheel


def borrowed_paths() -> list[str]:
    """Where this interpreter finds its packages: its site-packages, the user's, and whatever else is on
    sys.path (added by a .pth file or PYTHONPATH), but no folder of the checkout outside a site-packages."""
    candidates = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else []), *sys.path]
    paths = []
    for entry in candidates:
        path = Path(entry or ".").resolve()
        if path.is_dir() and not (path.is_relative_to(ROOT) and "site-packages" not in path.parts):
            paths.append(str(path))
    return list(dict.fromkeys(paths))


def pip_in(python: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout (copies the files git lists)")
def test_wheel_installs_beside_another_kernels_distribution(tmp_path):
    # the wheel, from a copy of the checkout (its own build output and egg-info stay out of the checkout)
    source = tmp_path / "triton-workbench"
    copy_checkout(source)
    wheel = build_wheel(source, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"triton_workbench-{PYPROJECT['project']['version']}.dist-info/"
    outside = sorted(name for name in names if not name.startswith(("triton_workbench/", dist_info)))
    assert not outside, f"the wheel writes outside triton_workbench/: {outside}"
    missing = sorted(set(package_sources(source).values()) - set(names))
    assert not missing, f"modules left out of the wheel (pyproject's packages list?): {missing}"
    assert "triton_workbench/autotune/kernel_tuner_baseline.csv" in names
    assert "triton_workbench/profiler/README.md" in names

    # a distribution that owns the top-level name `kernels`, as Hugging Face's `kernels` does
    standin = tmp_path / "kernels-standin"
    (standin / "kernels").mkdir(parents=True)
    (standin / "pyproject.toml").write_text(STANDIN_PYPROJECT)
    (standin / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    standin_wheel = build_wheel(standin, tmp_path / "dist")

    # a fresh venv: both wheels installed; torch, triton, ... seen through a .pth line naming this
    # interpreter's site-packages (a path line adds the folder without running the .pth files in it, so the
    # editable triton_workbench of the checkout stays invisible)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    pip_in(python, "install", "--no-deps", "--no-index", "--quiet", str(wheel), str(standin_wheel))
    env = subprocess_env(PYTHONNOUSERSITE="1")
    site_packages = Path(run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                                    tmp_path, env).strip())
    (site_packages / "zz_borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed_paths()))

    code = f"""
    from pathlib import Path
    import kernels
    import torch
    import triton_workbench
    import triton_workbench.kernels
    from triton_workbench.kernels import runtime
    site_packages = Path({str(site_packages)!r}).resolve()
    assert kernels.get_kernel("relu") == "hub:relu"
    assert Path(kernels.__file__).resolve().parent == site_packages / "kernels"
    for path in (triton_workbench.kernels.__file__, *triton_workbench.__path__):
        assert Path(path).resolve().is_relative_to(site_packages / "triton_workbench"), path
    x = torch.linspace(-2.0, 2.0, 9, device=runtime.default_device())
    torch.testing.assert_close(triton_workbench.kernels.activation(x, "relu"), torch.relu(x))
    from triton_workbench.autotune.compare import kernel_tuner_baseline_csv, load_kernel_tuner_results
    assert Path(str(kernel_tuner_baseline_csv())).resolve().is_relative_to(site_packages / "triton_workbench")
    baseline = load_kernel_tuner_results()
    assert len(baseline) > 100 and baseline["strategy"].str.startswith("kt:").all()
    print("installed ok", len(baseline))
    """
    assert "installed ok" in run_python(python, code, tmp_path, env)
    help_text = subprocess.run([str(python.parent / "workbench"), "strategies", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "--kernel-tuner-csv" in help_text.stdout, help_text.stderr

    # removing the other `kernels` takes none of triton_workbench with it
    pip_in(python, "uninstall", "--yes", "--quiet", "kernels-standin")
    assert not (site_packages / "kernels").exists()
    code = """
    import torch
    from triton_workbench import kernels
    from triton_workbench.kernels import runtime
    x = torch.linspace(-2.0, 2.0, 9, device=runtime.default_device())
    torch.testing.assert_close(kernels.activation(x, "relu"), torch.relu(x))
    print("still ok")
    """
    assert "still ok" in run_python(python, code, tmp_path, env)
