"""The layering, read from the source: imports run one way (CLI -> stages -> libraries), `export/` uses
nothing of `pipeline/`, and only the stage layer names a run directory's files."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "vitfold"  # vitfold/pipeline and vitfold/export link to the top-level folders


def _modules() -> dict[str, Path]:
    """Every module of the package by import name: the name is the path under the repository root."""
    found = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for path in (Path(folder) / f for f in files if f.endswith(".py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts).removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every vitfold module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "vitfold"}


def _layer(module: str) -> int:
    """0: libraries (and the shared errors), 1: stages, 2: the CLI and the package's entry points."""
    if module.startswith("vitfold.pipeline.stages"):
        return 1
    if module in ("vitfold.cli", "vitfold.__main__"):
        return 2
    return 0


def test_the_tree_is_what_this_test_reads():
    assert {
        "vitfold.cli",
        "vitfold.errors",
        "vitfold.export.runners",
        "vitfold.pipeline.training",
        "vitfold.pipeline.stages.rundir",
        "vitfold.pipeline.adapters.rlrr",
    } <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    upward = sorted(n for n in _imports(MODULES[module]) if n in MODULES and _layer(n) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("vitfold.export")))
def test_export_imports_nothing_of_pipeline(module):
    assert not [n for n in _imports(MODULES[module]) if n.startswith("vitfold.pipeline")]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) != 1))
def test_only_the_stage_layer_names_run_files(module):
    text = MODULES[module].read_text()
    assert "config.yaml" not in text and "manifest.json" not in text
