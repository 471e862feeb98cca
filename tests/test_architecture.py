"""The package layering (docs/architecture.md): the contracts in pyproject.toml hold, and the one installed name
is ``rag4dmc``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "actors", "deploy")  # the design card's top-level folders, installed as rag4dmc.<folder>


def test_the_import_contracts_hold():
    """import-linter: the math core imports no Ray, storage or model code; the actors never import the job; nothing
    imports the CLI; no cycle between the modules of a package or between sibling packages. In a process of its own
    (its CLI reconfigures logging), on this checkout whatever the environment's editable install points at."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "4 kept" in out.stdout, out.stdout  # every contract was read and checked


def test_the_namespace_links_the_design_cards_folders_and_every_package_is_found():
    for name in FOLDERS:
        link = REPO / "rag4dmc" / name
        assert link.is_symlink() and link.resolve() == REPO / name, f"rag4dmc/{name} must link to ../{name}"
    # setuptools finds packages by their __init__.py: a folder of modules without one would not be installed
    for name in FOLDERS:
        for folder, dirs, files in os.walk(REPO / name):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                assert "__init__.py" in files, f"{folder} has modules but no __init__.py"


@pytest.mark.parametrize("root", ["pipeline", "actors", "deploy", "tests", "bench"])
def test_code_imports_the_packages_only_by_their_installed_names(root):
    """``import pipeline`` would load a second copy of a module beside ``rag4dmc.pipeline`` (or another
    distribution's ``pipeline``): every import names rag4dmc."""
    wrong = []
    for path in sorted((REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            wrong += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not wrong, "\n".join(wrong)
