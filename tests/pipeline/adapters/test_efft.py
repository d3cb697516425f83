"""EFFT1 / EFFT2 specifics: counts, factors stored once, per-layer cores, dropout, step-0 identity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import vitfold
from vitfold.cli import main
from vitfold.errors import AdapterError, FoldError
from vitfold.pipeline.adapters.efft import SharedFactors

from helpers import images, make_vit, randomize_trainable, rel

SMALL = {"img_size": 32, "patch_size": 8, "depth": 5}  # vit_tiny: d = 192, h = 768, L = 5
FACTORS = {"efft1": ("U", "V", "core"), "efft2": ("U1", "V1", "C1", "U2", "V2", "C2")}


def _small(method: str, seed: int = 0, **options) -> torch.nn.Module:
    return vitfold.adapt(make_vit("vit_tiny_patch16_224", seed=seed, **SMALL), method, num_classes=10, **options)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("efft1", 3 * 12 * 32 * 32 + 4 * 768 * 32 + 768 * 32),  # Σ 3L×r×r, U 4d×r, V d×r: 159,744
        ("efft2", 768 * 32 * 2 + 32 * 32 * 48 + 768 * 32 + 32 * 3072 + 32 * 32 * 24),  # 245,760
    ],
)
def test_info_counts_match_the_paper(method, expected):
    args = ["info", "--backbone", "vit_base_patch16_224", "--method", method, "--rank", "32", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {159744: "efft1", 245760: "efft2"}[expected] == method
    assert json.loads(result.output)["adapter_params"] == expected


@pytest.mark.parametrize("method", ["efft1", "efft2"])
def test_factors_are_stored_once(method):
    model = _small(method, rank=4)
    state = vitfold.adapter_state_dict(model)
    assert set(state) == {f"efft.{n}" for n in FACTORS[method]} | {"head.weight", "head.bias"}
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith("efft.")}
    if method == "efft1":
        assert shapes == {"efft.U": (768, 4), "efft.V": (192, 4), "efft.core": (15, 4, 4)}
    else:
        assert shapes == {
            "efft.U1": (192, 4),
            "efft.V1": (4, 192),
            "efft.C1": (4, 4, 20),
            "efft.U2": (192, 4),
            "efft.V2": (4, 768),
            "efft.C2": (4, 4, 10),
        }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state)


@pytest.mark.parametrize(("method", "init"), [("efft1", "v"), ("efft1", "u"), ("efft2", "vv"), ("efft2", "vu")])
def test_default_and_chosen_init_keep_the_base_function(method, init):
    base = make_vit("vit_tiny_patch16_224", **SMALL)
    adapted = vitfold.adapt(copy.deepcopy(base), method, rank=4, scale=3.0, init=init)
    x = images(base, 2)
    with torch.no_grad():
        assert rel(adapted(x), base(x)) <= 1e-6
    zero = {("efft1", "v"): ["V"], ("efft1", "u"): ["U"], ("efft2", "vv"): ["V1", "V2"], ("efft2", "vu"): ["V1", "U2"]}
    for name in FACTORS[method]:
        is_zero = not adapted.efft.get_parameter(name).any()
        assert is_zero == (name in zero[method, init]), name


# Block 3's slices of each core: EFFT1 Σ[9:12]; EFFT2 C1[:, :, 12:16] and C2[:, :, 6:8].
BLOCK3_SLICES = {
    "efft1": {"core": (slice(9, 12),)},
    "efft2": {"C1": (slice(None), slice(None), slice(12, 16)), "C2": (slice(None), slice(None), slice(6, 8))},
}


@pytest.mark.parametrize("method", ["efft1", "efft2"])
def test_only_block_3_changes_when_only_its_core_slice_is_nonzero(method):
    base = make_vit("vit_tiny_patch16_224", **SMALL)
    adapted = vitfold.adapt(copy.deepcopy(base), method, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.efft.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for name, index in BLOCK3_SLICES[method].items():
            core = adapted.efft.get_parameter(name)
            kept = core[index].clone()
            core.zero_()
            core[index] = kept
    folded = vitfold.fold(adapted).state_dict()
    before = base.state_dict()
    changed = {k for k in before if not torch.equal(before[k], folded[k])}
    assert changed == {f"blocks.3.{n}.weight" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


@pytest.mark.parametrize("method", ["efft1", "efft2"])
def test_deltas_are_built_once_per_forward(method, monkeypatch):
    model = _small(method, rank=4)
    randomize_trainable(model)
    calls = []
    original = SharedFactors.linear_deltas

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("dropout"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SharedFactors, "linear_deltas", counted)
    model.train()
    model(images(model, 2)).sum().backward()
    assert calls == [True], "each forward must build all deltas once, with dropout in training"
    model.eval()
    with torch.no_grad():
        model(images(model, 1))
    assert calls == [True, False]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.efft.parameters())


@pytest.mark.parametrize("method", ["efft1", "efft2"])
def test_dropout_acts_on_factors_in_training_only(method):
    model = make_vit("vit_tiny_patch16_224", **SMALL)  # eval mode
    adapted = vitfold.adapt(model, method, rank=4, dropout=0.5)
    assert not any(m.training for m in adapted.modules()), "adapt must keep the model's eval mode"
    randomize_trainable(adapted, std=0.5)
    x = images(adapted, 2)
    folded = vitfold.fold(adapted)
    with torch.no_grad():
        assert torch.equal(adapted(x), adapted(x))
        assert rel(folded(x), adapted(x)) <= 1e-5
        adapted.train()
        torch.manual_seed(0)
        a = adapted(x)
        b = adapted(x)
    assert rel(a, b) > 1e-3, "training forwards should draw new dropout masks on the factors"


@pytest.mark.parametrize(("method", "name"), [("efft1", "efft.core"), ("efft2", "efft.V2")])
def test_fold_refuses_nan_factor(method, name):
    model = _small(method, rank=4)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[1] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FoldError, match=f"'{name}'"):
        vitfold.fold(model)
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(3.0), after[k].nan_to_num(3.0)) for k in before)


def test_option_errors_name_the_option():
    with pytest.raises(AdapterError, match="'init' must be 'vv' or 'vu'"):
        _small("efft2", init="v")
    with pytest.raises(AdapterError, match="'init' must be 'u' or 'v'"):
        _small("efft1", init="vu")
    with pytest.raises(AdapterError, match="'rank' must be a positive integer"):
        _small("efft1", rank=0)
    with pytest.raises(AdapterError, match="'dropout'"):
        _small("efft2", dropout=1.5)
    narrow = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, mlp_ratio=2.0)
    with pytest.raises(AdapterError, match="blocks.0.mlp.fc1"):
        vitfold.adapt(narrow, "efft1")
