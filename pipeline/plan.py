"""The training plan: what `vitfold train` would run, resolved and listed before anything trains.

`training_plan(cfg)` builds the model and the splits as the train stage does (no training, no file
written) and returns, as JSON-ready values: the recipe and the run it reproduces, the optimizer's
parameter groups (weight decay and parameter names as in `named_parameters()`), the learning rate of
every optimizer step, the epochs and steps per epoch, the drop path (mode, resolved operator and per-block
rates), the warm restarts' T_0 / T_mult, the precision, the batch mixing and loss, the weight EMA, the new
head's initialisation, and the splits that train, evaluate and select the epoch to fold.
"""

from __future__ import annotations

from typing import Any

from vitfold.pipeline.adapters import get_method
from vitfold.pipeline.adapters.targets import model_family
from vitfold.pipeline.config import RunConfig, TrainConfig
from vitfold.pipeline.data import build_splits, parse_data_spec
from vitfold.pipeline.drop_path import drop_path_operator, drop_path_rates
from vitfold.pipeline.mixing import Mixing
from vitfold.pipeline.models import build_backbone, build_model, data_transform
from vitfold.pipeline.recipes import recipe_run
from vitfold.pipeline.schedules import learning_rates
from vitfold.pipeline.training import Dist, GlobalBatchSampler, param_groups

HEAD_INIT_NAMES = {"zero": "zero", "trunc-normal": "trunc-normal(0.02)", "timm": "random (timm reset_classifier)"}


def _augmentation(tc: TrainConfig) -> dict[str, Any]:
    """The batch mixing and the loss it trains with."""
    if not Mixing.wanted(tc):
        return {"mixup": None, "label_smoothing": tc.label_smoothing, "loss": "cross-entropy"}
    mixup = {"mixup_alpha": tc.mixup_alpha, "cutmix_alpha": tc.cutmix_alpha, "mode": "batch", "prob": 1.0}
    mixup["switch_prob"] = 0.5
    return {"mixup": mixup, "label_smoothing": tc.label_smoothing, "loss": "SoftTargetCrossEntropy"}


def training_plan(cfg: RunConfig) -> dict[str, Any]:
    """The resolved training of `cfg` as the train stage would run it on one process."""
    tc = cfg.train
    backbone = build_backbone(cfg)
    splits = build_splits(parse_data_spec(cfg.data), data_transform(cfg, backbone), tc.select == "best-val")
    model = build_model(cfg, splits.num_classes, backbone)
    per_epoch = len(GlobalBatchSampler(len(splits.train), tc.batch_size, cfg.seed, Dist(), tc.drop_last))
    groups = param_groups(model, tc.weight_decay)
    return {
        "recipe": {"name": cfg.recipe, "reproduces": recipe_run(cfg.recipe)} if cfg.recipe else None,
        "method": cfg.method,
        "method_options": cfg.method_options,
        "param_groups": [{"weight_decay": wd, "params": [name for name, _ in named]} for wd, named in groups],
        "schedule": tc.schedule,
        "restarts": {"T_0": tc.restart_epochs, "T_mult": tc.restart_mult, "eta_min": tc.min_lr}
        if tc.schedule == "warm-restarts"
        else None,
        "precision": tc.precision,
        "augmentation": _augmentation(tc),
        "ema": {"decay": tc.ema_decay, "folded": "the EMA weights"} if tc.ema_decay is not None else None,
        "lr": learning_rates(tc, per_epoch),
        "epochs": tc.total_epochs,
        "cooldown_epochs": tc.cooldown_epochs,
        "steps_per_epoch": per_epoch,
        "batch_size": tc.batch_size,
        "drop_last": tc.drop_last,
        "drop_path": {
            "mode": tc.drop_path_mode,
            "operator": drop_path_operator(model),
            "rates": drop_path_rates(model),
        },
        "head_init": HEAD_INIT_NAMES[get_method(cfg.method).head_init(model_family(model))],
        "select": tc.select,
        "eval_every": tc.eval_every,
        "splits": splits.describe(),
    }
