"""A run config's model and input transform, with no run directory involved.

`build_model(cfg, num_classes)` is a function of the config: seeded from `cfg.seed`, so a random
backbone and the adapter's initial values come out the same for every caller that rebuilds it.
"""

from __future__ import annotations

from torch import nn

from vitfold.pipeline.adapting import adapt
from vitfold.pipeline.backbones import create_backbone, load_checkpoint
from vitfold.pipeline.config import RunConfig
from vitfold.pipeline.data import ImageTransform, parse_data_spec
from vitfold.pipeline.drop_path import set_drop_path


def build_backbone(cfg: RunConfig) -> nn.Module:
    """The backbone with random, `checkpoint` or `pretrained` weights and the run's drop path
    (`train.drop_path`, `train.drop_path_mode`); seeds torch from `cfg.seed` first."""
    import torch

    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg.backbone, pretrained=cfg.pretrained, **cfg.backbone_kwargs)
    if cfg.train.drop_path is not None:
        set_drop_path(model, cfg.train.drop_path, cfg.train.drop_path_mode)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model


def build_model(cfg: RunConfig, num_classes: int, backbone: nn.Module | None = None) -> nn.Module:
    """`backbone` (default: `build_backbone(cfg)`) with the configured adapter and a new head.

    Pass a backbone only straight from `build_backbone`, with no random draw in between: the adapter's
    initial values continue its seeded stream."""
    model = build_backbone(cfg) if backbone is None else backbone
    return adapt(model, cfg.method, num_classes=cfg.num_classes or num_classes, **cfg.method_options)


def data_transform(cfg: RunConfig, model: nn.Module) -> ImageTransform:
    """The model's input size with the run's normalisation (the recipe's, else the backbone's own); FGVC data
    crops as the official FGVC transform does."""
    crop = parse_data_spec(cfg.data).kind == "fgvc"
    return model_transform(model, cfg.train.mean, cfg.train.std, hflip=bool(cfg.train.hflip), crop=crop)


def model_transform(
    model: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, **options: bool
) -> ImageTransform:
    """The model's input size with `mean`/`std`, else the backbone's own normalisation (0.5 when it has none);
    `options`: ImageTransform's hflip and crop."""
    pretrained = getattr(model, "pretrained_cfg", {}) or {}
    mean = mean or tuple(pretrained.get("mean", (0.5, 0.5, 0.5)))
    std = std or tuple(pretrained.get("std", (0.5, 0.5, 0.5)))
    return ImageTransform(tuple(model.patch_embed.img_size), mean, std, **options)
