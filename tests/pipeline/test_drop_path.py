"""RLRR's drop path is the official operator: `nn.Dropout(p_i)` on each residual branch
of block i, p_i rising linearly to the recipe's rate, against the official block written out here; the
identity in eval mode; timm's per-sample DropPath kept as `sample`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from vitfold.errors import VitfoldError
from vitfold.export.blocks import block_names
from vitfold.pipeline.config import load_config
from vitfold.pipeline.drop_path import BRANCHES, drop_path_operator, drop_path_rates
from vitfold.pipeline.models import build_backbone

from helpers import TINY_RUN

RATE = 0.4


def _backbone(mode: str, depth: int = 3):
    kwargs = {**TINY_RUN["backbone_kwargs"], "depth": depth}
    cfg = load_config(None, backbone=TINY_RUN["backbone"], backbone_kwargs=kwargs, train={"drop_path": RATE})
    cfg.train.drop_path_mode = mode
    return build_backbone(cfg)


def _official_block(block, x: torch.Tensor, p: float) -> torch.Tensor:
    """The official RLRRBlock.forward: x + Dropout(p)(attn(norm(x))), then the same for the MLP."""
    x = x + F.dropout(block.attn(block.norm1(x)), p, training=True)
    return x + F.dropout(block.mlp(block.norm2(x)), p, training=True)


def test_rlrr_recipes_and_defaults_use_the_official_operator():
    assert load_config(None, recipe="rlrr-vtab:clevr_count").train.drop_path_mode == "official"
    assert load_config(None, recipe="rlrr-fgvc:nabirds").train.drop_path_mode == "official"
    assert load_config(None, method="rlrr").train.drop_path_mode == "official"
    assert load_config(None, recipe="efft2-vtab:dtd").train.drop_path_mode == "sample"  # timm's drop_path_rate


SWIN_KW = {"img_size": 32, "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}


@pytest.mark.parametrize(
    ("backbone", "kwargs", "operator"),
    [
        (TINY_RUN["backbone"], TINY_RUN["backbone_kwargs"], nn.Dropout),  # the official RLRR ViT: nn.Dropout
        ("swin_tiny_patch4_window7_224", SWIN_KW, DropPath),  # its models/swin.py: timm's DropPath
    ],
    ids=["vit-elementwise", "swin-per-sample"],
)
def test_rlrr_drop_path_is_the_official_models_operator_per_family(backbone, kwargs, operator):
    cfg = load_config(None, backbone=backbone, backbone_kwargs=kwargs, recipe="rlrr-vtab:clevr_count")
    model = build_backbone(cfg)
    branches = [getattr(model.get_submodule(name), b) for name in block_names(model) for b in BRANCHES]
    assert all(isinstance(m, operator) for m in branches[2:]), branches  # the first block's rate is 0
    assert isinstance(branches[0], nn.Identity) and drop_path_rates(model)[-1] == pytest.approx(0.5)  # the recipe's
    other = nn.Dropout if operator is DropPath else DropPath
    assert not any(isinstance(m, other) for m in branches)


def test_swin_rlrr_config_plan_shows_per_sample_drop_path():
    """The shipped Swin RLRR config's resolved operator (the plan lists it from the built model)."""
    from vitfold.pipeline.config import config_file

    cfg = load_config(config_file("swinb_in22k_rlrr_vtab_dtd"), backbone="swin_tiny_patch4_window7_224")
    cfg.backbone_kwargs, cfg.pretrained = SWIN_KW, False
    model = build_backbone(cfg)
    assert cfg.train.drop_path_mode == "official" and drop_path_operator(model) == "sample"


def test_elementwise_drop_path_is_the_official_dropout_in_training():
    model = _backbone("elementwise").train()
    rates = [RATE * i / 2 for i in range(3)]  # torch.linspace(0, rate, depth), the official dpr
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 17, model.embed_dim, generator=g)
    for block, p in zip(model.blocks, rates, strict=True):
        torch.manual_seed(1)
        got = block(x)
        torch.manual_seed(1)
        expected = _official_block(block, x, p)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # element-wise: within one sample some elements of the attention branch are dropped and others kept
    block, p = model.blocks[2], rates[2]
    branch = block.attn(block.norm1(x))
    torch.manual_seed(2)
    dropped = (block.drop_path1(branch) == 0) & (branch != 0)
    per_sample = dropped.flatten(1).float().mean(1)
    assert bool(((per_sample > 0) & (per_sample < 1)).all())
    assert abs(float(dropped.float().mean()) - p) < 0.05


def test_sample_drop_path_drops_whole_samples():
    model = _backbone("sample").train()
    block = model.blocks[2]
    x = torch.randn(256, 17, model.embed_dim)
    branch = block.attn(block.norm1(x))
    torch.manual_seed(3)
    dropped = (block.drop_path1(branch) == 0).flatten(1).float().mean(1)
    assert set(dropped.tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("mode", ["elementwise", "sample"])
def test_drop_path_is_the_identity_in_eval_mode(mode):
    model = _backbone(mode).eval()
    x = torch.randn(3, 17, model.embed_dim)
    for block in model.blocks:
        expected = x + block.attn(block.norm1(x))
        expected = expected + block.mlp(block.norm2(expected))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_drop_path_rate_in_backbone_kwargs_is_refused():
    with pytest.raises(VitfoldError, match=r"backbone_kwargs.drop_path_rate: set train.drop_path"):
        load_config(None, backbone_kwargs={"drop_path_rate": 0.2})
