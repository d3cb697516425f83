"""Run state under faults: one writer per run, settings recorded as they ran, artifacts that run code
loaded only when trusted, adapters tied to their base weights, training that diverges stops, leftovers
cleaned, and a fold whose bytes depend only on what it folds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vitfold.errors import VitfoldError
from vitfold.pipeline.config import load_config
from vitfold.pipeline.stages import RunDir, run_stage
from vitfold.pipeline.stages.manifest import read_manifest, staleness
from vitfold.pipeline.stages.pretrain import pretrained_path
from vitfold.pipeline.stages.train import TRAIN
from vitfold.pipeline.stages.trust import cache_root

from helpers import QUIET, TINY_RUN, copy_run, vitfold_cli


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_config(**train):
    return load_config(
        None, **{k: v for k, v in TINY_RUN.items() if k != "train"}, train={**TINY_RUN["train"], **train}
    )


def test_a_second_writer_is_refused_while_the_first_holds_the_run(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    with RunDir(run).locked():
        result = vitfold_cli("fold", str(run))
        assert result.returncode == 2 and "is in use by another vitfold process" in result.stderr, result.stderr
    assert vitfold_cli("fold", str(run)).returncode == 0  # released with the holder


def test_taking_the_lock_removes_what_a_killed_writer_left(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    leftovers = [run / "train" / ".adapter.safetensors.x1.tmp", run / "export" / ".export-abc" / "model.onnx"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    with RunDir(run).locked():
        assert not any(p.exists() for p in leftovers) and not (run / "export" / ".export-abc").exists()


def test_a_stage_records_the_settings_it_ran_with_not_the_config_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    configured, ran = tiny_config(epochs=2), tiny_config(epochs=1)
    rd.write_config(configured)
    run_stage("train", rd, settings=ran, **QUIET)
    assert read_manifest(rd)["stages"]["train"]["params"]["train"]["epochs"] == 1
    why = staleness(rd, "train", TRAIN.inputs(rd, configured), TRAIN.params(configured))
    assert why is not None and "settings changed (train)" in why.message  # `vitfold run` trains again


def test_an_executable_artifact_not_exported_here_needs_trust(exported_run, tmp_path, monkeypatch):
    run = copy_run(exported_run, tmp_path / "run")
    args = ("verify", str(run), "--backends", "aoti", "--samples", "2", "--batch-sizes", "2")
    other_cache = tmp_path / "another-machine"  # a real cache, trusting what that machine exported
    (other_cache / "trusted").mkdir(parents=True)
    (other_cache / "trusted" / ("0" * 64)).touch()
    elsewhere = {"VITFOLD_CACHE": str(other_cache)}
    refused = vitfold_cli(*args, env=elsewhere)
    assert refused.returncode == 2 and "runs native code when loaded" in refused.stderr, refused.stderr
    assert not (run / "verify").exists()
    assert vitfold_cli(*args, "--trust", env=elsewhere).returncode == 0
    assert vitfold_cli(*args).returncode == 0  # this machine exported it: trusted without a flag
    bench = vitfold_cli(
        "bench", str(run), "--backends", "aoti", "--batch-sizes", "1", "--min-iters", "1", env=elsewhere
    )
    assert bench.returncode == 2 and "runs native code" in bench.stderr


def test_the_fold_refuses_other_base_weights_than_the_adapter_was_trained_on(tmp_path):
    base = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    from safetensors.torch import save_file

    from vitfold.pipeline.backbones import create_backbone

    model = create_backbone(TINY_RUN["backbone"], **TINY_RUN["backbone_kwargs"])
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, base)
    rd = RunDir(tmp_path / "run")
    rd.write_config(
        load_config(
            None, **{k: v for k, v in TINY_RUN.items() if k != "train"}, checkpoint=str(base), train=TINY_RUN["train"]
        )
    )
    run_stage("train", rd, **QUIET)
    run_stage("fold", rd, **QUIET)  # the same base: folds
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(1.01)
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, base)
    with pytest.raises(VitfoldError, match="was trained on base weights .* --base-mismatch-ok"):
        run_stage("fold", rd, **QUIET)
    run_stage("fold", rd, base_mismatch_ok=True, **QUIET)
    assert read_manifest(rd)["stages"]["fold"]["params"] == {"base_mismatch_ok": True}


def test_a_diverging_training_stops_with_one_line_naming_the_step(tmp_path):
    cfg = tiny_config(lr=1e30, warmup_epochs=0)
    with pytest.raises(VitfoldError, match=r"training diverged: loss (nan|inf) at epoch 1, step \d+") as error:
        run_stage("train", tmp_path / "run", settings=cfg, **QUIET)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "train" / "adapter.safetensors").exists()


def test_a_backbone_name_cannot_leave_the_cache():
    cfg = load_config(None, backbone="vit_tiny_patch16_224", pretrain={"data": "digits:0-4"})
    cfg.backbone = "../../../../tmp/evil/name"
    path = pretrained_path(cfg)
    assert path.parent == cache_root() / "pretrained" and "/" not in path.name and ".." not in path.name


def _folder(root: Path, empty_val_class: bool) -> Path:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            if split == "val" and label == "dog" and empty_val_class:
                continue
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return root


def test_an_empty_validation_class_and_a_corrupt_validation_image_stop_before_training(tmp_path):
    args = ["--backbone", "vit_tiny_patch16_224", "--epochs", "1", "--batch-size", "4"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backbone_kwargs": TINY_RUN["backbone_kwargs"]}))
    root = _folder(tmp_path / "empty", empty_val_class=True)
    result = vitfold_cli("train", "--config", str(cfg), "--data", f"folder:{root}", *args, "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and f"class folder {root / 'val' / 'dog'} has no images" in result.stderr
    root = _folder(tmp_path / "corrupt", empty_val_class=False)
    (root / "val" / "dog" / "3.png").write_bytes(b"not a png")
    result = vitfold_cli("train", "--config", str(cfg), "--data", f"folder:{root}", *args, "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "cannot read image" in result.stderr and "3.png" in result.stderr
    assert not (tmp_path / "b" / "train" / "metrics.csv").exists()  # no epoch ran


@pytest.mark.parametrize(
    ("damage", "args", "message"),
    [
        ("adapter", ("verify",), "cannot read"),
        ("last.ckpt", ("train", "--resume"), "cannot resume from"),
    ],
)
def test_a_corrupt_run_file_is_one_line_exit_2(exported_run, tmp_path, damage, args, message):
    run = copy_run(exported_run, tmp_path / "run")
    path = run / "train" / ("adapter.safetensors" if damage == "adapter" else "last.ckpt")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    if damage == "adapter":  # the manifest agrees, as if the file was written so: the reader must cope
        manifest = read_manifest(RunDir(run))
        manifest["stages"]["train"]["outputs"]["train/adapter.safetensors"] = _digest(path)
        (run / "manifest.json").write_text(json.dumps(manifest))
    result = vitfold_cli(*args[:1], *([str(run)] if args[0] != "train" else ["--out", str(run)]), *args[1:])
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr


def test_num_classes_smaller_than_the_data_and_resume_without_a_run_are_refused(tmp_path):
    with pytest.raises(VitfoldError, match=f"num_classes 3 is smaller than the 5 classes of {TINY_RUN['data']}"):
        run_stage("train", tmp_path / "run", settings=load_config(None, **{**TINY_RUN, "num_classes": 3}), **QUIET)
    result = vitfold_cli("train", "--out", str(tmp_path / "nothing"), "--resume")
    assert result.returncode == 2 and "holds no run to resume" in result.stderr


def test_a_read_only_run_is_refused_before_the_work(exported_run, tmp_path, monkeypatch):
    """(Tests run as root here, whom chmod does not stop: the file system's refusal is simulated.)"""
    import vitfold.pipeline.stages.verify as verify_stage

    run = copy_run(exported_run, tmp_path / "run")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(verify_stage.tempfile, "TemporaryFile", read_only)
    with pytest.raises(VitfoldError, match="cannot write verify's results into .*Permission denied.*--output DIR"):
        run_stage("verify", run, samples=2, batch_sizes=[2], **QUIET)


def test_verify_output_writes_nothing_into_the_run(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    before = {p: _digest(p) for p in run.rglob("*") if p.is_file()}
    result = vitfold_cli("verify", str(run), "--samples", "2", "--batch-sizes", "2", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert {p: _digest(p) for p in run.rglob("*") if p.is_file()} == before
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"verify.json", "verify.md", "junit.xml"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_export_for_cuda_without_a_gpu_stops_before_any_work(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run", without=("triton", "export"))
    result = vitfold_cli("export", str(run), "--format", "onnx,aoti", "--device", "cuda")
    assert result.returncode == 2 and "needs a GPU" in result.stderr
    assert not (run / "export").exists()


def test_the_same_adapter_folds_to_the_same_bytes_however_the_run_is_named(exported_run, tmp_path):
    run = copy_run(exported_run, tmp_path / "run")
    assert vitfold_cli("fold", str(run)).returncode == 0
    first = _digest(run / "fold" / "model.safetensors")
    for spelling in (f"{tmp_path}/./run/../run", os.path.relpath(run)):  # and another process each time
        assert vitfold_cli("fold", spelling).returncode == 0
        assert _digest(run / "fold" / "model.safetensors") == first
    shutil.rmtree(run)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from vitfold.pipeline import atomic

    def full(fd, *args, **kwargs):
        os.close(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", full)
    with pytest.raises(VitfoldError, match=r"cannot write .*report.md: No space left on device"):
        atomic.atomic_write_text(tmp_path / "report.md", "text")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_pre_training_resumes_from_its_last_epoch(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "c.yaml"
    pretrain = {"data": "digits:0-4", "train": {"epochs": 3, "lr": 3e-4, "warmup_epochs": 0, "batch_size": 32}}
    quick = {
        "export": {"formats": ["onnx"]},
        "verify": {"batch_sizes": [2], "samples": 2},
        "bench": {
            "batch_sizes": [1],
            "backends": ["onnxruntime"],
            "min_iters": 1,
            "min_seconds": 0.0,
            "roofline": False,
        },
    }
    config.write_text(yaml.safe_dump({**TINY_RUN, "pretrain": pretrain, **quick}))
    cache = tmp_path / "cache"
    env = {**os.environ, "VITFOLD_CACHE": str(cache)}
    args = ["run", "--config", str(config), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, "-m", "vitfold", *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob("pretrained/.pretrain-*/train/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "pre-training ended before its first epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = vitfold_cli(
        "run", "--config", str(config), "--out", str(tmp_path / "run"), env={"VITFOLD_CACHE": str(cache)}
    )
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stderr.split("== train")[0]  # the pre-training, not the run's training
    assert not list(cache.glob("pretrained/.pretrain-*"))  # its scratch run is gone once the backbone is cached
    assert len(list(cache.glob("pretrained/*.safetensors"))) == 1
