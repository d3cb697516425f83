"""RLRR fold exactness over a matrix of ViTs, against a fold written out here from REFERENCE §1.

Each case: random base weights, every adapter and head tensor drawn at random (non-identity), batch
sizes 1 and 4. The reference is a float64 timm model whose weights this file folds by the formulas
    W' = W ⊙ (1 + s_out s_inᵀ), b' = b + f;    SSF: W' = W ⊙ γ, b' = b ⊙ γ + β
without calling vitfold's fold code.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from conftest import images, make_vit, randomize_trainable, rel

import pipeline

CASES = {
    "vit_base_patch16_224": pytest.param(("vit_base_patch16_224", (), 1000), marks=pytest.mark.slow),
    "deit_small_patch16_224": ("deit_small_patch16_224", (), 100),
    "vit_small_img96_patch8": ("vit_small_patch16_224", (("img_size", 96), ("patch_size", 8)), 10),
    "tiny_avgpool_fc_norm": (
        "vit_tiny_patch16_224",
        (("img_size", 32), ("patch_size", 8), ("depth", 2), ("global_pool", "avg")),
        7,
    ),
    "tiny_reg_tokens_no_embed_class": (
        "vit_tiny_patch16_224",
        (("img_size", 32), ("patch_size", 4), ("depth", 3), ("reg_tokens", 2), ("no_embed_class", True)),
        3,
    ),
}


def reference_fold(adapted: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The folded float64 state_dict, computed from the adapter tensors by the paper's formulas."""
    sd = {k: v.detach().double() for k, v in adapted.state_dict().items()}
    out, used = {}, set()
    for key in [k for k in sd if k.endswith(".s_out")]:
        p = key[: -len(".s_out")]
        w, b, s_out, s_in, f = (sd[f"{p}.{n}"] for n in ("base.weight", "base.bias", "s_out", "s_in", "f"))
        s_in_rows = s_in.repeat_interleave(w.shape[0] // s_in.shape[0], dim=0)  # [out, in]: q, k, v rows
        out[f"{p}.weight"] = w * (1 + s_out[:, None] * s_in_rows)
        out[f"{p}.bias"] = b + f
        used |= {f"{p}.{n}" for n in ("base.weight", "base.bias", "s_out", "s_in", "f")}
    for key in [k for k in sd if k.endswith(".scale")]:
        p = key[: -len(".scale")]
        w, b, s, t = (sd[f"{p}.{n}"] for n in ("base.weight", "base.bias", "scale", "shift"))
        out[f"{p}.weight"] = w * s.view(-1, *[1] * (w.dim() - 1))
        out[f"{p}.bias"] = b * s + t
        used |= {f"{p}.{n}" for n in ("base.weight", "base.bias", "scale", "shift")}
    out.update({k: v for k, v in sd.items() if k not in used})
    return out


@lru_cache(maxsize=1)
def built(name: str, kwargs: tuple, num_classes: int):
    base = make_vit(name, **dict(kwargs))
    adapted = pipeline.adapt(copy.deepcopy(base), "rlrr", num_classes=num_classes)
    randomize_trainable(adapted, std=0.05)
    folded = pipeline.fold(adapted).eval()
    reference = make_vit(name, num_classes=num_classes, **dict(kwargs)).double()
    reference.load_state_dict(reference_fold(adapted), strict=True)
    base.reset_classifier(num_classes)  # the base with a head of the right size, for the "differs" check
    base.head.weight.data.copy_(adapted.head.weight.data)
    base.head.bias.data.copy_(adapted.head.bias.data)
    return base, adapted, folded, reference


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fold_is_exact(case):
    base, adapted, folded, reference = built(*case)
    adapted64 = copy.deepcopy(adapted).double()  # the unmerged model evaluated in float64
    for batch in (1, 4):
        x = images(adapted, batch)
        with torch.no_grad():
            y_base, y_adapted, y_folded = base(x), adapted(x), folded(x)
            y64, y_ref = adapted64(x.double()), reference(x.double())
        assert rel(y_adapted, y_base) >= 1e-2, "adapter is near identity: this test could not fail"
        assert rel(y_ref, y64) <= 1e-10, f"batch {batch}: unmerged forward disagrees with the paper's formulas"
        assert rel(y_folded, y_adapted) <= 1e-5, f"batch {batch}"
        assert rel(y_folded, y64) <= 1.5 * rel(y_adapted, y64), f"batch {batch}"


@pytest.mark.parametrize("case", list(CASES.values())[1:3], ids=list(CASES)[1:3])
def test_folded_state_dict_loads_into_fresh_timm_model(case):
    name, kwargs, num_classes = case
    _, adapted, folded, _ = built(*case)
    fresh = make_vit(name, seed=123, num_classes=num_classes, **dict(kwargs))
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(folded.state_dict(), strict=True)
    x = images(adapted, 2)
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))
    assert type(folded) is type(fresh)
    assert not any(isinstance(m, pipeline.adapters.AdapterLayer) for m in folded.modules())
    assert all(p.requires_grad for p in folded.parameters())


def test_fold_leaves_adapted_model_untouched(tiny_vit):
    adapted = pipeline.adapt(tiny_vit, "rlrr", num_classes=4)
    randomize_trainable(adapted)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    pipeline.fold(adapted)
    after = adapted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fold_is_computed_in_float64_then_cast():
    """bf16 weights: each folded weight equals the float64 formula rounded once to bf16."""
    model = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).to(torch.bfloat16)
    adapted = pipeline.adapt(model, "rlrr")
    randomize_trainable(adapted, std=0.3)
    qkv = adapted.blocks[0].attn.qkv
    w, s_out, s_in = (t.detach().double() for t in (qkv.base.weight, qkv.s_out, qkv.s_in))
    expected = (w * (1 + s_out[:, None] * s_in.repeat_interleave(w.shape[0] // 3, dim=0))).to(torch.bfloat16)
    folded = pipeline.fold(adapted).blocks[0].attn.qkv.weight
    assert folded.dtype == torch.bfloat16
    assert torch.equal(folded, expected)


def test_timm_reparameterize_model_folds_through_fuse(tiny_vit):
    from timm.utils.model import reparameterize_model

    adapted = pipeline.adapt(tiny_vit, "rlrr", num_classes=3)
    randomize_trainable(adapted)
    fused = reparameterize_model(adapted)
    assert not any(isinstance(m, pipeline.adapters.AdapterLayer) for m in fused.modules())
    folded = pipeline.fold(adapted)
    x = images(adapted, 2)
    with torch.no_grad():
        assert rel(fused(x), adapted(x)) <= 1e-5
        assert torch.equal(fused(x), folded(x))


def test_identity_init_keeps_base_function():
    base = make_vit("deit_small_patch16_224")
    adapted = pipeline.adapt(copy.deepcopy(base), "rlrr", init="identity")
    x = images(base, 2)
    with torch.no_grad():
        assert rel(adapted(x), base(x)) <= 1e-6


def test_paper_init_is_not_identity_and_matches_official_distributions():
    adapted = pipeline.adapt(make_vit("vit_small_patch16_224"), "rlrr")  # d = 384
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
