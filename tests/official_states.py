"""Checkpoints in the official codes' layouts, built here for the tests that import them: a tiny timm ViT's
state dict after the official EFFT code's `set_ViT_EFFT` (tests/pipeline/official, tests/faults)."""

from __future__ import annotations

import torch

from helpers import TINY_VITS, make_vit

NAME, KWARGS = TINY_VITS["run"]  # 16x16 input, patch 4, depth 2, width 192, 3 heads
CLASSES, DEPTH, HEADS, PATCH = 5, 2, 3, 4
Tensor = torch.Tensor

SCALE, RANK = 0.7, 4


def official_efft_state(per_layer: bool, seed: int = 4) -> dict[str, Tensor]:
    """The `model_state_dict` of a timm ViT after set_ViT_EFFT: backbone, new head, root factors (shared core
    [r, r, 4] / [r, r, 2], or per-layer [r, r, 4L] / [r, r, 2L]) and their per-block aliases."""
    g = torch.Generator().manual_seed(seed)
    state = dict(make_vit(NAME, **KWARGS).state_dict())
    layers = DEPTH if per_layer else 1
    shapes = {"u1": (192, RANK), "v1": (RANK, 192), "c1": (RANK, RANK, 4 * layers)}
    shapes |= {"u2": (192, RANK), "v2": (RANK, 768), "c2": (RANK, RANK, 2 * layers)}
    factors = {f"EFFT{k}": 0.3 * torch.randn(*shape, generator=g) for k, shape in shapes.items()}
    state |= factors | {
        "head.weight": 0.3 * torch.randn(CLASSES, 192, generator=g),
        "head.bias": torch.randn(CLASSES, generator=g),
    }
    for i in range(DEPTH):
        for module, n in (("attn", "1"), ("mlp", "2")):
            state |= {f"blocks.{i}.{module}.EFFT{f}": factors[f"EFFT{f}{n}"] for f in "uvc"}
    return state
