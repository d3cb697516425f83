"""The package as users install it: a wheel built from the checkout (`pip wheel --no-deps`), installed into a
fresh virtual environment that sees nothing of the checkout. Its third-party dependencies come from this
test run's environment through a path entry (not the editable install, whose `.pth` files a path entry does
not run)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vitfold.cli import COMMAND_ORDER

from helpers import ROOT


def _source_modules() -> set[str]:
    """Every module under vitfold/ (its links to pipeline/ and export/ followed), by import name."""
    found = set()
    for folder, _, files in os.walk(ROOT / "vitfold", followlinks=True):
        for name in files:
            if name.endswith(".py"):
                parts = (Path(folder) / name).relative_to(ROOT).with_suffix("").parts
                found.add(".".join(parts).removesuffix(".__init__"))
    return found


def _clean_env() -> dict[str, str]:
    """This process's environment without what points at the checkout or this test run's venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the files git knows (built from a copy: pip builds in the source folder, and a `build/`
    left in the checkout could carry a deleted module into the next wheel)."""
    source, out = tmp_path_factory.mktemp("source") / "vitfold", tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_symlink() or (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("vitfold-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A virtual environment holding the wheel; nothing of the checkout is importable from it."""
    env = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", wheel]
    done = subprocess.run(install, env=_clean_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    assert (Path(purelib) / "vitfold" / "cli.py").is_file(), done.stdout
    # the dependencies (torch, timm, onnx, ...) of this test run, as plain path entries after the wheel's own
    dependencies = {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}
    (Path(purelib) / "vitfold_test_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    return env


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_every_module_and_the_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    missing = sorted(_source_modules() - modules)
    assert not missing, f"modules of the tree missing from the wheel: {missing}"
    assert "vitfold.pipeline.official" in modules  # the subpackage a hand-written list once left out
    shipped = {n for n in names if n.startswith("vitfold/pipeline/configs/")}
    assert {f"vitfold/pipeline/configs/{p.name}" for p in (ROOT / "pipeline" / "configs").glob("*.yaml")} == shipped
    assert {"vitfold/py.typed", "vitfold/pipeline/demo_data/digits.csv.gz"} <= names


@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_every_module_imports_from_the_installed_wheel(venv, where, tmp_path):
    """From an empty folder every module comes from the wheel; from the repository root the checkout's
    `vitfold/` (whose links make it whole) shadows the wheel and imports just as well."""
    cwd = tmp_path if where == "elsewhere" else ROOT
    code = (
        "import importlib, json, sys\n"
        f"names = {sorted(_source_modules() - {'vitfold.__main__'})!r}  # importing __main__ runs the CLI\n"
        "files = {n: importlib.import_module(n).__file__ for n in names}\n"
        "import vitfold\n"
        "assert 'adapt' in dir(vitfold) and 'fold' in dir(vitfold)\n"
        "vitfold.adapt, vitfold.fold, vitfold.RLRRConfig\n"
        "print(json.dumps(files))\n"
    )
    done = _run(venv, str(venv / "bin" / "python"), "-c", code, cwd=cwd)
    assert done.returncode == 0, done.stderr
    import json

    files = json.loads(done.stdout)
    expected = venv if where == "elsewhere" else ROOT
    strays = [n for n, f in files.items() if not Path(f).is_relative_to(expected)]
    assert not strays, f"imported from outside {expected}: {strays[:3]}"


def test_the_installed_commands_answer(venv, tmp_path):
    vitfold = str(venv / "bin" / "vitfold")
    top = _run(venv, vitfold, "--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for command in COMMAND_ORDER:
        assert command in top.stdout
        done = _run(venv, vitfold, command, "--help", cwd=tmp_path)
        assert done.returncode == 0 and "Usage:" in done.stdout, (command, done.stderr)
    assert _run(venv, str(venv / "bin" / "python"), "-m", "vitfold", "--help", cwd=ROOT).returncode == 0
    info = _run(
        venv,
        str(venv / "bin" / "python"),
        "-m",
        "vitfold",
        "info",
        "--backbone",
        "vit_tiny_patch16_224",
        "--method",
        "rlrr",
        "--json",
        cwd=tmp_path,
    )
    assert info.returncode == 0, info.stderr
    assert '"adapter_params"' in info.stdout
    listed = _run(venv, vitfold, "configs", cwd=tmp_path)
    assert "demo" in listed.stdout.split()
    shown = _run(venv, vitfold, "configs", "demo", cwd=tmp_path)
    assert shown.stdout == (ROOT / "pipeline" / "configs" / "demo.yaml").read_text()
