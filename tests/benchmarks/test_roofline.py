"""benchmarks/roofline.py counts a ViT's FLOPs with its attention: against the count written out here."""

from __future__ import annotations

import importlib.util

import torch

from helpers import ROOT, TINY, make_vit

ROOFLINE = ROOT / "benchmarks" / "roofline.py"


def _roofline():
    spec = importlib.util.spec_from_file_location("roofline", ROOFLINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vit_flops(batch: int, image: int, patch: int, dim: int, depth: int, classes: int, mlp: int = 4) -> int:
    """2 FLOPs per multiply-add: patch conv, then per block qkv, q·kᵀ, attention·v, proj, fc1, fc2; head."""
    tokens = (image // patch) ** 2 + 1  # + the class token
    patch_embed = 2 * (image // patch) ** 2 * (3 * patch * patch) * dim
    block = 2 * tokens * dim * (3 * dim + dim + 2 * mlp * dim) + 2 * 2 * tokens * tokens * dim
    return batch * (patch_embed + depth * block + 2 * dim * classes)


def test_forward_flops_count_every_matmul_attention_included():
    name, kwargs = TINY
    model = make_vit(name, **kwargs)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    expected = _vit_flops(2, kwargs["img_size"], kwargs["patch_size"], 192, kwargs["depth"], model.num_classes)
    assert _roofline().forward_flops(model, x) == expected
