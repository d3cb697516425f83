"""The PEFT-like library API: freezing, adapter state in and out, NaN refusal, input errors."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

import vitfold
from vitfold.errors import AdapterError, FoldError

from helpers import TINY, images, make_vit, randomize_trainable


def _adapted(seed: int = 0, num_classes: int | None = 4) -> torch.nn.Module:
    name, kwargs = TINY
    model = vitfold.adapt(make_vit(name, seed=seed, **kwargs), "rlrr", num_classes=num_classes)
    randomize_trainable(model, seed=seed + 10)
    return model


def test_only_adapter_and_new_head_train_and_step_changes_only_them():
    model = _adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(vitfold.adapter_state_dict(model))
    assert {"head.weight", "head.bias", "blocks.0.attn.qkv.s_in", "patch_embed.proj.scale", "norm.shift"} <= trainable
    assert not any(".base." in n or n in ("pos_embed", "cls_token") for n in trainable)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(images(model, 2)).logsumexp(-1).sum().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable


def test_adapter_state_dict_holds_only_adapter_and_head_and_round_trips():
    source, target = _adapted(seed=0), _adapted(seed=5)
    state = vitfold.adapter_state_dict(source)
    base_keys = set(timm.create_model(TINY[0], num_classes=4, **TINY[1]).state_dict())
    assert not set(state) & (base_keys - {"head.weight", "head.bias"})
    assert sum(t.numel() for t in state.values()) < 0.05 * sum(p.numel() for p in source.parameters())
    target.load_state_dict(  # same frozen backbone as the source, so only the adapter differs
        {k: v for k, v in source.state_dict().items() if k not in state}, strict=False
    )
    x = images(source, 3)
    with torch.no_grad():
        assert not torch.allclose(target(x), source(x))
        vitfold.load_adapter(target, state)
        assert torch.equal(target(x), source(x))


def test_load_adapter_rejects_mismatch_and_changes_nothing():
    model = _adapted()
    state = vitfold.adapter_state_dict(model)
    before = vitfold.adapter_state_dict(model)
    bad_shape = {**state, "blocks.0.attn.qkv.s_in": torch.zeros(1, 5)}
    with pytest.raises(AdapterError, match=r"blocks\.0\.attn\.qkv\.s_in.*\(1, 5\)"):
        vitfold.load_adapter(model, {k: v + 1 for k, v in bad_shape.items()})
    missing = {k: v for k, v in state.items() if k != "norm.scale"}
    with pytest.raises(AdapterError, match="missing 'norm.scale'"):
        vitfold.load_adapter(model, missing)
    with pytest.raises(AdapterError, match="unexpected key 'extra'"):
        vitfold.load_adapter(model, {**state, "extra": torch.zeros(1)})
    assert all(torch.equal(before[k], v) for k, v in vitfold.adapter_state_dict(model).items())


@pytest.mark.parametrize(
    "name", ["blocks.1.attn.qkv.s_in", "blocks.0.mlp.fc2.f", "patch_embed.proj.shift", "norm.scale", "head.weight"]
)
def test_fold_refuses_nan_naming_the_tensor_and_modifies_nothing(name):
    model = _adapted()
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FoldError, match=name.replace(".", r"\.")):
        vitfold.fold(model)
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)) for k in before)
    assert any(isinstance(m, vitfold.pipeline.adapters.AdapterLayer) for m in model.modules())


def test_adapter_fuse_refuses_inf():
    model = _adapted()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.s_out[3] = float("inf")
    with pytest.raises(FoldError, match="s_out"):
        model.blocks[0].mlp.fc1.fuse()


def test_bad_options_are_one_line_errors_naming_the_option(tiny_vit):
    with pytest.raises(AdapterError, match="unknown option 'rank'"):
        vitfold.adapt(copy.deepcopy(tiny_vit), "rlrr", rank=4)
    with pytest.raises(AdapterError, match="'init'.*'zeros'"):
        vitfold.adapt(copy.deepcopy(tiny_vit), "rlrr", init="zeros")
    with pytest.raises(AdapterError, match="unknown method 'lorax'"):
        vitfold.adapt(copy.deepcopy(tiny_vit), "lorax")
    with pytest.raises(AdapterError, match="num_classes"):
        vitfold.adapt(copy.deepcopy(tiny_vit), "rlrr", num_classes=0)
    adapted = vitfold.adapt(tiny_vit, "rlrr")
    with pytest.raises(AdapterError, match="already has a 'rlrr' adapter"):
        vitfold.adapt(adapted, "rlrr")
    with pytest.raises(AdapterError, match="no vitfold adapter"):
        vitfold.fold(make_vit(*TINY[:1], **TINY[1]))


def test_unsupported_layers_are_named():
    no_bias = make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, qkv_bias=False)
    with pytest.raises(AdapterError, match=r"'blocks\.0\.attn\.qkv' has no bias"):
        vitfold.adapt(no_bias, "rlrr")
    with pytest.raises(AdapterError, match="not a timm VisionTransformer|VisionTransformer"):
        vitfold.adapt(torch.nn.Sequential(torch.nn.Linear(2, 2)), "rlrr")


@pytest.mark.parametrize("method", ["rlrr", "efft2"])
def test_save_adapter_then_load_adapter_onto_a_plain_backbone(tmp_path, method):
    """PEFT-style: the file carries method, options and head; loading it onto a fresh timm model of the same
    shape attaches that adapter and reproduces the saved model's outputs."""
    from safetensors import safe_open

    name, kwargs = TINY
    options = {"rank": 3, "scale": 0.5} if method == "efft2" else {"init": "identity"}
    source = vitfold.adapt(make_vit(name, seed=0, **kwargs), method, num_classes=4, **options)
    randomize_trainable(source, seed=11)
    path = vitfold.save_adapter(source.eval(), tmp_path / "adapter.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["method"] == method and meta["vitfold_version"] == vitfold.__version__
    # what is known, nothing guessed: the architecture without a pretrained tag (these weights are random),
    # the size arguments the model was built with, and base weights of unknown identity
    assert meta["backbone"] == name and meta["num_classes"] == "4" and meta["base"] == "unknown"
    assert json.loads(meta["backbone_kwargs"]) == kwargs
    assert options.items() <= json.loads(meta["method_options"]).items()
    target = make_vit(name, seed=0, **kwargs)  # the same frozen weights, no adapter yet
    x = images(source, 3)
    with torch.no_grad():
        assert vitfold.load_adapter(target, path).eval()(x).equal(source(x))


def test_load_adapter_file_onto_another_backbone_names_the_tensor_and_changes_nothing(tmp_path):
    path = vitfold.save_adapter(_adapted(), tmp_path / "adapter.safetensors")
    name, kwargs = TINY
    other = make_vit(name, **{**kwargs, "embed_dim": 96})
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterError, match=r"'patch_embed\.proj\.scale' has shape \(192,\), the model needs \(96,\)"):
        vitfold.load_adapter(other, path)
    assert not hasattr(other, "vitfold_adapter") and other.get_classifier().out_features == 1000
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    efft = vitfold.adapt(make_vit(name, **kwargs), "efft2")
    with pytest.raises(AdapterError, match="holds a 'rlrr' adapter, the model has a 'efft2' one"):
        vitfold.load_adapter(efft, path)


@pytest.mark.parametrize(
    ("config", "method", "options"),
    [
        (lambda: vitfold.RLRRConfig(init="identity", scales="left"), "rlrr", {"init": "identity", "scales": "left"}),
        (lambda: vitfold.EFFT1Config(rank=3, scale=0.5), "efft1", {"rank": 3, "scale": 0.5}),
        (lambda: vitfold.EFFT2Config(rank=3, ffn_rank=5), "efft2", {"rank": 3, "ffn_rank": 5}),
        (lambda: vitfold.LoRAConfig(rank=2, alpha=4.0), "lora", {"rank": 2, "alpha": 4.0}),
        (lambda: vitfold.LinearConfig(), "linear", {}),
    ],
)
def test_a_typed_config_adapts_as_its_method_with_keyword_options(config, method, options):
    """`adapt(model, vitfold.EFFT2Config(...))` is `adapt(model, "efft2", **options)`: the same record and
    the same adapter tensors (EFFT2Config derives from EFFT1Config, and still means efft2)."""
    name, kwargs = TINY
    typed = vitfold.adapt(make_vit(name, seed=0, **kwargs), config(), num_classes=3)
    torch.manual_seed(0)
    keyword = vitfold.adapt(make_vit(name, seed=0, **kwargs), method, num_classes=3, **options)
    assert typed.vitfold_adapter.method == method
    assert typed.vitfold_adapter.options == keyword.vitfold_adapter.options
    assert options.items() <= typed.vitfold_adapter.options.items()
    mine, theirs = vitfold.adapter_state_dict(typed), vitfold.adapter_state_dict(keyword)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


def test_a_typed_config_is_validated_where_it_is_built_and_not_mixed_with_keywords(tiny_vit):
    with pytest.raises(AdapterError, match="option 'rank' must be a positive integer for method 'efft2'"):
        vitfold.EFFT2Config(rank=0)
    with pytest.raises(AdapterError, match="not both"):
        vitfold.adapt(tiny_vit, vitfold.RLRRConfig(), init="paper")
    with pytest.raises(AdapterError, match=r"^method: must be a method name or a method config .*got dict"):
        vitfold.adapt(tiny_vit, {"method": "rlrr"})
    assert not hasattr(tiny_vit, "vitfold_adapter")


def test_the_package_lists_its_public_names():
    import subprocess
    import sys

    code = "import vitfold, vitfold.export as e; print('adapt' in dir(vitfold), 'fold' in dir(vitfold), dir(e))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True True ")
    for name in ("export", "open_runner", "compare", "FORMATS"):
        assert repr(name) in out
    assert {"adapt", "fold", "save_adapter", "RLRRConfig", "EFFT2Config", "VitfoldError"} <= set(dir(vitfold))
