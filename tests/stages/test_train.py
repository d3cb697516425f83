"""The train stage on the bundled digits with a tiny ViT: outputs, learning, resume, DDP, recipes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import vitfold
from vitfold.pipeline.config import load_config
from vitfold.pipeline.models import build_model
from vitfold.pipeline.stages import run_stage

from helpers import vitfold_cli

TINY = {"img_size": 16, "patch_size": 4, "depth": 2}
FAST = {"lr": 3e-3, "warmup_epochs": 0, "min_lr": 1e-4, "weight_decay": 0.0, "drop_path": 0.0, "batch_size": 32}
OPTIONS = {"efft1": {"rank": 8, "scale": 1.0}, "efft2": {"rank": 8, "scale": 1.0}, "lora": {"rank": 4}}


def tiny_config(tmp_path: Path, method: str = "rlrr", epochs: int = 2, **train) -> Path:
    cfg = {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": TINY,
        "data": "digits",
        "method": method,
        "method_options": OPTIONS.get(method, {}),
        "seed": 0,
        "train": {**FAST, "epochs": epochs, **train},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "train" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train(cfg, run: Path, **kwargs) -> dict:
    return run_stage("train", run, settings=cfg, **kwargs)


def test_train_cli_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    result = vitfold_cli("train", "--config", str(tiny_config(tmp_path)), "--epochs", "2", "--out", str(run))
    assert result.returncode == 0, result.stderr
    for name in (
        "config.yaml",
        "train/adapter.safetensors",
        "train/adapter_last.safetensors",
        "train/metrics.csv",
        "train/last.ckpt",
    ):
        assert (run / name).is_file(), name
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["method"] == "rlrr" and saved["train"]["lr"] == 3e-3
    with safe_open(run / "train" / "adapter.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["method"] == "rlrr" and meta["backbone"] == "vit_tiny_patch16_224" and meta["num_classes"] == "10"
    assert not any(".base." in k or k in ("pos_embed", "cls_token") for k in keys)
    backbone_bytes = 4 * sum(
        p.numel()
        for p in vitfold.adapt(__import__("timm").create_model("vit_tiny_patch16_224", **TINY), "rlrr").parameters()
    )
    assert (run / "train" / "adapter.safetensors").stat().st_size < 0.05 * backbone_bytes


@pytest.mark.parametrize("method", ["rlrr", "efft1", "efft2", "lora", "linear", "full"])
def test_loss_falls_and_accuracy_rises(tmp_path, method):
    lr = {"full": 5e-4}.get(method, FAST["lr"])  # all 0.9M weights of a random backbone: a smaller step
    cfg = load_config(tiny_config(tmp_path, method, epochs=3, lr=lr))
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    rows = read_metrics(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < float(first["train_loss"]) - 0.05
    assert float(last["eval_acc"]) > float(first["eval_acc"])
    assert result["best_acc"] > 0.2  # ten classes: chance is 0.1 (the backbone is random)


def test_training_is_deterministic_given_the_seed(tmp_path):
    cfg = load_config(tiny_config(tmp_path, "efft2", epochs=1))
    train(cfg, tmp_path / "a", log=lambda _: None)
    train(cfg, tmp_path / "b", log=lambda _: None)
    a, b = (load_file(tmp_path / r / "train" / "adapter.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensors(state):
    """Every tensor of a nested state (dicts, lists), in a fixed order, with its path."""
    if isinstance(state, torch.Tensor):
        yield "", state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from ((f"{key}.{path}", t) for path, t in _tensors(state[key]))
    elif isinstance(state, list | tuple):
        for i, item in enumerate(state):
            yield from ((f"{i}.{path}", t) for path, t in _tensors(item))


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """EFFT2 with factor dropout: the resumed run draws the same masks only if the RNG state came back too."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, "efft2", epochs=3, batch_size=16)
    config.write_text(config.read_text().replace("data: digits", "data: digits:0-4"))  # half the images
    assert load_config(config).method_options.get("dropout", 0.1) > 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitfold", "train", "--config", str(config), "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run / "train" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before epoch 1 was recorded"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # epoch 2 has just started
    proc.wait()
    assert [row["epoch"] for row in read_metrics(run)] == ["1"]
    result = vitfold_cli("train", "--out", str(run), "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1 of 3" in result.stderr
    assert [row["epoch"] for row in read_metrics(run)] == ["1", "2", "3"]
    assert not list((run / "train").glob(".*.tmp")), "a temp file was left behind"
    straight = tmp_path / "straight"
    assert vitfold_cli("train", "--config", str(config), "--out", str(straight)).returncode == 0
    resumed, uninterrupted = (torch.load(r / "train" / "last.ckpt", weights_only=True) for r in (run, straight))
    assert resumed["epoch"] == uninterrupted["epoch"] == 3
    for part in ("adapter", "optimizer"):
        a, b = dict(_tensors(resumed[part])), dict(_tensors(uninterrupted[part]))
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert resumed["history"][-1]["train_loss"] == uninterrupted["history"][-1]["train_loss"]


def test_ddp_two_processes_match_one_process(tmp_path):
    config = tiny_config(tmp_path, epochs=1, batch_size=64)
    single = vitfold_cli("train", "--config", str(config), "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vitfold",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (load_file(tmp_path / r / "train" / "adapter_last.safetensors") for r in ("one", "two"))
    assert one.keys() == two.keys()
    d = 192
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.qkv.f"):
            # the key bias: softmax ignores it, so its gradient is rounding noise that Adam normalises
            # up to a full step; q and v biases must still agree
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        # so can a single entry elsewhere whose gradient is noise (the input scale of a hidden unit that GELU
        # keeps near zero: 1 of block 0's 768 fc2 scales, off by 9e-5): at most 1 in 200 entries may differ
        apart = int((~torch.isclose(b, a, rtol=1e-4, atol=1e-5)).sum())
        assert apart <= max(1, a.numel() // 200), f"{key}: {apart} of {a.numel()} entries differ"
    models = []
    for state in (one, two):
        model = build_model(load_config(config), num_classes=10).eval()
        models.append(vitfold.load_adapter(model, state))
    initial = vitfold.adapter_state_dict(build_model(load_config(config), num_classes=10))
    assert not torch.equal(initial["blocks.0.mlp.fc1.f"], one["blocks.0.mlp.fc1.f"]), "nothing was trained"
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), rtol=1e-5, atol=1e-5)


def test_recipes_fill_published_settings_and_flags_win(tmp_path):
    cfg = load_config(None, recipe="rlrr-vtab:dtd")
    assert (cfg.method, cfg.train.lr, cfg.train.drop_path, cfg.train.weight_decay, cfg.train.hflip) == (
        "rlrr",
        2e-3,
        0.1,
        5e-5,
        True,
    )
    assert cfg.train.batch_size == 32 and cfg.train.warmup_epochs == 10 and cfg.train.mean == (0.5, 0.5, 0.5)
    cfg = load_config(None, recipe="efft2-vtab:svhn")
    assert cfg.method == "efft2" and cfg.method_options == {"rank": 32, "scale": 80.0, "init": "vu", "core": "layer"}
    assert cfg.train.batch_size == 64 and cfg.train.weight_decay == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text("recipe: rlrr-vtab:dtd\ntrain: {lr: 0.5, epochs: 7}\n")
    cfg = load_config(path, train={"epochs": 3})
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.drop_path) == (0.5, 3, 0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "folder:/no/such/dir"], "directory not found: /no/such/dir"),
        (["--data", "imagenet"], "unknown kind 'imagenet'"),
        (["--data", "digits:3-12"], "within 0..9"),
        (["--method", "prompt"], "'prompt' is not one of 'rlrr'"),
        (["--recipe", "rlrr-vtab:mnist"], "unknown VTAB-1k task 'mnist'"),
        (["--checkpoint", "/no/such.safetensors"], "checkpoint not found: /no/such.safetensors"),
    ],
)
def test_input_errors_exit_2_with_one_line(tmp_path, args, message):
    result = vitfold_cli("train", "--config", str(tiny_config(tmp_path, epochs=1)), *args, "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_compiled_training_matches_eager(tmp_path):
    """`train.compile` changes how the step runs, not what it computes (RLRR: no dropout, so the same
    random stream; EFFT's factor dropout draws other masks under inductor)."""
    adapters = {}
    for compiled in (False, True):
        cfg = load_config(tiny_config(tmp_path, "rlrr", epochs=1, compile=compiled))
        train(cfg, tmp_path / str(compiled), log=lambda _: None)
        adapters[compiled] = load_file(tmp_path / str(compiled) / "train" / "adapter.safetensors")
    for key, eager in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], eager, rtol=1e-3, atol=1e-3)
    assert any(float(v.abs().max()) > 0.01 for k, v in adapters[False].items() if k.endswith(".f"))  # it trained
