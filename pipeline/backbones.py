"""Create timm ViT and Swin backbones: offline by default, with a clear error when hub weights cannot be had."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from vitfold.errors import AdapterError, BackboneError, CheckpointError, first_line

HUB_TIMEOUT_S = 3.0
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader asks for, in order


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself reads it (the hub is then never contacted)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_weights_cached(name: str) -> bool:
    """True when the Hugging Face cache already holds the weights timm would load for `name` (so no network
    is needed): its pretrained config's `hf_hub_id` (and revision) with its weight file."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: timm.create_model says so
        return False
    if cfg is None or not cfg.hf_hub_id:
        return False
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the model hub (HF_ENDPOINT, default huggingface.co) answers a TCP connect in time."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def create_backbone(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=..., **kwargs)` for a model of a supported family (timm
    VisionTransformer, SwinTransformer v1).

    Random weights unless `pretrained`. Hub weights follow the Hugging Face conventions: a warm cache is
    used as timm finds it, and with HF_HUB_OFFLINE=1 nothing but the cache is tried. Only when the weights
    are not cached and the hub may be used is it probed first, so that an unreachable hub fails at once
    (instead of timm's minute of retries); either failure is one line saying to pass a local checkpoint.
    """
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    from vitfold.pipeline.adapters.targets import model_family

    if "/" in name or ":" in name:  # timm would read it as a hub repository or a folder
        raise BackboneError(
            f"backbone '{name}': a timm model name has no '/' or ':' (hub or local weights: --pretrained with the "
            "timm name, or --checkpoint PATH)"
        )
    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"unknown backbone '{name}' (see timm.list_models('vit_*') and ('swin_*'))")
    if pretrained and not hub_offline() and not hub_weights_cached(name) and not hub_reachable():
        raise BackboneError(
            f"cannot download pretrained weights for '{name}': the model hub is unreachable (offline?) and "
            "they are not in the Hugging Face cache; pass --checkpoint PATH with local weights instead"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise BackboneError(f"backbone '{name}' rejected an option: {e}") from None
    except LocalEntryNotFoundError:
        raise BackboneError(
            f"cannot load pretrained weights for '{name}': HF_HUB_OFFLINE is set and they are not in the "
            "Hugging Face cache (HF_HOME / HF_HUB_CACHE); pass --checkpoint PATH with local weights instead"
        ) from None
    try:
        model_family(model)
    except AdapterError as e:
        raise BackboneError(f"backbone '{name}': {e}") from None
    return model


def _linear(module: nn.Module) -> nn.Module:
    return getattr(module, "base", module)  # the frozen layer inside an adapter layer


def _pair(value: Any) -> Any:
    return value[0] if isinstance(value, tuple | list) and len(set(value)) == 1 else value


def _size_of(model: nn.Module) -> dict[str, Any]:
    """The size arguments of `timm.create_model` as a ViT or a Swin (v1) model holds them."""
    from vitfold.pipeline.adapters.targets import model_family

    embed = model.patch_embed
    size = {
        "img_size": _pair(tuple(embed.img_size)),
        "patch_size": _pair(tuple(embed.patch_size)),
        "in_chans": _linear(embed.proj).in_channels,
        "embed_dim": model.embed_dim,
    }
    if model_family(model) == "vit":
        fc1 = _linear(model.blocks[0].mlp.fc1)
        return size | {
            "depth": len(model.blocks),
            "num_heads": model.blocks[0].attn.num_heads,
            "mlp_ratio": fc1.out_features / fc1.in_features,
        }
    return size | {  # swin
        "depths": tuple(len(layer.blocks) for layer in model.layers),
        "num_heads": tuple(layer.blocks[0].attn.num_heads for layer in model.layers),
        "window_size": _pair(tuple(model.layers[0].blocks[0].window_size)),
    }


def backbone_size_kwargs(model: nn.Module) -> dict[str, Any]:
    """The size arguments in which `model` differs from its timm architecture's defaults (img_size, depth,
    ...): with them `timm.create_model(architecture, **kwargs)` builds a model of the same shapes."""
    import timm
    import torch

    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture:
        return {}
    with torch.device("meta"):  # shapes only, no memory
        default = _size_of(timm.create_model(architecture))
    return {k: v for k, v in _size_of(model).items() if v != default[k]}


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a `.safetensors` or `.pth`/`.pt`/`.bin`/`.ckpt` file (weights_only), unwrapped from a
    training checkpoint's `state_dict` / `model` / `module` / `model_state_dict` entry."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - empty, truncated, or a pickle under a .safetensors name
            raise CheckpointError(f"cannot read checkpoint {path} as safetensors: {first_line(e)}") from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - keep the file name and the first line of the reason
            raise CheckpointError(f"cannot read checkpoint {path}: {first_line(e)}") from None
        for key in ("state_dict", "model", "module", "model_state_dict"):  # training-checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {path} holds a {type(state).__name__}, not a state dict (tensors by name)"
            )
        return state
    raise CheckpointError(f"checkpoint {path}: unknown format '{suffix}' (use .safetensors, .pth/.bin or .npz)")


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local backbone weights: `.safetensors`, `.pth`/`.bin` (weights_only) or Google `.npz`.

    Every backbone key must be present with its shape; the classifier head may differ (a new head
    replaces it). Fails naming the first missing, unexpected or mismatched key.
    """
    from timm.models import swin_transformer, vision_transformer

    from vitfold.pipeline.adapters.targets import model_family

    filters = {"vit": vision_transformer.checkpoint_filter_fn, "swin": swin_transformer.checkpoint_filter_fn}
    checkpoint_filter_fn = filters[model_family(model)]  # timm's own key/format conversions, per family
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise CheckpointError(f"checkpoint {path}: {type(model).__name__} cannot read Google .npz weights")
        try:
            model.load_pretrained(str(path))  # timm's public reader of the original JAX checkpoints
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit the backbone: {e}") from None
        return
    try:
        state = checkpoint_filter_fn(read_state_dict(path), model)  # timm's own key/format conversions
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is an input error naming the file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    own = model.state_dict()
    head = {k for k in own if k.startswith(("head.", "head_dist."))}
    for key, value in own.items():
        if key not in state:
            if key in head:
                continue
            raise CheckpointError(f"checkpoint {path} lacks '{key}' that the backbone needs")
        if tuple(state[key].shape) != tuple(value.shape):
            if key in head:
                state.pop(key)
                continue
            raise CheckpointError(
                f"checkpoint {path}: '{key}' has shape {tuple(state[key].shape)}, the backbone has {tuple(value.shape)}"
            )
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has '{unexpected[0]}', which the backbone does not have")
    model.load_state_dict(state, strict=False)


def folded_load_call(backbone: str, num_classes: int, path: Path, backbone_kwargs: dict[str, Any]) -> str:
    """The timm call that loads a folded checkpoint with no vitfold code, as a user would type it.

    (`num_classes` belongs in the overlay too: otherwise timm drops a head whose size differs from the
    pretrained config's; `custom_load=False`, or older timm releases (1.0.29 seen) read the file as the
    original JAX `.npz` of `vit_*_patch16_224`.)"""
    kwargs = "".join(f", {k}={v!r}" for k, v in backbone_kwargs.items())
    return (
        f"timm.create_model({backbone!r}, pretrained=True, num_classes={num_classes}{kwargs}, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}, num_classes={num_classes}, custom_load=False))"
    )


def add_missing_biases(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """Give each bias-free `nn.Linear` whose bias is among `keys` a (zero) bias, so that a state dict with
    those keys loads strictly; returns the layers changed. (RLRR's `reduction_shift=true` fold of a Swin:
    its PatchMerging reductions carry a bias that timm's do not have.)"""
    import torch

    modules = dict(model.named_modules())
    changed = []
    for key in keys:
        layer, _, name = key.rpartition(".")
        module = modules.get(layer) if name == "bias" else None  # an unknown key is left to the strict load
        if isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            changed.append(layer)
    return changed


def load_folded(path: Path, backbone: str, num_classes: int, backbone_kwargs: dict[str, Any]) -> nn.Module:
    """A folded checkpoint (a plain timm state_dict) loaded by timm alone, exactly as `folded_load_call` says.

    A checkpoint with biases that timm's layers lack (a Swin folded with RLRR's `reduction_shift=true`)
    cannot be loaded by timm's loader: the model is built, given those biases, then loaded strictly."""
    import timm
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    with torch.device("meta"):  # the layout alone, at no cost
        layout = timm.create_model(backbone, num_classes=num_classes, **backbone_kwargs)
    extra = [k for k in keys if k not in layout.state_dict()]
    if add_missing_biases(layout, extra):
        from safetensors.torch import load_file

        model = timm.create_model(backbone, num_classes=num_classes, **backbone_kwargs)
        add_missing_biases(model, extra)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()
    overlay = {"file": str(path), "num_classes": num_classes, "custom_load": False}
    model = timm.create_model(
        backbone, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **backbone_kwargs
    )
    return model.eval()
