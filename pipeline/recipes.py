"""Published training recipes (RLRR paper §4.1, EFFT paper §4.1 and the authors' released settings), as
values for the run config.

Resolution order (later wins): the method's paper defaults, then `--recipe NAME`, then the config file,
then command-line flags. `rlrr-vtab:<task>` fills the official per-task lr / drop-path / weight decay /
flip; `efft1-vtab:<task>` and `efft2-vtab:<task>` the authors' per-task rank / scale / init.
"""

from __future__ import annotations

from typing import Any

from vitfold.errors import VitfoldError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# RLRR official VTAB-1k: AdamW, batch 32, 100 epochs, 10 warm-up epochs from 1e-7, min lr 1e-8,
# mean = std = 0.5; weight decay skipped for names containing "bias" or "norm".
RLRR_TRAIN = {
    "batch_size": 32,
    "epochs": 100,
    "warmup_epochs": 10,
    "warmup_lr": 1e-7,
    "min_lr": 1e-8,
    "lr": 1e-3,
    "weight_decay": 5e-5,
    "drop_path": 0.1,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "hflip": False,
}
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
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "hflip": False,
}
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


def method_train_defaults(method: str) -> dict[str, Any]:
    """The paper's training settings for `method` (RLRR's official recipe for the baselines)."""
    return dict(METHOD_TRAIN.get(method, RLRR_TRAIN))


def resolve_recipe(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`rlrr-vtab:<task>` | `efft1-vtab:<task>` | `efft2-vtab:<task>` -> (method, train values, method options)."""
    family, _, task = name.partition(":")
    tables = {"rlrr-vtab": RLRR_VTAB, "efft1-vtab": EFFT1_VTAB, "efft2-vtab": EFFT2_VTAB}
    if family not in tables:
        raise VitfoldError(f"unknown recipe '{name}' (use {', '.join(f'{t}:<task>' for t in tables)})")
    table = tables[family]
    if task not in table:
        raise VitfoldError(f"recipe '{name}': unknown VTAB-1k task '{task}' (known: {', '.join(sorted(table))})")
    method = family.removesuffix("-vtab")
    train = method_train_defaults(method)
    if method == "rlrr":
        lr, drop_path, weight_decay, hflip = table[task]
        train.update(lr=lr, drop_path=drop_path, weight_decay=weight_decay, hflip=hflip)
        return method, train, {}
    rank, scale, init = table[task]
    return method, train, {"rank": rank, "scale": float(scale), "init": init}
