"""Packaging contracts: import isolation, typed package, the README's commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nearid_reward

ROOT = Path(__file__).resolve().parents[1]


def test_import_pulls_in_no_trainer_integration_or_heavy_optional_dependency() -> None:
    code = (
        "import sys, nearid_reward, nearid_reward.testing, nearid_reward.cli.score\n"
        "bad = [m for m in ('train_head', 'integrations', 'diffusers', 'accelerate', 'datasets', 'peft') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_package_is_typed_and_versioned() -> None:
    assert (Path(nearid_reward.__file__).parent / "py.typed").is_file()
    assert nearid_reward.__version__.count(".") == 2


def test_readme_starts_with_the_two_commands() -> None:
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:8]]
    assert any(line.startswith("make demo") for line in lines)
    assert any(line.startswith("make test") for line in lines)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_test_named_in_the_reliability_table_exists() -> None:
    import ast
    import re

    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = re.findall(r"`((?:\w+/)?test_\w+\.py)(?:::(test_\w+))?`", text)
    assert len(named) >= 7
    for file, test in named:
        path = ROOT / "tests" / file
        assert path.is_file(), file
        if test:
            defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(n, ast.FunctionDef)}
            assert test in defined, f"{file}::{test}"


def test_no_code_of_the_project_unpickles() -> None:
    """Every ``torch.load`` of the project passes ``weights_only=True``, and nothing registers objects with
    accelerate for checkpointing (accelerate reads those back with ``weights_only=False``)."""
    import re

    for package in ("nearid_reward", "train_head", "integrations", "examples", "nearid_world", "benchmarks"):
        for file in sorted((ROOT / package).rglob("*.py")):
            text = file.read_text(encoding="utf-8")
            assert "register_for_checkpointing(" not in text, file
            for match in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
                assert "weights_only=True" in match["args"], f"{file}: torch.load({match['args']})"
            assert not re.search(r"\bpickle\.loads?\(", text), file


def test_plots_have_their_own_extra() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("matplotlib") for req in extras["plot"])
    assert not any(req.startswith("matplotlib") for req in extras["diffusers"] + extras["train"])


def test_docstring_examples_run_with_the_tests() -> None:
    import tomllib

    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "nearid_reward" in pytest_options["testpaths"] and "--doctest-modules" in pytest_options["addopts"]
    # the public objects show an example that runs, not only skipped ones
    for module in ("reward", "validation", "references", "metrics", "model"):
        text = (ROOT / "nearid_reward" / f"{module}.py").read_text()
        assert any(">>>" in line and "doctest: +SKIP" not in line for line in text.splitlines()), module


def test_renamed_modules_keep_a_deprecated_alias() -> None:
    import importlib

    import nearid_reward.files as files
    import nearid_reward.rendering as rendering
    import nearid_reward.testing.pipelines as pipelines
    import nearid_reward.weight_formats as weight_formats

    for old, new in [("nearid_reward.checkpoint", weight_formats), ("nearid_reward.testing_diffusers", pipelines),
                     ("nearid_reward.io", files)]:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new.__name__):
            alias = importlib.import_module(old)
        assert all(getattr(alias, name) is getattr(new, name) for name in new.__all__)
    sys.modules.pop("nearid_reward.io")
    with pytest.warns(DeprecationWarning, match="nearid_reward.files"):
        from nearid_reward.io import atomic_write  # the spelling of code written against the old name
    assert atomic_write is files.atomic_write
    assert sorted(alias.__all__) == sorted(files.__all__)
    with pytest.warns(DeprecationWarning, match="quiet_eval_mode"):
        assert rendering.inference_mode is rendering.quiet_eval_mode
    assert not (ROOT / "nearid_reward" / "io.py").exists()  # no module named like the standard library's


def test_pipeline_builders_name_the_extra_when_diffusers_is_missing() -> None:
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import nearid_reward.testing as t; assert callable(t.save_tiny_nearid)\n"
            "try:\n    import nearid_reward.testing.pipelines\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "nearid-reward[diffusers]" in out and "nearid_reward.testing.pipelines" in out


def _project_imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (top level, TYPE_CHECKING or functions)."""
    import ast

    modules: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for file in (ROOT / package).rglob("*.py"):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    graph: dict[str, set[str]] = {}
    for name, (file, is_package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_the_library_or_the_trainer_imports_in_a_cycle() -> None:
    graph = _project_imports(("nearid_reward", "train_head"))
    assert "train_head.cache" in graph and "nearid_reward.preprocess" in graph["train_head.cache"]
    assert _cycles(graph) == []
    # the check itself finds a cycle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
