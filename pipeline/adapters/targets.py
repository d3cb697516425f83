"""Where adapters go in a timm VisionTransformer, found by timm's stable module names.

Validates the model once, so that every adapter can assume what it wraps, and names the layer at
fault otherwise (a SwiGLU MLP, a bias-free projection, a norm without affine parameters ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vitfold.errors import AdapterError


@dataclass(frozen=True)
class LinearTarget:
    """An `nn.Linear` to adapt; `groups` > 1 splits its output rows into blocks (timm's fused qkv: 3)."""

    name: str
    groups: int = 1


@dataclass(frozen=True)
class ViTTargets:
    """The adaptable places of one ViT, in forward order."""

    patch_proj: str  # patch_embed.proj: Conv2d producing the patch tokens
    linears: tuple[LinearTarget, ...]  # per block: attn.qkv (groups=3), attn.proj, mlp.fc1, mlp.fc2
    block_norms: tuple[str, ...]  # per block: norm1, norm2
    final_norm: str | None  # `norm`, or `fc_norm` when the model pools with it; None if both are Identity
    depth: int


def _require(model: nn.Module, name: str, kind: type[nn.Module], need_bias: bool) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"layer '{name}' not found: this model is not a timm VisionTransformer layout") from None
    if not isinstance(module, kind):
        raise AdapterError(f"layer '{name}' is {type(module).__name__}, expected {kind.__name__}")
    if isinstance(module, nn.LayerNorm) and module.weight is None:
        raise AdapterError(f"layer '{name}' is a LayerNorm without affine parameters; cannot fold a scale into it")
    if need_bias and module.bias is None:
        raise AdapterError(f"layer '{name}' has no bias, so a shift cannot be folded into it")
    return module


def vit_targets(model: nn.Module, *, shifts: bool = True) -> ViTTargets:
    """Find and validate the adapter places of a timm `VisionTransformer` (vit_*, deit_*).

    `shifts=True` (RLRR, SSF) also requires a bias wherever a shift will be folded.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise AdapterError(f"model is {type(model).__name__}; vitfold adapts timm VisionTransformer models")
    _require(model, "patch_embed.proj", nn.Conv2d, shifts)
    linears: list[LinearTarget] = []
    norms: list[str] = []
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}"
        qkv = _require(model, f"{prefix}.attn.qkv", nn.Linear, shifts)
        if qkv.out_features % 3:
            raise AdapterError(f"layer '{prefix}.attn.qkv' has {qkv.out_features} outputs, not 3 equal blocks")
        linears.append(LinearTarget(f"{prefix}.attn.qkv", groups=3))
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            _require(model, f"{prefix}.{name}", nn.Linear, shifts)
            linears.append(LinearTarget(f"{prefix}.{name}"))
        for name in ("norm1", "norm2"):
            _require(model, f"{prefix}.{name}", nn.LayerNorm, shifts)
            norms.append(f"{prefix}.{name}")
    final_norm = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
    if final_norm is not None:
        _require(model, final_norm, nn.LayerNorm, shifts)
    return ViTTargets("patch_embed.proj", tuple(linears), tuple(norms), final_norm, len(model.blocks))
