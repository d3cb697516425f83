"""RLRR specifics: the official initialisation and the identity option."""

from __future__ import annotations

import copy

import torch

import vitfold

from helpers import images, make_vit, rel


def test_identity_init_keeps_base_function():
    base = make_vit("deit_small_patch16_224")
    adapted = vitfold.adapt(copy.deepcopy(base), "rlrr", init="identity")
    x = images(base, 2)
    with torch.no_grad():
        assert rel(adapted(x), base(x)) <= 1e-6


def test_paper_init_is_not_identity_and_matches_official_distributions():
    adapted = vitfold.adapt(make_vit("vit_small_patch16_224"), "rlrr")  # d = 384
    fc1 = adapted.blocks[0].mlp.fc1  # in = 384, out = 1536
    assert fc1.s_in.abs().max() <= (6 / 384) ** 0.5 and fc1.s_in.abs().max() > 0.8 * (6 / 384) ** 0.5
    assert fc1.s_out.abs().max() <= 6**0.5 and fc1.s_out.abs().max() > 2.0
    assert torch.count_nonzero(fc1.f) == 0
    norm = adapted.blocks[0].norm1
    assert abs(norm.scale.mean().item() - 1) < 0.01 and 0.01 < norm.scale.std().item() < 0.03
    assert abs(norm.shift.mean().item()) < 0.01 and 0.01 < norm.shift.std().item() < 0.03
    x = images(adapted, 1)
    base = make_vit("vit_small_patch16_224")
    with torch.no_grad():
        assert rel(adapted(x), base(x)) > 1e-2
