"""Shared test helpers: tiny ViTs, adapter randomisation, an error measure written here apart from the
code under test, a tiny run config, and one way to call the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

# Tiny timm ViTs: (timm name, create kwargs). "vit" serves adapter tests (32x32 input, patch 8), "run" the
# tiny training runs (16x16 input, patch 4).
TINY_VITS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    "run": ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 2}),
}
TINY = TINY_VITS["vit"]

TINY_RUN = {
    "backbone": TINY_VITS["run"][0],
    "backbone_kwargs": TINY_VITS["run"][1],
    "data": "digits:0-4",
    "method": "rlrr",
    "train": {"epochs": 1, "lr": 3e-3, "warmup_epochs": 0, "batch_size": 32},
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
