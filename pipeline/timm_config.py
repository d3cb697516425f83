"""config.json of a timm / Hugging Face model folder, the file timm's `save_for_hf` writes beside
`model.safetensors`, so that `timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds the model
with its weights, its class names and its data config:

    {"architecture", "num_classes", "num_features", "global_pool", "label_names",
     "model_args": the create_model arguments (backbone size, num_classes),
     "pretrained_cfg": the data config (input_size, interpolation, mean, std, crop_pct, crop_mode), ...}
"""

from __future__ import annotations

from typing import Any

from torch import nn


def label_names(names: list[str], num_classes: int) -> list[str]:
    """`names` for the first outputs; a head larger than the data (`num_classes` set) names the rest
    `unused_<i>` (outputs no image was labelled with)."""
    return [*names, *(f"unused_{i}" for i in range(len(names), num_classes))]


def timm_config(
    model: nn.Module, model_args: dict[str, Any], data_config: dict[str, Any], class_names: list[str]
) -> dict[str, Any]:
    """The config.json for timm `model` built by `create_model(architecture, **model_args)` (its head size
    is added), with `data_config` (timm's data-config keys) and the ordered `class_names`."""
    source = model.pretrained_cfg
    pretrained_cfg = {
        **data_config,
        "num_classes": model.num_classes,
        "fixed_input_size": source.get("fixed_input_size", True),
        "first_conv": source.get("first_conv", "patch_embed.proj"),
        "classifier": source.get("classifier", "head"),
        "custom_load": False,  # a native timm state_dict, not the original JAX .npz
    }
    return {
        "architecture": source["architecture"],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "label_names": list(class_names),
        "model_args": {**model_args, "num_classes": model.num_classes},
        "pretrained_cfg": pretrained_cfg,
    }
