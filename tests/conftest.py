"""Shared test helpers: small ViTs, adapter randomisation, and an error measure written here, apart
from the code under test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

# Backbones of the fold matrix: (timm name, create kwargs). The ViT-B case is the real architecture.
TINY = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2})


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


@pytest.fixture
def tiny_vit() -> nn.Module:
    name, kwargs = TINY
    return make_vit(name, **kwargs)


TINY_RUN = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2},
    "data": "digits:0-4",
    "method": "rlrr",
    "train": {"epochs": 1, "lr": 3e-3, "warmup_epochs": 0, "batch_size": 32},
}
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """A tiny RLRR run trained one epoch, folded, and exported to onnx, torchscript and aoti (+ triton).
    Read-only for tests: copy it with `copy_run` before changing anything."""
    from export.stage import export_stage
    from pipeline.config import load_config
    from pipeline.fold_stage import fold_stage
    from pipeline.train import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, **{k: v for k, v in TINY_RUN.items() if k != "train"}, train=TINY_RUN["train"])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    train(load_config(run_dir / "config.yaml"), run_dir, **QUIET)
    fold_stage(run_dir, **QUIET)
    export_stage(run_dir, ["onnx", "torchscript", "aoti"], triton_dir=run_dir / "triton", **QUIET)
    return run_dir


def copy_run(src: Path, dst: Path, without: tuple[str, ...] = ("triton",)) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst
