"""The layout of tasks/ (docs/ARCHITECTURE.md): stages import downwards only, no cycles inside a
package, and no module uses another package's private names. import-linter checks the first two
with the contracts in pyproject.toml; the last is checked here on the code's syntax tree."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's `tasks`, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_an_import_upwards_or_a_cycle_breaks_them(tmp_path: Path) -> None:
    """The check is not decoration: a copy with an upward import (core -> pipeline) and a cycle
    inside one package (convert.read -> convert.write -> convert.read) fails, naming both."""
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "tasks" / "core" / "arch.py").open("a") as f:
        f.write("\nfrom tasks import pipeline  # noqa: E402, F401\n")
    with (tmp_path / "tasks" / "convert" / "read.py").open("a") as f:
        f.write("\nfrom tasks.convert import write  # noqa: E402, F401\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert "tasks.core is not allowed to import tasks.pipeline" in done.stdout
    assert "tasks.core.arch -> tasks.pipeline" in done.stdout
    assert "No cycles are allowed in tasks.convert" in done.stdout
    assert ".read -> .write" in done.stdout


def _package_of(module: str) -> str:
    """tasks.images.docker -> tasks.images; tasks.pipeline -> tasks.pipeline."""
    parts = module.split(".")
    return ".".join(parts[:2])


def private_crossings(root: Path) -> list[str]:
    """Every place a module of tasks/ reaches a `_private` name of a module in another package:
    `from tasks.x.y import _name`, or `y._name` where y was imported from another package."""
    found = []
    for path in sorted((root / "tasks").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        own = _package_of(module)
        tree = ast.parse(path.read_text(), str(path))
        foreign: dict[str, str] = {}  # local name -> module it stands for, in another package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if _package_of(node.module) != own or _package_of(target) != own:
                        if alias.name.startswith("_"):
                            found.append(f"{module}: from {node.module} import {alias.name}")
                        foreign[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("tasks") and _package_of(alias.name) != own:
                        foreign[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in foreign):
                found.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr} ({foreign[node.value.id]})")
    return found


def test_no_module_uses_another_packages_private_names() -> None:
    assert private_crossings(ROOT) == []


def test_the_private_name_check_finds_a_crossing(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "tasks" / "media" / "iso.py").open("a") as f:
        f.write("\n\ndef _peek(settings):\n    return tools._docker_output([])\n")
    with (tmp_path / "tasks" / "pipeline.py").open("a") as f:
        f.write("\nfrom tasks.images.specs import _IGNORED  # noqa: E402, F401\n")
    crossings = private_crossings(tmp_path)
    assert any("tools._docker_output (tasks.images.tools)" in c for c in crossings), crossings
    assert "tasks.pipeline: from tasks.images.specs import _IGNORED" in crossings
