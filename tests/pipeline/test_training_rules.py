"""Training as the official code trains: the optimizer's weight-decay groups
and the new head's initialisation per method, each against the official rule written out here."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import vitfold
from vitfold.pipeline.training import make_optimizer

from helpers import TINY, make_vit


def _groups(model) -> dict[str, float]:
    """name -> weight decay of the optimizer group that holds it."""
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, weight_decay=0.05)
    return {names[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def _official_rlrr_exempt(name: str) -> bool:
    """The official RLRR groups, by what each tensor is: the linear shifts (official `shift_bias`) and the
    SSF after norm1, norm2 and the final norm are not decayed, nor is the head bias; the two scale vectors,
    the patch-token SSF and the head weight are."""
    if re.fullmatch(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.f", name):
        return True
    if re.fullmatch(r"(blocks\.\d+\.norm[12]|norm)\.(scale|shift)", name):
        return True
    return name == "head.bias"


@pytest.fixture(scope="module")
def vit():
    name, kwargs = TINY
    return make_vit(name, **kwargs)


def test_rlrr_groups_are_the_official_ones(vit):
    groups = _groups(vitfold.adapt(copy.deepcopy(vit), "rlrr", num_classes=5))
    assert any(n.endswith(".f") for n in groups) and "patch_embed.proj.scale" in groups
    for name, decay in groups.items():
        assert decay == (0.0 if _official_rlrr_exempt(name) else 0.05), name


@pytest.mark.parametrize("method", ["efft1", "efft2"])
def test_efft_decays_every_trainable_tensor_the_head_bias_included(vit, method):
    groups = _groups(vitfold.adapt(copy.deepcopy(vit), method, rank=4, num_classes=5))
    assert "head.bias" in groups and all(decay == 0.05 for decay in groups.values())


def test_the_new_head_is_zero_for_rlrr_and_timm_random_for_efft(vit):
    torch.manual_seed(0)
    rlrr = vitfold.adapt(copy.deepcopy(vit), "rlrr", num_classes=5)
    assert not rlrr.head.weight.any() and not rlrr.head.bias.any()
    for method in ("efft1", "efft2"):
        head = vitfold.adapt(copy.deepcopy(vit), method, rank=4, num_classes=5).head
        bound = 1 / math.sqrt(head.in_features)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        assert head.weight.shape == (5, vit.embed_dim) and head.weight.dtype == vit.head.weight.dtype
        assert head.weight.abs().max() <= bound and head.weight.std() > bound / 4, method
        assert head.bias.abs().max() <= bound and head.bias.any() and head.weight.requires_grad


def _zero_columns(delta: torch.Tensor) -> set[int]:
    """Input features (nn.Linear columns) whose whole column of the delta is zero."""
    return set(torch.nonzero(delta.abs().sum(0) == 0).flatten().tolist())


def _zero_rows(delta: torch.Tensor) -> set[int]:
    return _zero_columns(delta.T)


def test_efft2_dropout_draws_masks_per_block_and_per_mlp_layer(vit):
    """Rank 1: a dropped entry of the d-side factor zeroes one whole input column of a delta, so the
    zero columns show each mask. The official code: a mask per block for the attention factors (the same
    for q, k, v, o), separate masks for the fc1 and fc2 deltas."""
    model = vitfold.adapt(copy.deepcopy(vit), "efft2", rank=1, dropout=0.1, num_classes=5)
    with torch.no_grad():
        for p in model.efft.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # every factor entry away from zero
    d = vit.embed_dim
    for seed in range(200):  # a draw in which no core entry is dropped (rank 1: a dropped core zeroes a delta)
        torch.manual_seed(seed)
        deltas = model.efft.linear_deltas(dropout=True)
        attention = [[*deltas["attn.qkv"][b].split(d), deltas["attn.proj"][b]] for b in (0, 1)]  # q, k, v, o
        if all(t.any() for ts in [*attention, deltas["mlp.fc1"], deltas["mlp.fc2"]] for t in ts):
            break
    masks = [{frozenset(_zero_columns(t)) for t in ts} for ts in attention]
    assert len(masks[0]) == len(masks[1]) == 1  # q, k, v and o of a block share the block's mask
    assert masks[0] != masks[1] and all(next(iter(m)) for m in masks)  # block 1 drew its own, non-empty
    fc1, fc2 = deltas["mlp.fc1"][0], deltas["mlp.fc2"][0]  # [h, d] and [d, h]: U2 sits on the d side of both
    assert _zero_columns(fc1) and _zero_rows(fc2) and _zero_columns(fc1) != _zero_rows(fc2)
    model.efft.eval()
    assert all(not _zero_columns(t) for t in model.efft.linear_deltas(dropout=False)["attn.qkv"])
