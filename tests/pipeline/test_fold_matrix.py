"""Fold exactness over one matrix of adapter methods x backbones (ViT, DeiT, Swin), against folds written
out from the papers' formulas in `reference_folds.py` (not vitfold's fold code).

Each case: random base weights, every adapter and head tensor drawn at random (non-identity), batch
sizes 1 and 4. A new adapter method is one row here plus its reference fold.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import vitfold
from vitfold.pipeline.backbones import add_missing_biases

from helpers import images, make_vit, randomize_trainable, rel
from reference_folds import reference_fold

VIT_B = ("vit_base_patch16_224", (("depth", 3),))  # ViT-B: its width, heads, MLP and 224² input; 3 of its 12 blocks
TINY_KW = (("img_size", 32), ("patch_size", 8))
SLOW = pytest.mark.slow
EFFT_OPTS = (("rank", 8), ("scale", 0.7))
# a small Swin: widths 16/32/64/128, 8x8 tokens in windows of 4 (stage 0 shifts its windows, with the mask)
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = (
    ("img_size", 32),
    ("embed_dim", 16),
    ("depths", (2, 1, 2, 1)),
    ("num_heads", (1, 2, 2, 4)),
    ("window_size", 4),
)

# id -> (method, options, backbone, create kwargs, new head classes). Heads of >= 100 classes, so that the
# float32 error of a batch is a statistic (the 1.5x bar is noise over a dozen logits).
CASES = {
    "rlrr-vit_base": pytest.param(("rlrr", (), *VIT_B, 1000), marks=SLOW),
    "rlrr-deit_small": ("rlrr", (), "deit_small_patch16_224", (), 100),
    "rlrr-vit_small_img96_patch8": ("rlrr", (), "vit_small_patch16_224", (("img_size", 96), ("patch_size", 8)), 100),
    "rlrr-tiny_avgpool_fc_norm": (
        "rlrr",
        (),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 2), ("global_pool", "avg")),
        100,
    ),
    "rlrr-tiny_reg_tokens": (
        "rlrr",
        (),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 3), ("reg_tokens", 2), ("no_embed_class", True)),
        100,
    ),
    # ablation switches (RLRR Table 6, EFFT Table 4), each folding exactly
    "rlrr-left-tiny": ("rlrr", (("scales", "left"),), "vit_tiny_patch16_224", TINY_KW + (("depth", 2),), 100),
    "rlrr-right-tiny": ("rlrr", (("scales", "right"),), "vit_tiny_patch16_224", TINY_KW + (("depth", 2),), 100),
    "rlrr-no_residual-tiny": ("rlrr", (("residual", False),), "vit_tiny_patch16_224", TINY_KW + (("depth", 2),), 100),
    "rlrr-right_no_residual-tiny": (
        "rlrr",
        (("scales", "right"), ("residual", False)),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 2),),
        100,
    ),
    "efft1-attention-tiny": (
        "efft1",
        EFFT_OPTS + (("targets", "attention"),),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 3),),
        100,
    ),
    "efft1-ffn-tiny": (
        "efft1",
        EFFT_OPTS + (("targets", "ffn"),),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 3),),
        100,
    ),
    "efft2-attention-tiny": (
        "efft2",
        EFFT_OPTS + (("targets", "attention"),),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 3),),
        100,
    ),
    "efft2-ffn-tiny": (
        "efft2",
        EFFT_OPTS + (("targets", "ffn"),),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 3),),
        100,
    ),
    "efft1-vit_base": pytest.param(("efft1", (("rank", 32), ("scale", 0.7)), *VIT_B, 1000), marks=SLOW),
    "efft1-tiny_depth5": (
        "efft1",
        EFFT_OPTS + (("init", "u"),),
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 5),),
        100,
    ),
    "lora-tiny_depth3": ("lora", (("rank", 4), ("alpha", 6.0)), "vit_tiny_patch16_224", TINY_KW + (("depth", 3),), 100),
    "full-tiny": ("full", (), "vit_tiny_patch16_224", TINY_KW + (("depth", 2),), 100),
    "efft2-vit_base": pytest.param(("efft2", (("rank", 32), ("scale", 0.7)), *VIT_B, 1000), marks=SLOW),
    "efft2-small_depth3": (
        "efft2",
        EFFT_OPTS + (("init", "vu"),),
        "vit_small_patch16_224",
        TINY_KW + (("depth", 3),),
        100,
    ),
    "rlrr-deit_distilled": ("rlrr", (), "deit_tiny_distilled_patch16_224", TINY_KW + (("depth", 2),), 100),
    "rlrr-swin": ("rlrr", (), SWIN, SWIN_KW, 100),
    "rlrr-swin-reduction_shift": ("rlrr", (("reduction_shift", True),), SWIN, SWIN_KW, 100),
    "efft1-swin": ("efft1", EFFT_OPTS, SWIN, SWIN_KW, 100),
    "efft2-swin": ("efft2", EFFT_OPTS + (("ffn_rank2", 16),), SWIN, SWIN_KW, 100),
    "efft2-swin-shared_core": (
        "efft2",
        EFFT_OPTS + (("core", "shared"), ("ffn_rank2", 16)),
        SWIN,
        SWIN_KW,
        100,
    ),
    "efft1-tiny-shared_core": ("efft1", EFFT_OPTS + (("core", "shared"),), "vit_tiny_patch16_224", TINY_KW, 100),
    "lora-swin": ("lora", (("rank", 4), ("alpha", 6.0)), SWIN, SWIN_KW, 100),
    "efft2-tiny_mlp_ratio2": (
        "efft2",
        EFFT_OPTS,
        "vit_tiny_patch16_224",
        TINY_KW + (("depth", 2), ("mlp_ratio", 2.0)),
        100,
    ),
}


@lru_cache(maxsize=1)
def built(method: str, options: tuple, name: str, kwargs: tuple, num_classes: int):
    base = make_vit(name, **dict(kwargs))
    adapted = vitfold.adapt(copy.deepcopy(base), method, num_classes=num_classes, **dict(options))
    randomize_trainable(adapted, std=0.05)
    folded = vitfold.fold(adapted).eval()
    reference = make_vit(name, num_classes=num_classes, **dict(kwargs)).double()
    expected = reference_fold(adapted, method, dict(options))
    add_missing_biases(reference.double(), expected)  # RLRR's Swin reduction shifts: biases timm lacks
    reference.load_state_dict(expected, strict=True)
    base.reset_classifier(num_classes)  # the base with a head of the right size, for the "differs" check
    heads = {k: v for k, v in adapted.state_dict().items() if k.startswith(("head.", "head_dist."))}
    assert not base.load_state_dict(heads, strict=False).unexpected_keys
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
        # no worse than float32's own error of the unmerged model: a ratio of two rounding errors, which
        # reached 1.50 at batch 1 (efft1-tiny_depth5), so 2x; the weights' bar below is the tight one
        assert rel(y_folded, y64) <= 2.0 * rel(y_adapted, y64), f"batch {batch}"
    expected = reference.state_dict()
    for key, value in folded.state_dict().items():
        # each folded tensor is the float64 fold rounded once to float32 (unit roundoff 6e-8; measured
        # 2.5-2.8e-8 in every case): a fold computed in lower precision, or a term dropped, is far above
        error = (value.double() - expected[key].double()).norm()
        assert error <= 1e-7 * expected[key].double().norm(), key  # a zero tensor stays exactly zero


PLAIN_CASES = [
    "rlrr-deit_small",
    "rlrr-vit_small_img96_patch8",
    "efft1-tiny_depth5",
    "efft2-small_depth3",
    "rlrr-swin",
    "efft2-swin",
    "lora-swin",
]


@pytest.mark.parametrize("case", [CASES[c] for c in PLAIN_CASES], ids=PLAIN_CASES)
def test_folded_model_is_plain_timm_and_loads_strictly(case):
    _, _, name, kwargs, num_classes = case
    _, adapted, folded, _ = built(*case)
    fresh = make_vit(name, seed=123, num_classes=num_classes, **dict(kwargs))
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(folded.state_dict(), strict=True)
    x = images(adapted, 2)
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))
    assert type(folded) is type(fresh)
    assert not any(isinstance(m, vitfold.pipeline.adapters.AdapterModule) for m in folded.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules()), "adapter hooks left"
    assert not hasattr(folded, "vitfold_adapter")
    assert all(p.requires_grad for p in folded.parameters())


METHOD_OPTIONS = {
    "rlrr": {},
    "efft1": {"rank": 4, "scale": 0.7},
    "efft2": {"rank": 4, "scale": 0.7},
    "lora": {"rank": 4, "alpha": 6.0},
    "full": {},
}


def _tiny_adapted(method: str, dtype: torch.dtype = torch.float32, num_classes: int | None = 3) -> torch.nn.Module:
    model = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).to(dtype)
    adapted = vitfold.adapt(model, method, num_classes=num_classes, **METHOD_OPTIONS[method])
    randomize_trainable(adapted, std=0.3)
    return adapted


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_fold_leaves_adapted_model_untouched(method):
    adapted = _tiny_adapted(method)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    vitfold.fold(adapted)
    after = adapted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapted._forward_hooks or not method.startswith("efft"), "the adapted model lost its hooks"


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_fold_is_computed_in_float64_then_cast(method):
    """bf16 weights: every folded weight equals the float64 formula rounded once to bf16."""
    adapted = _tiny_adapted(method, dtype=torch.bfloat16, num_classes=None)
    expected = reference_fold(adapted, method, METHOD_OPTIONS[method])
    folded = vitfold.fold(adapted).state_dict()
    for key in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "blocks.1.norm2.weight", "norm.bias"):
        assert folded[key].dtype == torch.bfloat16
        assert torch.equal(folded[key], expected[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_timm_reparameterize_model_folds_through_fuse(method):
    from timm.utils.model import reparameterize_model

    adapted = _tiny_adapted(method).eval()
    fused = reparameterize_model(adapted)
    assert not any(isinstance(m, vitfold.pipeline.adapters.AdapterLayer) for m in fused.modules())
    folded = vitfold.fold(adapted)
    x = images(adapted, 2)
    with torch.no_grad():
        assert rel(fused(x), adapted(x)) <= 1e-5
        assert torch.equal(fused(x), folded(x))


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [  # trainable adapter tensors of a depth-2 ViT (d = 192, MLP h = 768), head excluded, counted from the papers
        # RLRR per block: qkv 3 x 3d, proj 3d, fc1 2h + d, fc2 2d + h, norm SSF 4d; + patch and final SSF 4d.
        # One side alone drops s_out (3d + d + h + d) or s_in (3d + d + d + h): 5d + h either way
        ("rlrr", {}, 2 * (19 * 192 + 3 * 768) + 4 * 192),
        ("rlrr", {"scales": "left"}, 2 * (14 * 192 + 2 * 768) + 4 * 192),
        ("rlrr", {"scales": "right"}, 2 * (14 * 192 + 2 * 768) + 4 * 192),
        ("efft2", {"rank": 4, "targets": "attention"}, 2 * 192 * 4 + 4 * 2 * 16),
        ("efft2", {"rank": 4, "targets": "ffn"}, 192 * 4 + 4 * 768 + 2 * 2 * 16),
        ("efft1", {"rank": 4, "targets": "attention"}, 4 * 192 * 4 + 192 * 4 + 2 * 16),
        ("efft1", {"rank": 4, "targets": "ffn"}, 4 * 192 * 4 + 192 * 4 + 2 * 2 * 16),
    ],
)
def test_ablations_train_only_their_tensors(method, options, expected):
    """RLRR left/right: s_in (left) or s_out (right) alone, per qkv block s_in [3, d]; EFFT attention/ffn: the
    other layers stay plain nn.Linear and their factors are not created (EFFT1: 1 or 2 core slices per block)."""
    model = vitfold.adapt(make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), method, **options)
    assert vitfold.parameter_counts(model)["adapter_params"] == expected
    layers = [n for n, m in model.named_modules() if isinstance(m, vitfold.pipeline.adapters.AdapterLayer)]
    wrapped = {n.split(".", 2)[2] for n in layers if n.startswith("blocks.")}
    if options.get("targets") == "attention":
        assert {"attn.qkv", "attn.proj"} <= wrapped and not wrapped & {"mlp.fc1", "mlp.fc2"}
    if options.get("targets") == "ffn":
        assert {"mlp.fc1", "mlp.fc2"} <= wrapped and not wrapped & {"attn.qkv", "attn.proj"}
