"""The package's shape holds: data flows one way through the layers setup.cfg names, no module reaches
into another's private names, and integrity checks are real checks, not asserts that python -O drops."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "safer_audit"


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_the_layers_contract_holds_with_imports_inside_functions_too():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    # in its own process: import-linter's command line changes the logging of the process it runs in
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'setup.cfg')!r}, no_cache=True, no_logo=True))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = []
    for module, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                source = absolute(module, is_package, node)
                if source.startswith("safer_audit") and source != module:
                    private += [f"{module}: {source}.{a.name}" for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")
                                and f"{source}.{a.name}" not in known]
    assert private == []


def test_the_package_has_no_asserts():
    asserts = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, _ in modules().values()
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Assert)]
    assert asserts == []
