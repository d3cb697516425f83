"""Shared test helpers: small ViTs, adapter randomisation, and an error measure written here, apart
from the code under test."""

from __future__ import annotations

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
