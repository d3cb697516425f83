"""The plan `vitfold train --print-plan` prints (the official protocols' schedules and splits), against
independent references written here: the learning rate of every optimizer step against the official loops
run with timm's and torch's own schedulers (`create_scheduler` as train_vtab.py/train_fgvc.py call it,
`CosineLRScheduler` as EFFT's execute.py builds it), and the weight-decay groups against the official rules."""

from __future__ import annotations

import json
import math
import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from timm.scheduler import CosineLRScheduler, create_scheduler

from vitfold.pipeline.config import load_config
from vitfold.pipeline.plan import training_plan

from helpers import TINY_RUN, vitfold_cli, write_fgvc, write_vtab

TINY_MODEL = {"backbone": TINY_RUN["backbone"], "backbone_kwargs": TINY_RUN["backbone_kwargs"]}


def _optimizer(lr: float) -> torch.optim.AdamW:
    """The official groups' shape (decayed, undecayed), each with the recipe's lr."""
    weights = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    return torch.optim.AdamW([{"params": [weights[0]], "lr": lr}, {"params": [weights[1]], "lr": lr}])


def _official_loop(optimizer, scheduler, epochs: int, steps: int, step_update: bool) -> list[float]:
    """The official loops: train an epoch at the optimizer's lr, then `scheduler.step(epoch)` (RLRR first
    calls `step_update(num_updates=epoch)`, a no-op for a per-epoch timm scheduler)."""
    rates = []
    for epoch in range(epochs):
        rates += [optimizer.param_groups[0]["lr"]] * steps
        if step_update:
            scheduler.step_update(num_updates=epoch, metric=0.0)
        scheduler.step(epoch)
    return rates


def official_rlrr(lr: float, epochs: int, steps: int, warm_restarts: bool = False) -> list[float]:
    """train_vtab.py / train_fgvc.py: timm `create_scheduler(args, optimizer)` with the official arguments
    (cosine, 10 warm-up epochs from 1e-7, min 1e-8, 10 cool-down epochs); CUB and Dogs then replace it with
    `CosineAnnealingWarmRestarts(T_0=5, T_mult=1, eta_min=0)` on the same optimizer."""
    args = Namespace(
        sched="cosine",
        epochs=epochs,
        warmup_epochs=10,
        cooldown_epochs=10,
        lr_cycle_decay=0.5,
        min_lr=1e-8,
        warmup_lr=1e-7,
    )
    optimizer = _optimizer(lr)
    scheduler, num_epochs = create_scheduler(args, optimizer)
    if warm_restarts:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=5, T_mult=1, eta_min=0)
        return _official_loop(optimizer, scheduler, num_epochs, steps, step_update=False)
    return _official_loop(optimizer, scheduler, num_epochs, steps, step_update=True)


def official_efft(lr: float, steps: int) -> list[float]:
    """execute.py: CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6), 100 epochs."""
    optimizer = _optimizer(lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)
    return _official_loop(optimizer, scheduler, 100, steps, step_update=False)


@pytest.fixture(scope="module")
def dtd(tmp_path_factory) -> Path:
    """1,000 train800val200 images like VTAB-1k's (few distinct files: the lists repeat them)."""
    root = write_vtab(tmp_path_factory.mktemp("dtd"), {"train800": 4, "val200": 2, "test": 3})
    for split, n in (("train800", 800), ("val200", 200)):
        lines = (root / f"{split}.txt").read_text().split()
        pairs = [f"{lines[2 * (i % (len(lines) // 2))]} {lines[2 * (i % (len(lines) // 2)) + 1]}" for i in range(n)]
        (root / f"{split}.txt").write_text("\n".join(pairs) + "\n")
    train800val200 = (root / "train800.txt").read_text() + (root / "val200.txt").read_text()
    (root / "train800val200.txt").write_text(train800val200)
    return root


def _plan(recipe: str, data: str, **train) -> dict:
    return training_plan(load_config(None, recipe=recipe, data=data, train=train, **TINY_MODEL))


def test_rlrr_vtab_plan_is_the_official_schedule(dtd):
    plan = _plan("rlrr-vtab:dtd", f"vtab:{dtd}")
    assert plan["steps_per_epoch"] == math.ceil(1000 / 32) == 32  # the last partial batch of 8 is kept
    assert plan["epochs"] == 110 and len(plan["lr"]) == 110 * 32
    assert plan["lr"] == pytest.approx(official_rlrr(2e-3, 100, 32), rel=1e-12, abs=1e-18)
    assert plan["splits"]["train"] == {"split": "train800val200", "images": 1000} and plan["select"] == "last"
    assert plan["splits"]["select"] is None and plan["splits"]["eval"]["split"] == "test"


def test_efft2_vtab_plan_is_the_official_schedule(dtd):
    plan = _plan("efft2-vtab:dtd", f"vtab:{dtd}")
    assert plan["steps_per_epoch"] == 1000 // 64 == 15  # drop_last=True
    assert plan["epochs"] == 100 and plan["eval_every"] == 10
    assert plan["lr"] == pytest.approx(official_efft(1e-3, 15), rel=1e-12, abs=1e-18)
    assert plan["drop_path"]["mode"] == "sample" and plan["head_init"].startswith("random")
    assert plan["method_options"]["core"] == "layer" and "per-layer cores" in plan["recipe"]["reproduces"]


def test_efft2_released_recipe_is_the_shared_core_with_the_released_scales(dtd):
    """The released run of each task: the same rank/scale/init as configs/EFFT2.json, one shared core; the plan
    says which run each recipe reproduces and its groups hold the shared core's 4 + 2 slices."""
    plan = _plan("efft2-vtab-released:dtd", f"vtab:{dtd}")
    assert plan["method_options"] == {"rank": 8, "scale": 0.01, "init": "vv", "core": "shared"}
    assert "shared by all blocks" in plan["recipe"]["reproduces"]
    assert plan["lr"] == pytest.approx(official_efft(1e-3, 15), rel=1e-12, abs=1e-18)  # the same protocol
    svhn = load_config(None, recipe="efft2-vtab-released:svhn").method_options
    assert (svhn["rank"], svhn["scale"], svhn["init"]) == (32, 80.0, "vu")


@pytest.mark.parametrize(
    ("dataset", "folder", "lr", "restarts"),
    [("cub", "CUB_200_2011", 3e-3, True), ("cars", "StanfordCars", 3e-3, False)],
)
def test_rlrr_fgvc_plan_is_the_official_schedule(tmp_path, dataset, folder, lr, restarts):
    root = write_fgvc(tmp_path, folder, {"train": 30, "val": 10, "test": 6})
    plan = _plan(f"rlrr-fgvc:{dataset}", f"fgvc:{root}")
    assert plan["steps_per_epoch"] == 2 and plan["epochs"] == 60  # 40 trainval images, batch 32, last kept
    assert plan["lr"] == pytest.approx(official_rlrr(lr, 50, 2, warm_restarts=restarts), rel=1e-12, abs=1e-18)


def official_fgvc_aug(lr: float, steps: int) -> list[float]:
    """train_fgvc_aug.py: create_scheduler gives 100 + 10 epochs, then CosineAnnealingWarmRestarts(T_0=10,
    T_mult=2, eta_min=0) replaces it; `lr_scheduler.step(epoch)` after each epoch."""
    optimizer = _optimizer(lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10, T_mult=2, eta_min=0)
    return _official_loop(optimizer, scheduler, 110, steps, step_update=False)


def test_rlrr_fgvc_aug_plan_is_the_official_augmented_protocol(tmp_path):
    root = write_fgvc(tmp_path, "CUB_200_2011", {"train": 30, "val": 10, "test": 6})
    plan = _plan("rlrr-fgvc-aug:cub", f"fgvc:{root}")
    assert plan["steps_per_epoch"] == 2 and plan["epochs"] == 110 and len(plan["lr"]) == 220
    assert plan["lr"] == pytest.approx(official_fgvc_aug(3e-3, 2), rel=1e-12, abs=1e-18)
    assert plan["lr"] != pytest.approx(official_rlrr(3e-3, 50, 2, warm_restarts=True) + [0.0] * 100)  # not T_0 = 5
    assert plan["restarts"] == {"T_0": 10, "T_mult": 2, "eta_min": 0.0} and plan["schedule"] == "warm-restarts"
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mode": "batch", "prob": 1.0, "switch_prob": 0.5}
    assert plan["augmentation"] == {"mixup": mixup, "label_smoothing": 0.1, "loss": "SoftTargetCrossEntropy"}
    assert plan["ema"] == {"decay": 0.9998, "folded": "the EMA weights"}
    assert "train_fgvc_aug.py" in plan["recipe"]["reproduces"] and plan["drop_path"]["operator"] == "elementwise"
    plain = _plan("rlrr-fgvc:cub", f"fgvc:{root}")
    assert plain["ema"] is None and plain["augmentation"]["mixup"] is None


def test_plan_lists_best_val_selection_and_drop_path_rates(dtd):
    plan = _plan("rlrr-vtab:clevr_count", f"vtab:{dtd}", select="best-val")
    assert plan["splits"]["train"] == {"split": "train800", "images": 800}
    assert plan["splits"]["select"] == {"split": "val200", "images": 200}
    assert plan["steps_per_epoch"] == 25 and plan["drop_path"]["operator"] == "elementwise"
    assert plan["drop_path"]["rates"] == pytest.approx([0.0, 0.5])  # depth 2: linspace(0, 0.5, 2)


def _official_rlrr_exempt(name: str) -> bool:
    """The official RLRR rule on the official names: the linear shifts (`shift_bias`) and the SSF after the
    norms carry "bias"/"norm"; the scale vectors, the patch SSF and the head weight do not; the head bias does."""
    shifts = re.fullmatch(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.f", name)
    norm_ssf = re.fullmatch(r"(blocks\.\d+\.norm[12]|norm)\.(scale|shift)", name)
    return bool(shifts or norm_ssf) or name == "head.bias"


def _print_plan(tmp_path: Path, method: str) -> tuple[dict, Path]:
    run = tmp_path / method
    args = (
        "train",
        "--data",
        "digits",
        "--method",
        method,
        "--weight-decay",
        "0.05",
        "--print-plan",
        "--out",
        str(run),
    )
    result = vitfold_cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), run


def test_print_plan_rlrr_groups_are_the_official_ones_and_nothing_is_written(tmp_path):
    plan, run = _print_plan(tmp_path, "rlrr")
    assert not run.exists()  # no training, no checkpoint, no config
    decay = {name: group["weight_decay"] for group in plan["param_groups"] for name in group["params"]}
    assert len(decay) == sum(len(g["params"]) for g in plan["param_groups"])  # each tensor in one group
    # vit_tiny: 12 blocks x (4 linears x (s_out, s_in, f) + 2 norms x (scale, shift)) + patch, final norm, head
    assert len(decay) == 12 * (4 * 3 + 2 * 2) + 2 + 2 + 2
    scales = [n for n in decay if n.endswith((".s_out", ".s_in"))]
    shifts = [n for n in decay if n.endswith(".f")]
    assert len(scales) == 12 * 8 and len(shifts) == 12 * 4
    for name, wd in decay.items():
        assert wd == (0.0 if _official_rlrr_exempt(name) else 0.05), name
    assert plan["head_init"] == "zero" and plan["drop_path"]["operator"] == "elementwise"
    assert plan["steps_per_epoch"] == 1347 // 32 and len(plan["lr"]) == plan["epochs"] * plan["steps_per_epoch"]


def test_print_plan_efft2_decays_every_trainable_tensor(tmp_path):
    plan, _ = _print_plan(tmp_path, "efft2")
    names = [n for g in plan["param_groups"] for n in g["params"]]
    assert set(names) == {"efft.U1", "efft.V1", "efft.C1", "efft.U2", "efft.V2", "efft.C2", "head.weight", "head.bias"}
    assert [g["weight_decay"] for g in plan["param_groups"]] == [0.05]
