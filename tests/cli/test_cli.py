"""The `vitfold` command line: counts, clean one-line errors, and imports without optional runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from vitfold.cli import main


def _json(args: list[str]) -> dict:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_info_vit_base_rlrr_matches_official_count():
    counts = _json(["info", "--backbone", "vit_base_patch16_224", "--method", "rlrr", "--json"])
    # 12 blocks x (qkv 3*2304 + proj 2304 + fc1 6912 + fc2 4608 + 2 SSF 1536) + final-norm and patch SSF
    assert counts["adapter_params"] == 12 * (3 * 2304 + 2304 + 6912 + 4608 + 2 * 1536) + 2 * 1536 == 288768
    assert counts["head_params"] == 1000 * 769
    assert counts["backbone_params"] == 86_567_656 - 1000 * 769


def test_info_new_head_counts_classes():
    counts = _json(["info", "--backbone", "deit_small_patch16_224", "--num-classes", "10", "--json"])
    d = 384
    assert counts["adapter_params"] == 12 * 31 * d + 4 * d
    assert counts["head_params"] == 10 * (d + 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "--backbone", "vit_nope"], "unknown backbone 'vit_nope'"),
        (["info", "--backbone", "vit_tiny_patch16_224", "--method", "foo"], "'foo' is not one of 'rlrr'"),
        (["info", "--backbone", "vit_tiny_patch16_224", "-o", "rank=4"], "unknown option 'rank'"),
        (["run", "--config", "missing.yaml", "--out", "x"], "config file not found: missing.yaml"),
    ],
)
def test_input_errors_exit_2_with_one_line(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_run_reports_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("backbone: vit_tiny_patch16_224\nlearning_rat: 3\n")
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"config {cfg}: unknown key 'learning_rat'" in result.output


def _modules(package: str) -> list[str]:
    """Every module of a vitfold package, by walking its folder (not by importing it)."""
    import vitfold

    folder = {"vitfold.export": "export", "vitfold.pipeline": "pipeline"}[package]
    root = Path(vitfold.__file__).parent.parent / folder
    return [
        package + "." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(root.rglob("*.py"))
    ]


def test_every_module_imports_and_help_is_instant_without_onnxruntime_and_tensorrt():
    """With both optional runtimes unimportable: `vitfold --help` imports no torch, and every module of
    vitfold.export and vitfold.pipeline imports."""
    modules = _modules("vitfold.export") + _modules("vitfold.pipeline")
    code = (
        "import sys\n"
        "for name in ('onnxruntime', 'tensorrt'): sys.modules[name] = None  # import fails as if absent\n"
        "from click.testing import CliRunner\n"
        "from vitfold.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'verify' in r.output and 'bench' in r.output, r.output\n"
        "assert 'torch' not in sys.modules, 'vitfold --help imported torch'\n"
        "import importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
    )
    assert len(modules) > 30
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_import_name_that_no_local_file_shadows(tmp_path):
    """vitfold installs one top-level package: it works from a folder whose export.py and pipeline.py
    raise on import, and `export` / `pipeline` are not importable names of its own."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("export.py", "pipeline.py"):
        (shadow / name).write_text("raise RuntimeError('a user file was imported')\n")
    script = Path(sys.executable).with_name("vitfold")
    outputs = []
    for command in (
        [sys.executable, "-c", "import vitfold; print(vitfold.__version__, vitfold.adapt, vitfold.fold)"],
        [sys.executable, "-m", "vitfold", "--help"],
        [str(script), "--help"],
    ):
        result = subprocess.run(command, cwd=shadow, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    assert outputs[0].startswith(version("vitfold") + " <function adapt")
    assert "verify" in outputs[1] and outputs[1] == outputs[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    probe = "import importlib.util as u; print(u.find_spec('export'), u.find_spec('pipeline'))"
    installed = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the install alone, not the checkout
    for cwd, flags in ((empty, []), (shadow, ["-P"])):  # -P: the current folder is not on sys.path
        out = subprocess.run(
            [sys.executable, *flags, "-c", probe], cwd=cwd, env=installed, capture_output=True, text=True
        )
        assert out.stdout.strip() == "None None", out.stderr


def test_pretrained_offline_fails_at_once_with_checkpoint_hint(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}  # offline, cold cache
    code = (
        "from vitfold.pipeline.backbones import create_backbone\n"
        "from vitfold.errors import BackboneError\n"
        "try:\n"
        "    create_backbone('vit_tiny_patch16_224', pretrained=True)\n"
        "except BackboneError as e:\n"
        "    print(e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert time.monotonic() - start < 60
    assert "unreachable" in out.stdout and "--checkpoint" in out.stdout
