"""Swin (timm SwinTransformer v1): adapter placement and counts against the official code's, the RLRR
reduction shift and its loaders, per-stage EFFT factors, unsupported families, and a whole run (train,
fold, export ONNX/TorchScript/AOTInductor, verify at batch 1 and 8) with divergences named by Swin block.

Fold exactness of rlrr (both reduction settings), efft1, efft2 (per-layer and shared cores) and lora on
Swin is in the fold matrix (test_fold_matrix.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

import vitfold
from vitfold.errors import AdapterError
from vitfold.pipeline.backbones import load_folded

from helpers import images, make_vit, randomize_trainable, rel, vitfold_cli

SWIN = "swin_tiny_patch4_window7_224"
# widths 16/32/64/128, depths 1/1/2/1, 8x8 tokens in windows of 4 (stage 0 shifts its windows)
SWIN_KW = {"img_size": 32, "embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}
WIDTHS, DEPTHS = (16, 32, 64, 128), (1, 1, 2, 1)


def _info(*args: str) -> dict:
    result = vitfold_cli("info", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_rlrr_counts_on_swin_base_match_the_official_code():
    """RLRR's Swin code (REFERENCE §2b): 29C per block, the reductions' 4C + 2C scales (+ 2C shift), 2C final SSF:
    348,928 + 5,376 (+ 1,792) + 2,048 on swin_base (C = 128/256/512/1024, depths 2/2/18/2)."""
    widths, depths = (128, 256, 512, 1024), (2, 2, 18, 2)
    blocks = sum(29 * c * n for c, n in zip(widths, depths, strict=True))
    reductions = sum(4 * c + 2 * c for c in widths[:3])
    shifts = sum(2 * c for c in widths[:3])
    assert (blocks, reductions + shifts) == (348_928, 7_168)
    args = ("--backbone", "swin_base_patch4_window7_224", "--method", "rlrr")
    assert _info(*args)["adapter_params"] == blocks + reductions + 2 * 1024 == 356_352
    assert _info(*args, "-o", "reduction_shift=true")["adapter_params"] == 358_144


@pytest.mark.parametrize(
    ("backbone", "model_class"),
    [("convnext_atto", "ConvNeXt"), ("swinv2_tiny_window8_256", "SwinTransformerV2")],
)
def test_unsupported_family_is_one_line_naming_class_and_families(backbone, model_class):
    result = vitfold_cli("info", "--backbone", backbone, "--method", "rlrr")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert model_class in lines[0] and "SwinTransformer (swin_*, v1)" in lines[0] and "VisionTransformer" in lines[0]


def _swin(**kwargs) -> torch.nn.Module:
    return make_vit(SWIN, **{**SWIN_KW, **kwargs})


def test_efft_ranks_double_per_stage_with_one_factor_set_per_stage():
    """rank 8 is the last stage's: stages get 1, 2, 4, 8; U1 [C_i, r_i], C1 [r_i, r_i, 4 L_i]; shared: 4 slices."""
    model = vitfold.adapt(_swin(), "efft2", rank=8, ffn_rank2=16)
    for i, (c, n) in enumerate(zip(WIDTHS, DEPTHS, strict=True)):
        r, r2 = 8 >> (3 - i), 16 >> (3 - i)
        factors = model.layers[i].efft
        assert tuple(factors.U1.shape) == (c, r) and tuple(factors.C1.shape) == (r, r, 4 * n)
        assert tuple(factors.U2.shape) == (c, r) and tuple(factors.V2.shape) == (r2, 4 * c)
        assert tuple(factors.C2.shape) == (r, r2, 2 * n)
    shared = vitfold.adapt(_swin(), "efft1", rank=8, core="shared")
    assert tuple(shared.layers[2].efft.core.shape) == (3, 4, 4)
    with pytest.raises(AdapterError, match="'rank' \\(12\\) is the last stage's rank and must be divisible by 8"):
        vitfold.adapt(_swin(), "efft2", rank=12)


def test_released_efft_swin_counts_without_its_unused_core_slices():
    """The released set_Swin_EFFT (Swin-B, dim 2): attention ranks 4/8/16/32, FFN r1 2..16 with r2 = 2 r1, one
    core per stage; it allocates 18 FFN core slices in stage 3 and reads 2. Its 291,728 less those 16 unused
    [8, 16] slices is what `core=shared` trains."""
    widths = (128, 256, 512, 1024)
    attention = sum(2 * c * r + 4 * r * r for c, r in zip(widths, (4, 8, 16, 32), strict=True))
    ffn = sum(c * r + 2 * r * 2 * r + 2 * r * 4 * c for c, r in zip(widths, (2, 4, 8, 16), strict=True))
    assert attention + ffn + 16 * 8 * 16 == 291_728
    options = ("-o", "core=shared", "-o", "ffn_rank=16", "-o", "ffn_rank2=32", "--rank", "32")
    counts = _info("--backbone", "swin_base_patch4_window7_224", "--method", "efft2", *options)
    assert counts["adapter_params"] == attention + ffn == 289_680


def test_rlrr_new_head_on_swin_is_trunc_normal_not_zero():
    """RLRR's official Swin code initialises the head with trunc_normal_(std=0.02) and a zero bias (its ViT code
    zeroes it)."""
    torch.manual_seed(0)
    head = vitfold.adapt(_swin(), "rlrr", num_classes=50).get_classifier()
    assert not head.bias.any() and head.weight.requires_grad
    weight = head.weight.detach()
    assert 0.015 < float(weight.std()) < 0.025 and float(weight.abs().max()) <= 2.0


def test_swin_b_efft2_config_trains_the_released_setting():
    """The shipped config swinb_in22k_efft2_vtab_dtd resolves to the released Swin-B setting (289,680 trained tensors'
    elements, counted above from the released shapes); the ViT-L/H recipes are the released rank 24 / 32."""
    from vitfold.pipeline.config import config_file, load_config
    from vitfold.pipeline.recipes import resolve_recipe

    cfg = load_config(config_file("swinb_in22k_efft2_vtab_dtd"))
    with torch.device("meta"):
        model = vitfold.adapt(make_vit(cfg.backbone.split(".")[0]), cfg.method, **cfg.method_options)
    assert vitfold.parameter_counts(model)["adapter_params"] == 289_680
    assert resolve_recipe("efft2-vtab-vit-l:dtd")[2] == {"rank": 24, "scale": 1.0, "init": "vv"}
    assert resolve_recipe("efft2-vtab-vit-h:cifar")[2]["rank"] == 32


def test_reduction_shift_fold_carries_reduction_biases_that_only_vitfold_loads(tmp_path):
    adapted = vitfold.adapt(_swin(), "rlrr", num_classes=5, reduction_shift=True)
    randomize_trainable(adapted, std=0.05)
    folded = vitfold.fold(adapted).eval()
    state = folded.state_dict()
    biases = sorted(k for k in state if k.endswith("downsample.reduction.bias"))
    assert biases == [f"layers.{i}.downsample.reduction.bias" for i in (1, 2, 3)]
    for key in biases:  # f alone: the reduction had no bias to add it to
        assert torch.equal(state[key], adapted.get_parameter(key.replace(".bias", ".f")).detach())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    plain = _swin(num_classes=5)
    with pytest.raises(RuntimeError, match="Unexpected key.*reduction.bias"):
        plain.load_state_dict(load_file(str(path)), strict=True)
    loaded = load_folded(path, SWIN, 5, SWIN_KW)
    x = images(adapted, 2)
    with torch.no_grad():
        assert rel(loaded(x), adapted(x)) <= 1e-5


def test_drop_path_reaches_every_swin_block():
    from vitfold.pipeline.drop_path import drop_path_rates, set_drop_path

    model = _swin()
    set_drop_path(model, 0.3, "elementwise")
    assert drop_path_rates(model) == pytest.approx([0.3 * i / 4 for i in range(5)])  # 5 blocks over 4 stages
    assert isinstance(model.layers[3].blocks[0].drop_path2, torch.nn.Dropout)


SWIN_RUN = {
    "backbone": SWIN,
    "backbone_kwargs": SWIN_KW,
    "data": "digits:0-4",
    "method": "rlrr",
    "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0},
    "export": {"formats": ["onnx", "torchscript", "aoti"]},
    "verify": {"batch_sizes": [1, 8], "samples": 8},
    "bench": {"batch_sizes": [1], "min_iters": 3, "min_seconds": 0.05, "rounds": 2, "roofline": False},
}


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory) -> Path:
    import yaml

    root = tmp_path_factory.mktemp("swin")
    (root / "swin.yaml").write_text(yaml.safe_dump(SWIN_RUN))
    result = vitfold_cli("run", "--config", str(root / "swin.yaml"), "--out", str(root / "run"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "run"


def test_vitfold_run_on_swin_trains_folds_exports_and_verifies(swin_run):
    report = json.loads((swin_run / "verify" / "verify.json").read_text())
    assert report["passed"] is True
    rows = {(r["backend"], r["batch_size"]) for r in report["results"] if r["passed"]}
    for backend in ("torch-folded", "onnxruntime", "torchscript", "aoti"):
        assert {(backend, 1), (backend, 8)} <= rows, backend
    folded = load_file(str(swin_run / "fold" / "model.safetensors"))
    fresh = _swin(num_classes=5).state_dict()
    assert {k: tuple(v.shape) for k, v in folded.items()} == {k: tuple(v.shape) for k, v in fresh.items()}


def test_a_perturbed_swin_block_is_named_by_its_stage_and_block(swin_run, tmp_path):
    """Planted fault: the fc1 bias of layers.2.blocks.1 changed in a copy of the exported ONNX; the per-block
    comparison with the folded model names that block (not an index into a flat list)."""
    from vitfold.export.comparison import block_errors, first_diverging_block
    from vitfold.export.runners import OnnxRuntimeRunner, TorchRunner

    model = onnx.load(str(swin_run / "export" / "model.onnx"))
    target = next(t for t in model.graph.initializer if t.name == "layers.2.blocks.1.mlp.fc1.bias")
    weights = onnx.numpy_helper.to_array(target).copy()
    weights[:8] += 0.5
    target.CopyFrom(onnx.numpy_helper.from_array(weights, target.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    folded = load_folded(swin_run / "fold" / "model.safetensors", SWIN, 5, SWIN_KW)
    x = images(folded, 2)
    reference = TorchRunner(copy.deepcopy(folded), "cpu")
    assert reference.block_names == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0"] + [
        "layers.2.blocks.1",
        "layers.3.blocks.0",
    ]
    runner = OnnxRuntimeRunner(tmp_path / "model.onnx", "cpu")
    errors = block_errors(runner.block_outputs(x), reference.block_outputs(x))
    found = first_diverging_block(errors, 1e-4, reference.block_names)
    assert found["where"] == "layers.2.blocks.1" and errors[2] <= 1e-5
