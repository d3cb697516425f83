"""The training loop's precision (fp16 with a GradScaler, as both official loops train), its weight EMA (what
the official train_fgvc_aug.py evaluates and saves, and what vitfold folds) and its Mixup/CutMix soft targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import vitfold
from vitfold.errors import VitfoldError
from vitfold.pipeline.config import load_config
from vitfold.pipeline.mixing import Mixing
from vitfold.pipeline.training import Dist, Trainer

from helpers import TINY_VITS, make_vit

NAME, KWARGS = TINY_VITS["run"]
CLASSES = 4


def _trainer(steps: int = 4, **train) -> Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * steps, 3, 16, 16, generator=g), torch.arange(8 * steps) % CLASSES)
    settings = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "weight_decay": 0.0, **train}
    tc = load_config(None, backbone=NAME, backbone_kwargs=KWARGS, method="rlrr", train=settings).train
    model = vitfold.adapt(make_vit(NAME, **KWARGS), "rlrr", num_classes=CLASSES)
    return Trainer(model, tc, Dist(), data, TensorDataset(data.tensors[0][:8], data.tensors[1][:8]), seed=0)


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vitfold.adapter_state_dict(model).items()}


def _overflow_at(trainer: Trainer, step: int) -> list[dict[str, torch.Tensor]]:
    """Make the gradient of one adapter tensor inf at optimizer step `step` (1-based), as an fp16 overflow of the
    scaled loss does; returns the adapter after every step that the optimizer took."""
    seen, taken = [0], []
    tensor = trainer.model.blocks[0].attn.qkv.s_in
    tensor.register_hook(lambda g: g * math.inf if seen[0] == step else g)
    optimizer_step = trainer.optimizer.step

    def counting_step(*args, **kwargs):
        out = optimizer_step(*args, **kwargs)
        taken.append(_adapter(trainer.model))
        return out

    trainer.optimizer.step = counting_step
    trainer.optimizer.zero_grad = _counting(trainer.optimizer.zero_grad, seen)
    return taken


def _counting(zero_grad, seen):
    def wrapped(*args, **kwargs):
        seen[0] += 1  # one zero_grad per training step, before its backward
        return zero_grad(*args, **kwargs)

    return wrapped


def test_fp16_skips_an_overflowing_step_and_recovers():
    trainer = _trainer(steps=4, precision="fp16")
    assert trainer.dtype == torch.float16 and trainer.scaler.is_enabled()
    scale = trainer.scaler.get_scale()
    taken = _overflow_at(trainer, step=2)
    trainer.fit(log=lambda _: None)
    assert len(taken) == 3  # step 2 was skipped: the optimizer stepped on 1, 3 and 4
    assert trainer.scaler.get_scale() == scale / 2  # and the scale halved
    final = _adapter(trainer.model)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert any(not torch.equal(final[k], taken[0][k]) for k in final)  # training went on after the overflow


def test_without_the_scaler_the_same_overflow_poisons_the_adapter():
    """The control: fp32 has no scaler, the inf gradient reaches AdamW, the next forward is NaN and training
    stops (so the test above can fail)."""
    trainer = _trainer(steps=4, precision="fp32")
    assert trainer.dtype is None and not trainer.scaler.is_enabled()
    taken = _overflow_at(trainer, step=2)
    with pytest.raises(VitfoldError, match="training diverged: loss nan at epoch 1, step 3"):
        trainer.fit(log=lambda _: None)
    assert len(taken) == 2 and not torch.isfinite(trainer.model.blocks[0].attn.qkv.s_in).all()


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    from vitfold.pipeline.training import autocast_dtype

    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16


def test_the_ema_is_the_decayed_average_of_the_weights_and_is_what_gets_folded():
    decay = 0.6
    trainer = _trainer(steps=3, ema_decay=decay)
    start = _adapter(trainer.model)
    taken = _overflow_at(trainer, step=-1)  # no overflow: records the weights after each step
    trainer.fit(log=lambda _: None)
    expected = dict(start)
    for weights in taken:  # ema_k = d · ema_{k-1} + (1 − d) · w_k
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    ema = _adapter(trainer.folded_model)
    assert trainer.folded_model is trainer.ema.module
    for key in expected:
        torch.testing.assert_close(ema[key], expected[key], rtol=1e-5, atol=1e-6)
    last = _adapter(trainer.model)
    assert any(not torch.allclose(ema[k], last[k]) for k in ema)  # the EMA is not the last step's weights


def test_mixing_gives_soft_targets_with_label_smoothing():
    tc = load_config(None, recipe="rlrr-fgvc-aug:cub").train
    mixing = Mixing(tc, CLASSES)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, targets = mixing(x.clone(), y)  # timm mixes in place
    assert targets.shape == (6, CLASSES) and torch.allclose(targets.sum(1), torch.ones(6))
    assert float(targets.min()) >= 0.1 / CLASSES - 1e-7  # smoothing 0.1 keeps every class at >= ε / K
    assert not torch.equal(mixed, x)  # every batch is mixed (prob 1)
    odd_x, odd_targets = mixing(x[:5].clone(), y[:5])  # an odd last batch: smoothed one-hot, unmixed
    assert torch.equal(odd_x, x[:5])
    expected = torch.full((5, CLASSES), 0.1 / CLASSES)
    expected[torch.arange(5), y[:5]] += 0.9
    torch.testing.assert_close(odd_targets, expected)


@pytest.mark.parametrize("key", ["precision", "ema_decay"])
def test_bad_training_settings_are_one_line_errors(key):
    with pytest.raises(VitfoldError, match=f"train.{key} must be"):
        load_config(None, train={key: "fp8" if key == "precision" else 1.5})


def test_train_stage_saves_the_ema_adapter_and_the_report_says_so(tmp_path):
    """With train.ema_decay the adapter file (what fold folds) is the EMA's, not the last step's weights."""
    import yaml
    from safetensors.torch import load_file

    from vitfold.pipeline.stages import RunDir, run_stage

    config = {"backbone": NAME, "backbone_kwargs": KWARGS, "data": "digits:0-3", "method": "rlrr", "seed": 0}
    config["train"] = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 0, "ema_decay": 0.5}
    (tmp_path / "ema.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "ema.yaml")
    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run").write_config(cfg)  # as `vitfold train` writes it
    run_stage("train", tmp_path / "run", settings=cfg, log=lambda _: None)
    saved = load_file(str(tmp_path / "run" / "train" / "adapter.safetensors"))
    state = torch.load(tmp_path / "run" / "train" / "last.ckpt", weights_only=False)
    for key, value in saved.items():
        torch.testing.assert_close(value, state["ema"][key], rtol=0, atol=0)
    assert any(not torch.equal(saved[k], state["adapter"][k]) for k in saved)  # not the model's own weights
    run_stage("report", tmp_path / "run", log=lambda _: None)
    assert "folded weights: the EMA of the weights (decay 0.5)" in (tmp_path / "run" / "REPORT.md").read_text()
