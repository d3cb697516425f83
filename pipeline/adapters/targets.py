"""Where adapters go, per architecture family, found by timm's stable module names.

A family is one target map: a function that finds and validates the adaptable places of a timm model
class and returns them as `AdapterTargets`, so that every adapter can assume what it wraps. A layer
that does not fit (a SwiGLU MLP, a bias-free projection, a norm without affine parameters ...) is named
in a one-line `AdapterError`; a model of another class names its class and the supported families.

- `vit`: timm `VisionTransformer` and its subclasses (vit_*, deit_*, the distilled DeiT): `blocks.i`.
- `swin`: timm `SwinTransformer` (v1; swin_*): `layers.i.blocks.j`, plus each stage's PatchMerging
  `layers.i.downsample.reduction` (a bias-free 4C -> 2C linear; RLRR's official Swin code rescales it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitfold.errors import AdapterError


@dataclass(frozen=True)
class LinearTarget:
    """An `nn.Linear` to adapt.

    `groups`: the row blocks of its output that RLRR gives an input scale of their own (the official ViT
    code scales q, k, v of timm's fused qkv apart: 3; its Swin code shares one input scale: 1).
    `shift`: whether a shift can fold into its bias (False: a bias-free layer such as Swin's reduction)."""

    name: str
    groups: int = 1
    shift: bool = True


@dataclass(frozen=True)
class Stage:
    """Blocks of one width that share EFFT factors: the whole ViT, or one Swin stage."""

    host: str  # the module that holds the stage's shared factors ("" = the model itself)
    blocks: tuple[str, ...]  # the stage's block names, in forward order
    width: int  # d: the blocks' token width
    hidden: int  # h: the blocks' MLP width


@dataclass(frozen=True)
class AdapterTargets:
    """The adaptable places of one model, in forward order."""

    family: str
    patch_proj: str | None  # the patch-embedding conv that RLRR's SSF follows (ViT); None where it has none
    linears: tuple[LinearTarget, ...]  # per block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
    reductions: tuple[LinearTarget, ...]  # Swin's PatchMerging reductions (bias-free); none in a ViT
    block_norms: tuple[str, ...]  # per block: norm1, norm2
    final_norm: str | None  # `norm`, or `fc_norm` when a ViT pools with it; None if both are Identity
    stages: tuple[Stage, ...]


BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the adapted linears of a block


def _require(model: nn.Module, name: str, kind: type[nn.Module], need_bias: bool) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        layout = type(model).__name__
        raise AdapterError(f"layer '{name}' not found: this model is not a timm {layout} layout") from None
    if not isinstance(module, kind):
        raise AdapterError(f"layer '{name}' is {type(module).__name__}, expected {kind.__name__}")
    if isinstance(module, nn.LayerNorm) and module.weight is None:
        raise AdapterError(f"layer '{name}' is a LayerNorm without affine parameters; cannot fold a scale into it")
    if need_bias and module.bias is None:
        raise AdapterError(f"layer '{name}' has no bias, so a shift cannot be folded into it")
    return module


def _block(model: nn.Module, prefix: str, qkv_groups: int, shifts: bool) -> tuple[list[LinearTarget], list[str]]:
    """The linears and norms of one transformer block (timm's Block / SwinTransformerBlock layout)."""
    qkv = _require(model, f"{prefix}.attn.qkv", nn.Linear, shifts)
    if qkv.out_features % 3:
        raise AdapterError(f"layer '{prefix}.attn.qkv' has {qkv.out_features} outputs, not 3 equal blocks")
    for name in BLOCK_LINEARS[1:]:
        _require(model, f"{prefix}.{name}", nn.Linear, shifts)
    norms = [f"{prefix}.{n}" for n in ("norm1", "norm2")]
    for name in norms:
        _require(model, name, nn.LayerNorm, shifts)
    groups = {"attn.qkv": qkv_groups}
    linears = [LinearTarget(f"{prefix}.{name}", groups=groups.get(name, 1)) for name in BLOCK_LINEARS]
    return linears, norms


def _stage(model: nn.Module, host: str, blocks: list[str]) -> Stage:
    first = model.get_submodule(blocks[0])
    return Stage(host, tuple(blocks), first.attn.qkv.in_features, first.mlp.fc1.out_features)


def _vit(model: nn.Module, shifts: bool) -> AdapterTargets:
    _require(model, "patch_embed.proj", nn.Conv2d, shifts)
    linears: list[LinearTarget] = []
    norms: list[str] = []
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    for prefix in blocks:
        block_linears, block_norms = _block(model, prefix, qkv_groups=3, shifts=shifts)
        linears += block_linears
        norms += block_norms
    final_norm = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
    if final_norm is not None:
        _require(model, final_norm, nn.LayerNorm, shifts)
    stage = _stage(model, "", blocks)
    return AdapterTargets("vit", "patch_embed.proj", tuple(linears), (), tuple(norms), final_norm, (stage,))


def _swin(model: nn.Module, shifts: bool) -> AdapterTargets:
    linears: list[LinearTarget] = []
    norms: list[str] = []
    reductions: list[LinearTarget] = []
    stages: list[Stage] = []
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.downsample, nn.Identity):
            name = f"layers.{i}.downsample.reduction"
            reduction = _require(model, name, nn.Linear, need_bias=False)
            reductions.append(LinearTarget(name, shift=reduction.bias is not None))
        blocks = [f"layers.{i}.blocks.{j}" for j in range(len(layer.blocks))]
        for prefix in blocks:
            block_linears, block_norms = _block(model, prefix, qkv_groups=1, shifts=shifts)
            linears += block_linears
            norms += block_norms
        stages.append(_stage(model, f"layers.{i}", blocks))
    _require(model, "norm", nn.LayerNorm, shifts)
    return AdapterTargets("swin", None, tuple(linears), tuple(reductions), tuple(norms), "norm", tuple(stages))


def _families() -> dict[str, tuple[type[nn.Module], Callable[[nn.Module, bool], AdapterTargets]]]:
    """family name -> (the timm class it adapts, its target map); imported lazily (timm is heavy)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    return {"vit": (VisionTransformer, _vit), "swin": (SwinTransformer, _swin)}


FAMILY_MODELS = {"vit": "timm VisionTransformer (vit_*, deit_*)", "swin": "timm SwinTransformer (swin_*, v1)"}


def model_family(model: nn.Module) -> str:
    """The family of `model` ("vit", "swin"); an `AdapterError` naming its class and the supported ones."""
    for family, (cls, _) in _families().items():
        if isinstance(model, cls):
            return family
    supported = "; ".join(FAMILY_MODELS.values())
    raise AdapterError(f"model is {type(model).__name__}; vitfold adapts {supported}")


def find_targets(model: nn.Module, *, shifts: bool = True) -> AdapterTargets:
    """Find and validate the adapter places of a supported timm model.

    `shifts=True` (RLRR, SSF) also requires a bias wherever a shift will be folded in a block."""
    family = model_family(model)
    return _families()[family][1](model, shifts)
