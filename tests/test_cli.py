"""The `vitfold` command line: counts, clean one-line errors, and imports without optional runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main


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
        (["info", "--backbone", "vit_tiny_patch16_224", "--method", "foo"], "unknown method 'foo'"),
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


BLOCK_OPTIONAL = (
    "import sys\nfor name in ('onnxruntime', 'tensorrt'): sys.modules[name] = None  # import fails as if absent\n"
)


def test_import_export_and_help_work_without_onnxruntime_and_tensorrt():
    code = BLOCK_OPTIONAL + (
        "import export, pipeline\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'info' in r.output, r.output\n"
        "assert 'torch' not in sys.modules, 'vitfold --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pretrained_offline_fails_at_once_with_checkpoint_hint():
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: offline
    code = (
        "from pipeline.backbones import create_backbone\n"
        "from pipeline.errors import BackboneError\n"
        "try:\n"
        "    create_backbone('vit_tiny_patch16_224', pretrained=True)\n"
        "except BackboneError as e:\n"
        "    print(e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert time.monotonic() - start < 60
    assert "unreachable" in out.stdout and "--checkpoint" in out.stdout
