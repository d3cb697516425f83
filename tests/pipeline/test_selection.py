"""Honest model selection and seeds: VTAB-1k folds the last epoch trained on
train800val200 by default; `train.select: best-val` trains on train800 and folds the best epoch on val200;
the report names the split that selected and its size, and shows mean ± std over seeds, each checked
against the run's own files read here."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vitfold.pipeline.adapting import load_adapter
from vitfold.pipeline.config import load_config
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages import RunDir, run_stage

from helpers import MEAN, QUIET, STD, TINY_RUN, vitfold_cli, write_vtab

SIZES = {"train800": 24, "val200": 9, "test": 12}
TRAIN = {"epochs": 5, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0, "weight_decay": 0.0, "drop_path": 0.0}


@pytest.fixture(scope="module")
def vtab(tmp_path_factory) -> Path:
    return write_vtab(tmp_path_factory.mktemp("vtab"), SIZES)


def _config(vtab: Path, **train):
    model = {k: v for k, v in TINY_RUN.items() if k not in ("train", "data")}
    return load_config(None, data=f"vtab:{vtab}", train={**TRAIN, **train}, **model)


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "train" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _accuracy_on_list(cfg, adapter: Path, vtab: Path, split: str) -> float:
    """Top-1 of the adapter file on a VTAB list, with the images read and normalised here."""
    from PIL import Image

    model = load_adapter(build_model(cfg, 3), load_file(adapter)).eval()
    correct = 0
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)  # the run's, per channel
    lines = (vtab / f"{split}.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line]
    for name, label in pairs:
        image = Image.open(vtab / name).convert("RGB").resize((16, 16), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255  # [3, 16, 16]
        with torch.no_grad():
            correct += int(model(((x - mean) / std)[None]).argmax(-1)) == int(label)
    return correct / len(pairs)


def test_vtab_default_trains_on_train800val200_and_folds_the_last_epoch(tmp_path, vtab):
    cfg = _config(vtab)
    assert cfg.train.select == "last"
    result = run_stage("train", tmp_path, settings=cfg, **QUIET)
    rows = _metrics(tmp_path)
    meta = _meta(tmp_path / "train" / "adapter.safetensors")
    assert int(meta["epoch"]) == len(rows) == 5 and result["selected"]["epoch"] == 5
    train_lines = (vtab / "train800val200.txt").read_text().split("\n")
    splits = json.loads(meta["splits"])
    assert splits["train"] == {"split": "train800val200", "images": len([ln for ln in train_lines if ln])}
    assert splits["select"] is None and splits["eval"] == {"split": "test", "images": SIZES["test"]}
    assert all(r["select_acc"] == "" for r in rows)  # no validation split: nothing selects
    last = tmp_path / "train" / "adapter_last.safetensors"
    assert load_file(last).keys() == load_file(tmp_path / "train" / "adapter.safetensors").keys()
    assert all(
        torch.equal(v, load_file(last)[k]) for k, v in load_file(tmp_path / "train" / "adapter.safetensors").items()
    )


def test_best_val_trains_on_train800_and_folds_the_best_epoch_on_val200(tmp_path, vtab):
    cfg = _config(vtab, select="best-val")
    run_stage("train", tmp_path, settings=cfg, **QUIET)
    rows = _metrics(tmp_path)
    val = [float(r["select_acc"]) for r in rows]
    best = val.index(max(val)) + 1  # the first best epoch
    assert best != len(rows), "the best validation epoch is the last: this test could not tell them apart"
    adapter = tmp_path / "train" / "adapter.safetensors"
    meta = _meta(adapter)
    assert int(meta["epoch"]) == best and json.loads(meta["splits"])["train"] == {"split": "train800", "images": 24}
    assert json.loads(meta["splits"])["select"] == {"split": "val200", "images": SIZES["val200"]}
    # the file holds that epoch's tensors: its accuracy on val200 (computed here) is the one recorded then
    assert _accuracy_on_list(cfg, adapter, vtab, "val200") == pytest.approx(val[best - 1])
    assert _accuracy_on_list(cfg, adapter, vtab, "test") == pytest.approx(float(rows[best - 1]["eval_acc"]))


def test_best_val_without_a_validation_split_is_refused(tmp_path):
    result = vitfold_cli(
        "train", "--data", "digits", "--select", "best-val", "--epochs", "1", "--out", str(tmp_path / "r")
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.select best-val: digits data has no validation split" in lines[0], result.stderr


def test_compare_over_seeds_reports_mean_std_and_the_selecting_split(tmp_path, vtab):
    cfg = _config(vtab, select="best-val", epochs=2)
    cfg.compare, cfg.seeds, cfg.seed = {"linear": {}}, [3, 4], 3
    rd = RunDir(tmp_path)
    rd.write_config(cfg)
    run_stage("train", rd, **QUIET)
    run_stage("compare", rd, **QUIET)
    run_stage("report", rd, **QUIET)
    summary = json.loads(rd.compare_summary.read_text())
    assert summary["seeds"] == [3, 4] and [m["method"] for m in summary["methods"]] == ["rlrr", "linear"]
    report = rd.report.read_text()
    for entry in summary["methods"]:
        runs = {3: tmp_path} if entry["method"] == "rlrr" else {}
        runs = {s: runs.get(s, tmp_path / "compare" / entry["method"] / f"seed-{s}") for s in (3, 4)}
        accs = []
        for run in runs.values():
            rows = _metrics(run)
            val = [float(r["select_acc"]) for r in rows]
            accs.append(float(rows[val.index(max(val))]["eval_acc"]))  # test acc of the best val200 epoch
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        assert entry["acc_mean"] == pytest.approx(mean) and entry["acc_std"] == pytest.approx(std)
        assert f"{mean:.3f} ± {std:.3f}" in report
    assert "best on val200 (9 images)" in report and "test, 12 images" in report and "2 seed(s)" in report


@pytest.fixture(scope="module")
def vtab_val_disagrees(tmp_path_factory) -> Path:
    """A VTAB-1k folder whose val200 list mislabels its first five images (class + 1), so the best epoch on
    val200 is not the best one on the test list."""
    root = write_vtab(tmp_path_factory.mktemp("vtab"), SIZES)
    pairs = [line.split() for line in (root / "val200.txt").read_text().splitlines()]
    relabelled = [f"{name} {(int(label) + 1) % 3 if i < 5 else label}\n" for i, (name, label) in enumerate(pairs)]
    (root / "val200.txt").write_text("".join(relabelled))
    return root


def test_train_with_best_val_prints_and_returns_the_best_val_epoch(tmp_path, vtab_val_disagrees):
    """The epoch `vitfold train` names as the one it folds, and the one `run_stage` returns as selected, is the
    best on val200 (read from metrics.csv here), not the best on the test list."""
    import re

    from click.testing import CliRunner

    from vitfold.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(_config(vtab_val_disagrees, select="best-val").to_yaml())
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = _metrics(tmp_path / "run")
    val, test = ([float(r[key]) for r in rows] for key in ("select_acc", "eval_acc"))
    best_val, best_test = val.index(max(val)) + 1, test.index(max(test)) + 1
    assert best_val != best_test, "the best val200 epoch is the best test epoch: this test could not tell them apart"
    ((printed, accuracy),) = re.findall(r"epoch (\d+) to fold \(best-val: val accuracy ([\d.]+)\)", result.output)
    assert int(printed) == best_val and float(accuracy) == pytest.approx(max(val), abs=1e-4)
    again = _config(vtab_val_disagrees, select="best-val")
    returned = run_stage("train", tmp_path / "again", settings=again, **QUIET)
    assert returned["selected"]["epoch"] == best_val  # the same seed, the same epochs
