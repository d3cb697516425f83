"""`vitfold run` killed with SIGKILL at seeded random moments, ten times in a row on one run directory
(each time rerun from a random stage, so the kills land across all stages): after every kill the run's
record is consistent, and the run that finally completes passes verify, leaves no temporary file, and
has recorded exactly the config's settings."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from vitfold.pipeline.config import load_config, training_params
from vitfold.pipeline.stages import RunDir
from vitfold.pipeline.stages.manifest import read_manifest
from vitfold.pipeline.stages.rundir import sha256

from helpers import TINY_RUN, vitfold_cli

CONFIG = {
    **{k: v for k, v in TINY_RUN.items() if k != "train"},
    "train": {**TINY_RUN["train"], "epochs": 3},
    "export": {"formats": ["onnx", "torchscript"]},
    "verify": {"batch_sizes": [2], "samples": 2},
    "bench": {
        "batch_sizes": [1],
        "backends": ["torch-folded", "onnxruntime"],
        "min_iters": 2,
        "min_seconds": 0.01,
        "roofline": False,
    },
}
KILLS = 10
STAGES = ("train", "fold", "export", "verify", "bench", "report")


def _consistent(run: Path) -> None:
    """What must hold at any instant: the manifest parses, and every stage it calls done still has the
    outputs it recorded, byte for byte."""
    if not (run / "manifest.json").exists():
        return
    for name, entry in read_manifest(RunDir(run))["stages"].items():
        if entry["status"] == "done":
            for key, digest in entry["outputs"].items():
                assert sha256(run / key) == digest, f"{name}: {key} does not match what was recorded"


@pytest.mark.slow
def test_ten_kills_at_random_moments_then_a_clean_finish(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "vitfold", "run", "--config", str(config), "--out", str(run)]
    rng = random.Random(0)
    killed_in = []
    for cycle in range(KILLS):
        target = rng.choice(STAGES)  # rerun from a random stage, and kill at a random moment after it starts
        log = tmp_path / f"kill{cycle}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([*command, "--force", target], stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline and f"== {target}:" not in log.read_text():
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        reached = re.findall(r"^== (\w+): (running|up to date)", log.read_text(), re.M)
        killed_in.append(reached[-1][0] if reached and reached[-1][1] == "running" else "between stages")
        _consistent(run)
    result = vitfold_cli("run", "--config", str(config), "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"]
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".export-")]
    assert not leftovers
    cfg = load_config(config)
    stages = read_manifest(RunDir(run))["stages"]
    assert stages["train"]["params"] == training_params(load_config(run / "config.yaml")) == training_params(cfg)
    for section in ("export", "verify", "bench"):  # export.triton_force permits a replacement, it is no setting
        expected = {k: v for k, v in asdict(getattr(cfg, section)).items() if k != "triton_force"}
        assert stages[section]["params"] == expected
    assert all(entry["status"] == "done" for entry in stages.values())
    assert len(set(killed_in) - {"between stages"}) >= 3, killed_in  # the kills landed inside several stages
    _consistent(run)


def test_vitfold_run_killed_during_training_resumes_it_to_the_uninterrupted_adapter(tmp_path):
    from safetensors.torch import load_file

    config = tmp_path / "run.yaml"
    settings = {
        **CONFIG,
        "data": "digits:0-4",
        "method": "efft2",
        "method_options": {"rank": 4, "dropout": 0.1},
        "train": {**CONFIG["train"], "batch_size": 16},
    }
    config.write_text(yaml.safe_dump(settings))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitfold", "run", "--config", str(config), "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run / "train" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before epoch 1 was recorded"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(RunDir(run))["stages"]["train"]["status"] == "running"
    result = vitfold_cli("run", "--config", str(config), "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "== train: running (it did not finish)" in result.stderr and "resuming after epoch 1 of 3" in result.stderr
    straight = tmp_path / "straight"
    assert vitfold_cli("train", "--config", str(config), "--out", str(straight)).returncode == 0
    a, b = (load_file(r / "train" / "adapter_last.safetensors") for r in (run, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
