"""Shared test helpers: tiny ViTs, adapter randomisation, an error measure written here apart from the
code under test, a tiny run config, generated datasets in the VTAB-1k and FGVC layouts, and one way to
call the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent  # the repository root

# Tiny timm ViTs: (timm name, create kwargs). "vit" serves adapter tests (32x32 input, patch 8), "run" the
# tiny training runs (16x16 input, patch 4).
TINY_VITS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    "run": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2}),
}
TINY = TINY_VITS["vit"]
# A tiny timm Swin (v1): 32x32 input, widths 16/32/64/128, windows of 4 (stage 0 shifts them, with the mask)
TINY_SWIN: tuple[str, dict[str, Any]] = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 32, "embed_dim": 16, "depths": [2, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
)

# The tiny run's values are chosen so that a swap shows: a mean and a std that differ from each other and
# from channel to channel; digits 5-9, whose class names ("5" ... "9") are not their indices (0 ... 4); an
# evaluation split (225 images) larger than the int8 calibration count (CALIBRATION_SAMPLES, drawn from the
# 671 training images).
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)
CLASS_NAMES = ["5", "6", "7", "8", "9"]
CALIBRATION_SAMPLES = 64
TINY_RUN = {
    "backbone": TINY_VITS["run"][0],
    "backbone_kwargs": TINY_VITS["run"][1],
    "data": "digits:5-9",
    "method": "rlrr",
    "train": {"epochs": 1, "lr": 3e-3, "warmup_epochs": 0, "batch_size": 32, "mean": list(MEAN), "std": list(STD)},
    "export": {"calibration_samples": CALIBRATION_SAMPLES},
    "bench": {"roofline": False},  # the matmul peaks take ~10 s a bench at 1 thread: test_openvino measures them
}
QUIET = {"log": lambda _: None}


def make_vit(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def randomize_trainable(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Draw every trainable tensor (adapter and head) at random, away from any identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.double()
    return float((value.double() - ref).norm() / ref.norm())


def images(model: nn.Module, batch: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=g)


def copy_run(src: Path, dst: Path, without: tuple[str, ...] = ("triton",)) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


def vitfold_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m vitfold ARGS` in a subprocess, as a user runs it (text output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "vitfold", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def _class_image(path: Path, label: int, index: int) -> str:
    """A small RGB image whose colour says its class (learnable), varied a little per index."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 14), (90 * label % 256, 255 - 80 * label % 256, (7 * index) % 64)).save(path)
    return str(path)


def write_vtab(root: Path, sizes: dict[str, int], classes: int = 3) -> Path:
    """A VTAB-1k folder: `sizes` images per list (train800, val200, test; train800val200 is the first two),
    `relative/path label` lines, labels cycling over `classes`."""
    lines: dict[str, list[str]] = {}
    for split, n in sizes.items():
        lines[split] = []
        for i in range(n):
            name = f"images/{split}_{i}.png"
            _class_image(root / name, i % classes, i)
            lines[split].append(f"{name} {i % classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, listed in lines.items():
        (root / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return root


def write_fgvc(parent: Path, name: str, sizes: dict[str, int], classes: int = 3) -> Path:
    """An FGVC folder `parent/name` as the official loaders read it: {split}.json = {"relative/path": class id}
    for train, val, test (trainval = train + val), images under images/ (CUB_200_2011, NABirds) or the folder
    itself, class ids 10, 20, ... (not 0-based: the loader renumbers them)."""
    root = parent / name
    images = root / "images" if name in ("CUB_200_2011", "NABirds") else root
    splits: dict[str, dict[str, int]] = {}
    for split, n in sizes.items():
        splits[split] = {}
        for i in range(n):
            relative = f"{i % classes:03d}.class/{split}_{i}.jpg"
            _class_image(images / relative, i % classes, i)
            splits[split][relative] = 10 * (i % classes + 1)
    splits["trainval"] = {**splits["train"], **splits["val"]}
    for split, entries in splits.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root
