"""`vitfold run` killed with SIGKILL at seeded random moments, ten times in a row on one run directory:
after every kill the run's record is consistent, and the run that finally completes passes verify,
leaves no temporary file, and has recorded exactly the config's settings."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
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
    "bench": {"batch_sizes": [1], "backends": ["torch-folded", "onnxruntime"], "min_iters": 2, "min_seconds": 0.01},
}
KILLS = 10


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
    for _ in range(KILLS):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(3.0, 9.0))  # past the imports, somewhere in the stages
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if run.joinpath("manifest.json").exists():
            stages = read_manifest(RunDir(run))["stages"]
            killed_in.append(next((n for n, e in stages.items() if e["status"] == "running"), "between stages"))
        _consistent(run)
    result = vitfold_cli("run", "--config", str(config), "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"]
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".export-")]
    assert not leftovers
    cfg = load_config(config)
    stages = read_manifest(RunDir(run))["stages"]
    assert stages["train"]["params"] == training_params(load_config(run / "config.yaml")) == training_params(cfg)
    for section in ("export", "verify", "bench"):
        assert stages[section]["params"] == asdict(getattr(cfg, section))
    assert all(entry["status"] == "done" for entry in stages.values())
    assert len(set(killed_in)) >= 2, killed_in  # the kills landed in more than one place
    _consistent(run)
