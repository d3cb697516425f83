"""Help and messages that explain themselves: commands in pipeline order, fixed values as choices, `run`
without a config, `train` with a `pretrain:` section, torch's CUDA warning on CPU machines, report cells."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from vitfold.cli import METHOD_NAMES, OFFICIAL_NAMES, STAGE_NAMES, main

from helpers import TINY_RUN


def test_help_lists_the_commands_in_pipeline_order():
    result = CliRunner().invoke(main, ["--help"])
    listed = re.findall(r"^  ([\w-]+)\s", result.output.split("Commands:")[1], re.M)
    stages = ["train", "import-official", "import-peft", "fold", "export", "triton", "verify", "bench", "report"]
    assert listed == [*stages, "run", "info", "configs"]


def test_fixed_values_are_choices_that_match_the_code():
    from vitfold.pipeline.adapters import METHODS
    from vitfold.pipeline.official import OFFICIAL_METHODS
    from vitfold.pipeline.stages.pipeline import STAGES

    assert sorted(METHOD_NAMES) == sorted(METHODS) and list(STAGE_NAMES) == list(STAGES)
    assert OFFICIAL_NAMES == OFFICIAL_METHODS
    for args in (
        ["train", "--method", "loha", "--out", "x"],
        ["import-official", "ckpt.pth", "--method", "efft1", "--out", "x"],
        ["run", "--config", "c.yaml", "--out", "x", "--force", "x"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "is not one of" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_run_without_config_runs_nothing_and_says_how_to_start(tmp_path):
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "vitfold run --config demo --out runs/demo" in result.output
    assert not (tmp_path / "run").exists()


def test_train_warns_that_it_ignores_pretrain(tmp_path):
    config = tmp_path / "c.yaml"
    pretrain = {"data": "digits:5-9", "train": {"epochs": 1}}
    config.write_text(yaml.safe_dump({**TINY_RUN, "pretrain": pretrain}))
    args = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--print-plan"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "train alone ignores the 'pretrain:' section" in result.stderr
    config.write_text(yaml.safe_dump(TINY_RUN))
    assert "pretrain" not in CliRunner().invoke(main, args).stderr


@pytest.mark.parametrize("gpu", [False, True])
def test_the_cuda_runtime_warning_is_dropped_on_cpu_machines_only(gpu, monkeypatch, caplog):
    from vitfold.export.aoti import _not_the_cuda_runtime_warning, quiet_cuda_runtime_warning

    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    quiet_cuda_runtime_warning()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("another warning")
    assert [r.getMessage().startswith("No CUDA") for r in caplog.records] == ([True] if gpu else []) + [False]
    assert (_not_the_cuda_runtime_warning in logger.filters) is not gpu


def test_report_writes_full_for_full_fine_tuning():
    from vitfold.pipeline.stages.report import _share_of_backbone

    counts = {"trainable_params": 5_691_653, "backbone_params": 5_688_960}  # all of it + the head
    assert _share_of_backbone({"method": "full", **counts}) == "full"
    assert _share_of_backbone({"method": "rlrr", "trainable_params": 56_890, "backbone_params": 5_689_000}) == "1.00%"
