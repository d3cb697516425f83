"""Published training recipes (RLRR paper §4.1, EFFT paper §4.1 and the authors' released settings), as
values for the run config.

Resolution order (later wins): the method's paper defaults, then `--recipe NAME`, then the config file,
then command-line flags. The method defaults are the paper's hyper-parameters on vitfold's per-step
schedule; a recipe is the official protocol: `rlrr-vtab:<task>` fills the official per-task lr /
drop-path / weight decay / flip, `efft1-vtab:<task>` and `efft2-vtab:<task>` the authors' per-task
rank / scale / init, `rlrr-fgvc:<dataset>` the official FGVC settings, each with the official code's
schedule (timm's per-epoch cosine; warm restarts for CUB and Dogs), cool-down, last partial batch and
evaluation cadence.
"""

from __future__ import annotations

from typing import Any

from vitfold.errors import VitfoldError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# RLRR official VTAB-1k: AdamW, batch 32, 100 epochs, 10 warm-up epochs from 1e-7, min lr 1e-8,
# mean = std = 0.5; weight decay skipped for names containing "bias" or "norm"; drop path is the official
# model's operator: nn.Dropout on each residual branch of its ViT (the per-task rates were tuned for that
# operator), timm's per-sample DropPath in its Swin ("official" resolves it per family).
RLRR_TRAIN = {
    "batch_size": 32,
    "epochs": 100,
    "warmup_epochs": 10,
    "warmup_lr": 1e-7,
    "min_lr": 1e-8,
    "lr": 1e-3,
    "weight_decay": 5e-5,
    "drop_path": 0.1,
    "drop_path_mode": "official",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "hflip": False,
}
# The official RLRR loop: timm's create_scheduler (cosine, warmup_prefix False, stepped per epoch) with
# 10 cool-down epochs, the last partial batch kept, the test split scored every epoch.
RLRR_PROTOCOL = {"schedule": "epoch-cosine", "cooldown_epochs": 10, "drop_last": False, "eval_every": 1}
# EFFT: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up epochs from 1e-6, min lr 1e-5,
# ImageNet mean/std, no augmentation, drop_path 0.1.
EFFT_TRAIN = {
    "batch_size": 64,
    "epochs": 100,
    "warmup_epochs": 10,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "drop_path": 0.1,
    "drop_path_mode": "sample",  # timm's create_model(drop_path_rate=0.1)
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "hflip": False,
}
# The official EFFT loop (execute.py): timm CosineLRScheduler stepped per epoch, no cool-down, the last
# partial batch dropped, the test split scored every 10 epochs.
EFFT_PROTOCOL = {"schedule": "epoch-cosine", "cooldown_epochs": 0, "drop_last": True, "eval_every": 10}
METHOD_TRAIN = {"rlrr": RLRR_TRAIN, "efft1": EFFT_TRAIN, "efft2": EFFT_TRAIN}

# task: (lr, drop_path, weight_decay, horizontal flip)
RLRR_VTAB = {
    "caltech101": (1e-3, 0.1, 5e-5, False),
    "cifar": (3e-3, 0.1, 5e-5, False),
    "dtd": (2e-3, 0.1, 5e-5, True),
    "oxford_flowers102": (3e-3, 0.3, 5e-2, False),
    "oxford_iiit_pet": (1e-3, 0.1, 5e-5, True),
    "svhn": (5e-3, 0.3, 5e-5, False),
    "sun397": (1e-3, 0.1, 5e-5, False),
    "patch_camelyon": (3e-3, 0.3, 5e-2, True),
    "eurosat": (1e-3, 0.1, 5e-5, True),
    "resisc45": (3e-3, 0.0, 5e-5, False),
    "diabetic_retinopathy": (5e-3, 0.1, 5e-5, True),
    "clevr_count": (5e-3, 0.5, 5e-5, True),
    "clevr_dist": (1e-2, 0.2, 5e-5, True),
    "dmlab": (5e-3, 0.3, 5e-5, True),
    "kitti": (3e-3, 0.3, 5e-2, True),
    "dsprites_loc": (1e-2, 0.1, 5e-5, False),
    "dsprites_ori": (5e-3, 0.1, 5e-5, False),
    "smallnorb_azi": (5e-3, 0.3, 5e-2, False),
    "smallnorb_ele": (1e-3, 0.3, 5e-5, True),
}
# task: (rank, scale, init)
EFFT2_VTAB = {
    "cifar": (16, 1, "vv"),
    "caltech101": (32, 1, "vv"),
    "dtd": (8, 0.01, "vv"),
    "oxford_flowers102": (16, 10, "vv"),
    "oxford_iiit_pet": (16, 1, "vv"),
    "svhn": (32, 80, "vu"),
    "sun397": (16, 0.5, "vv"),
    "patch_camelyon": (32, 10, "vv"),
    "eurosat": (16, 100, "vv"),
    "resisc45": (16, 10, "vv"),
    "diabetic_retinopathy": (8, 1, "vv"),
    "clevr_dist": (32, 0.05, "vu"),
    "clevr_count": (32, 5, "vu"),
    "dmlab": (32, 10, "vu"),
    "kitti": (16, 10, "vv"),
    "dsprites_loc": (32, 30, "vv"),
    "dsprites_ori": (16, 10, "vu"),
    "smallnorb_azi": (32, 50, "vu"),
    "smallnorb_ele": (16, 10, "vu"),
}
EFFT1_VTAB = {
    "cifar": (8, 100, "v"),
    "caltech101": (32, 1, "u"),
    "dtd": (8, 10, "v"),
    "oxford_flowers102": (32, 1, "v"),
    "oxford_iiit_pet": (8, 100, "v"),
    "svhn": (32, 50, "u"),
    "sun397": (16, 50, "u"),
    "patch_camelyon": (32, 10, "u"),
    "eurosat": (16, 10, "v"),
    "resisc45": (32, 10, "v"),
    "diabetic_retinopathy": (16, 1, "u"),
    "clevr_dist": (32, 0.1, "v"),
    "clevr_count": (32, 5, "u"),
    "dmlab": (16, 100, "v"),
    "kitti": (8, 100, "v"),
    "dsprites_loc": (32, 50, "u"),
    "dsprites_ori": (16, 100, "u"),
    "smallnorb_azi": (32, 30, "v"),
    "smallnorb_ele": (32, 3, "u"),
}


# The released EFFT2 settings beyond ViT-B (Set_EFFT.py, execute.py): one setting for every task, scale 1,
# the zero factor V. ViT-L/H keep vitfold's per-layer cores (the reading that reproduces the ViT counts); the
# Swin settings reproduce the released code: one core per stage, ranks doubling per stage (these are the
# last stage's), FFN r2 = 2 r1. There is no Swin-T path in the released code, and no RLRR Swin recipe at all.
EFFT2_SIZES = {
    "vit-l": {"rank": 24, "scale": 1.0, "init": "vv"},
    "vit-h": {"rank": 32, "scale": 1.0, "init": "vv"},
    "swin-s": {"rank": 32, "ffn_rank": 32, "ffn_rank2": 64, "core": "shared", "scale": 1.0, "init": "vv"},
    "swin-b": {"rank": 32, "ffn_rank": 16, "ffn_rank2": 32, "core": "shared", "scale": 1.0, "init": "vv"},
    "swin-l": {"rank": 64, "ffn_rank": 64, "ffn_rank2": 128, "core": "shared", "scale": 1.0, "init": "vv"},
}

# RLRR official FGVC (train_fgvc.py, FGVCConfig.py): 50 + 10 epochs, the transform flips; dataset:
# (official folder, lr, drop_path, weight decay). CUB and Dogs train all 60 epochs on
# CosineAnnealingWarmRestarts(T_0=5, eta_min=0) from the full lr (no warm-up) instead of the cosine.
RLRR_FGVC = {
    "cub": ("CUB_200_2011", 3e-3, 0.1, 5e-2),
    "nabirds": ("NABirds", 5e-4, 0.3, 5e-2),
    "flowers": ("OxfordFlowers", 3e-3, 0.2, 5e-2),
    "cars": ("StanfordCars", 3e-3, 0.2, 5e-2),
    "dogs": ("StanfordDogs", 1e-4, 0.0, 5e-2),
}
FGVC_WARM_RESTARTS = {
    "schedule": "warm-restarts",
    "restart_epochs": 5,
    "epochs": 60,
    "cooldown_epochs": 0,
    "warmup_epochs": 0,
    "min_lr": 0.0,
}


# RLRR official FGVC with augmentation (train_fgvc_aug.py, "fellow SSF"): the FGVC per-dataset lr / drop path /
# weight decay, Mixup 0.8 / CutMix 1.0 (timm Mixup, mode batch, prob 1, switch 0.5) with label smoothing 0.1 and
# SoftTargetCrossEntropy, an EMA of the weights (decay 0.9998) that is evaluated (and here folded), and
# CosineAnnealingWarmRestarts(T_0=10, T_mult=2, eta_min=0) stepped per epoch over create_scheduler's
# 100 + 10 epochs, all of them on the restarts (cycles of 10, 20, 40, then 40 of an 80-epoch one).
FGVC_AUG = {
    "schedule": "warm-restarts",
    "restart_epochs": 10,
    "restart_mult": 2,
    "epochs": 110,
    "cooldown_epochs": 0,
    "warmup_epochs": 0,
    "min_lr": 0.0,
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "label_smoothing": 0.1,
    "ema_decay": 0.9998,
}


def method_train_defaults(method: str) -> dict[str, Any]:
    """The paper's training settings for `method` (RLRR's official recipe for the baselines)."""
    return dict(METHOD_TRAIN.get(method, RLRR_TRAIN))


# Which run each recipe family reproduces (`--print-plan` shows it). The two EFFT2 ViT-B families differ in
# the core alone: `efft2-vtab:<task>` is the paper's (per-layer cores, the parameter counts of its Table 1),
# `efft2-vtab-released:<task>` the released code's (one core shared by all blocks, on which the per-task
# rank / scale / init of its configs/EFFT2.json were tuned).
RECIPE_RUNS = {
    "rlrr-vtab": "the official RLRR VTAB-1k run (train_vtab.py, its per-task settings)",
    "rlrr-fgvc": "the official RLRR FGVC run (train_fgvc.py)",
    "rlrr-fgvc-aug": "the official RLRR FGVC run with augmentation (train_fgvc_aug.py: Mixup/CutMix, label "
    "smoothing, weight EMA, warm restarts T_0=10 T_mult=2); the EMA weights are folded",
    "efft1-vtab": "the paper's EFFT1 (no released code), the authors' per-task rank/scale/init",
    "efft2-vtab": "the paper's EFFT2: per-layer cores (core=layer) with the released per-task rank/scale/init",
    "efft2-vtab-released": "the released EFFT2 code: one core shared by all blocks (core=shared), its per-task "
    "rank/scale/init",
}


def recipe_run(name: str) -> str:
    """What the recipe `name` reproduces, in words."""
    family = name.partition(":")[0]
    if family.removeprefix("efft2-vtab-") in EFFT2_SIZES:
        return f"the released EFFT2 setting for {family.removeprefix('efft2-vtab-')} (one setting for every task)"
    return RECIPE_RUNS[family]


def resolve_recipe(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`rlrr-vtab:<task>` | `efft1-vtab:<task>` | `efft2-vtab:<task>` (the paper's per-layer cores) |
    `efft2-vtab-released:<task>` (the released shared core) | `efft2-vtab-<size>:<task>` (size: vit-l, vit-h,
    swin-s, swin-b, swin-l; the released setting for that backbone) | `rlrr-fgvc:<dataset>` |
    `rlrr-fgvc-aug:<dataset>` (train_fgvc_aug.py)
    -> (method, train values, method options)."""
    family, _, task = name.partition(":")
    tables = {"rlrr-vtab": RLRR_VTAB, "efft1-vtab": EFFT1_VTAB, "efft2-vtab": EFFT2_VTAB, "rlrr-fgvc": RLRR_FGVC}
    tables |= {"efft2-vtab-released": EFFT2_VTAB, "rlrr-fgvc-aug": RLRR_FGVC}
    tables |= {f"efft2-vtab-{size}": RLRR_VTAB for size in EFFT2_SIZES}  # every VTAB-1k task, one setting
    if family not in tables:
        raise VitfoldError(f"unknown recipe '{name}' (use {', '.join(f'{t}:<task>' for t in tables)})")
    table = tables[family]
    if task not in table:
        benchmark = "FGVC dataset" if family.startswith("rlrr-fgvc") else "VTAB-1k task"
        raise VitfoldError(f"recipe '{name}': unknown {benchmark} '{task}' (known: {', '.join(sorted(table))})")
    method = family.split("-")[0]
    train = method_train_defaults(method)
    if family.startswith("rlrr-fgvc"):
        _, lr, drop_path, weight_decay = table[task]
        train.update(RLRR_PROTOCOL, epochs=50, lr=lr, drop_path=drop_path, weight_decay=weight_decay, hflip=True)
        if family == "rlrr-fgvc-aug":
            train.update(FGVC_AUG)
        elif task in ("cub", "dogs"):
            train.update(FGVC_WARM_RESTARTS)
        return method, train, {}
    if method == "rlrr":
        lr, drop_path, weight_decay, hflip = table[task]
        train.update(RLRR_PROTOCOL, lr=lr, drop_path=drop_path, weight_decay=weight_decay, hflip=hflip)
        return method, train, {}
    train.update(EFFT_PROTOCOL)
    size = family.removeprefix("efft2-vtab").removeprefix("-")
    if size in EFFT2_SIZES:
        return method, train, dict(EFFT2_SIZES[size])
    rank, scale, init = table[task]
    core = {"core": "shared" if size == "released" else "layer"} if method == "efft2" else {}
    return method, train, {"rank": rank, "scale": float(scale), "init": init, **core}
