"""`vitfold run` end to end on a tiny config: every stage, skipping by hash, reruns from the right
stage, a corrupted artifact caught by its hash, and a run killed mid-way finished by running again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vitfold.pipeline.stages import RunDir
from vitfold.pipeline.stages.manifest import read_manifest
from vitfold.pipeline.stages.rundir import sha256

from helpers import ROOT, copy_run, vitfold_cli

CONFIG = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2},
    "data": "digits:5-9",
    "method": "rlrr",
    "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0},
    "pretrain": {"data": "digits:0-4", "train": {"epochs": 1, "lr": 3e-4, "warmup_epochs": 0}},
    "compare": {"linear": {}},
    "export": {"formats": ["onnx", "torchscript"]},
    "verify": {"batch_sizes": [1, 4], "samples": 4},
    "bench": {"batch_sizes": [1, 2], "min_iters": 3, "min_seconds": 0.05, "roofline": False},
}
ALL = ["pretrain", "train", "compare", "fold", "export", "verify", "bench", "report"]


def vitfold_run(config: Path, run: Path, cache: Path, *extra: str) -> tuple[int, list[str], str]:
    """Exit code, the stages that ran, and stderr."""
    result = vitfold_cli("run", "--config", str(config), "--out", str(run), *extra, env={"VITFOLD_CACHE": str(cache)})
    return result.returncode, re.findall(r"^== (\w+): running", result.stderr, re.M), result.stderr


def write_config(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(CONFIG))
    for section, values in changes.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): sha256(p) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    root = tmp_path_factory.mktemp("pipeline")
    config, run, cache = write_config(root / "run.yaml"), root / "run", root / "cache"
    code, ran, log = vitfold_run(config, run, cache)
    assert code == 0, log
    assert ran == ALL
    return config, run, cache, log


def test_first_run_writes_report_verify_and_bench(first):
    _, run, cache, log = first
    verify = json.loads((run / "verify" / "verify.json").read_text())
    assert verify["passed"] and {r["backend"] for r in verify["results"]} == {
        "torch-folded",
        "torchscript",
        "onnxruntime",
    }
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert {r["backend"] for r in bench["rows"]} >= {"torch-unmerged", "torch-folded", "torch-base"}
    report = (run / "REPORT.md").read_text()
    for heading in ("## Accuracy on the target task", "## Equivalence", "## Latency", "bench/latency.png"):
        assert heading in report
    assert "| rlrr (this run) |" in report and "| linear |" in report
    explained = "export and artifact rows compare the artifact with the folded model"  # the gate renderer's words
    assert explained in report and "max_rel = max |Δ| / max |reference logit|" in report
    compared = [line for line in log.splitlines() if re.search(r"epoch 1/1", line)]
    assert len(compared) == 3 and sum(line.startswith("compare linear seed 0: epoch 1/1") for line in compared) == 1
    manifest = read_manifest(RunDir(run))["stages"]
    assert list(manifest) == ALL and all(e["status"] == "done" for e in manifest.values())
    assert list(cache.rglob("*.safetensors")) == [Path(yaml.safe_load((run / "config.yaml").read_text())["checkpoint"])]


def test_second_run_changes_nothing(first, tmp_path):
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    before = snapshot(run)
    started = time.perf_counter()
    code, ran, log = vitfold_run(config, run, cache)
    assert code == 0 and ran == [], log
    assert time.perf_counter() - started < 30
    assert snapshot(run) == before


def test_a_rerun_with_nothing_to_do_imports_no_torch(first, tmp_path):
    """The rerun is told from the manifest and the hashes alone (the stages, torch, timm, ONNX not imported)."""
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    args = [sys.executable, "-X", "importtime", "-m", "vitfold", "run", "--config", str(config), "--out", str(run)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "VITFOLD_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^== (\w+): up to date, skipped", done.stderr, re.M) == ALL
    imported = re.findall(r"^import time:.*\| +([\w.]+)$", done.stderr, re.M)
    assert "click" in imported and not {"torch", "timm", "onnx"} & set(imported)


def test_a_stage_run_alone_after_the_pipeline_is_seen_by_the_next_run(first, tmp_path):
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    alone = ["bench", str(run), "--min-iters", "4", "--batch-sizes", "1,2"]
    assert vitfold_cli(*alone, env={"VITFOLD_CACHE": str(cache)}).returncode == 0
    code, ran, log = vitfold_run(config, run, cache)  # the config says min_iters 3: bench runs again
    assert code == 0 and ran == ["bench", "report"], log
    assert "== bench: running (its settings changed (min_iters))" in log


def test_changed_bench_setting_reruns_bench_and_report_only(first, tmp_path):
    _, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    code, ran, log = vitfold_run(write_config(tmp_path / "c.yaml", bench={"min_iters": 4}), run, cache)
    assert code == 0 and ran == ["bench", "report"], log
    assert "== bench: running (its settings changed (min_iters))" in log


def test_deleted_fold_output_reruns_fold_not_training(first, tmp_path):
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    (run / "fold" / "model.safetensors").unlink()
    code, ran, log = vitfold_run(config, run, cache)
    assert code == 0 and ran[0] == "fold" and "train" not in ran and "compare" not in ran, log
    assert "its output fold/model.safetensors is missing" in log
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"]


def test_force_reruns_from_the_stage_on(first, tmp_path):
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    code, ran, log = vitfold_run(config, run, cache, "--force", "export")
    assert code == 0 and ran == ["export", "verify", "bench", "report"], log
    code, _, log = vitfold_run(config, run, cache, "--force", "nonsense")
    assert code == 2 and "'nonsense' is not one of 'pretrain'" in log


def test_flipped_byte_is_refused_by_verify_and_rebuilt_by_run(first, tmp_path):
    config, run, cache, _ = first
    run = copy_run(run, tmp_path / "run")
    onnx_file = run / "export" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    alone = vitfold_cli("verify", str(run), env={"VITFOLD_CACHE": str(cache)})
    assert alone.returncode == 2 and "does not match the sha256 the export stage recorded" in alone.stderr
    code, ran, log = vitfold_run(config, run, cache)
    assert code == 0 and ran[0] == "export", log
    assert "its output export/model.onnx does not match its recorded sha256" in log
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"]


def test_killed_run_finishes_when_run_again(first, tmp_path):
    config, _, cache, _ = first
    run = tmp_path / "run"
    env = {**os.environ, "VITFOLD_CACHE": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitfold", "run", "--config", str(config), "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "manifest.json").is_file() and read_manifest(RunDir(run))["stages"].get("train", {}).get(
            "status"
        ) == "done":
            break  # training is recorded (atomic manifest writes); the comparison's training is under way
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, ran, log = vitfold_run(config, run, cache)
    assert code == 0, log
    assert "pretrain" not in ran and "train" not in ran  # finished before the kill: not redone
    assert json.loads((run / "verify" / "verify.json").read_text())["passed"]
    assert vitfold_run(config, run, cache)[1] == []


@pytest.mark.parametrize("path", sorted(ROOT.glob("pipeline/configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    from vitfold.pipeline.config import load_config
    from vitfold.pipeline.stages.pipeline import stages_for

    cfg = load_config(path)
    names = [s.name for s in stages_for(cfg)]
    assert "train" in names and names[-5:] == ALL[-5:]
    assert ("compare" in names) == bool(cfg.compare) and ("pretrain" in names) == bool(cfg.pretrain)
