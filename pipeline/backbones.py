"""Create timm ViT backbones: offline by default, with a clear error when hub weights cannot be had."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from torch import nn

from pipeline.errors import BackboneError

HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the model hub (HF_ENDPOINT, default huggingface.co) answers a TCP connect in time."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def create_backbone(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=..., **kwargs)` for a timm VisionTransformer.

    Random weights unless `pretrained`; with `pretrained` and no reachable hub this fails at once
    (instead of timm's minute of retries) and says to pass a local checkpoint.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"unknown backbone '{name}' (see timm.list_models('vit_*'))")
    if pretrained and not hub_reachable():
        raise BackboneError(
            f"cannot download pretrained weights for '{name}': the model hub is unreachable (offline?); "
            "pass --checkpoint PATH with local weights instead"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise BackboneError(f"backbone '{name}' rejected an option: {e}") from None
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"backbone '{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    return model
