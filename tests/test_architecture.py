"""The import direction of pyproject's import-linter contracts covers every module, and holds."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import onnxcc

ROOT = Path(onnxcc.__file__).parent
CONTRACTS = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _top_level() -> set[str]:
    return {f"onnxcc.{m.name}" for m in pkgutil.iter_modules([str(ROOT)])}


def _contract(kind: str) -> dict:
    return next(c for c in CONTRACTS if c["type"] == kind)


def test_every_module_has_a_layer():
    layered = [m.strip() for layer in _contract("layers")["layers"] for m in layer.split(":")]
    assert sorted(layered) == sorted(set(layered)), "a module in two layers"
    assert set(layered) == _top_level()


def test_every_search_module_has_a_layer_of_the_search():
    """The search package's own contract orders all its modules (a new one must take a place)."""
    contract = next(c for c in CONTRACTS if c.get("containers") == ["onnxcc.search"])
    layered = [m.strip() for layer in contract["layers"] for m in layer.split(":")]
    assert sorted(layered) == sorted(set(layered)), "a module in two layers"
    assert set(layered) == {m.name for m in pkgutil.iter_modules([str(ROOT / "search")])}


def test_only_the_command_line_may_parse_and_render():
    sources = set(_contract("forbidden")["source_modules"])
    assert sources == _top_level() - {"onnxcc.cli", "onnxcc.__main__"}
    for path in ROOT.rglob("*.py"):
        if path.is_relative_to(ROOT / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("argparse", "rich") for n in names), path


def test_contracts_hold():
    # in a process of its own: import-linter configures logging with existing loggers disabled
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT.parent / 'pyproject.toml')!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
