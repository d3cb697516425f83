"""Checkpoints of the official RLRR code (github.com/zstarN70/RLRR, `models/networks.py`) in vitfold's terms.

The official ViT keeps q, k, v as three linears. Each `RLRRLinear` holds the frozen `mlp` (an nn.Linear,
W [out, in]) and `scale_col` [1, in], `scale_line` [out, 1], `shift_bias` [1, out]:

    W' = W ⊙ scale_col ⊙ scale_line + W = W ⊙ (1 + s_out s_inᵀ),   b' = b + f
    with s_in = scale_col, s_out = scale_line, f = shift_bias

and `ssf_ada` is y = x ⊙ scale + shift. timm fuses q, k, v into one `attn.qkv` (rows q, then k, then v),
so vitfold's qkv s_out and f are the three concatenated and its s_in [3, in] stacks the three scale_col.

Official name (block i: `transformer.encoder.layer.{i}.`)  ->  vitfold / timm name (`blocks.{i}.`)
    transformer.embeddings.ssf_{scale,shift}_patch         ->  patch_embed.proj.{scale,shift}
    {i}.ssf_{scale,shift}_attn_norm                         ->  norm1.{scale,shift}
    {i}.ssf_{scale,shift}_ffn_norm                          ->  norm2.{scale,shift}
    {i}.attn.{query,key,value}.scale_line / scale_col / shift_bias
                                                           ->  attn.qkv.s_out (cat) / s_in (stack) / f (cat)
    {i}.attn.out.*, {i}.ffn.fc1.*, {i}.ffn.fc2.*           ->  attn.proj.*, mlp.fc1.*, mlp.fc2.*
                                                               (scale_line -> s_out, scale_col -> s_in, shift_bias -> f)
    transformer.encoder.ssf_{scale,shift}_enc_norm         ->  norm.{scale,shift}
    head.{weight,bias}                                     ->  head.{weight,bias}
Backbone (only in a full `model.state_dict()`: `train_vtab.py` saves just the tensors named head, scale or
shift, and the backbone is the Google npz it started from, timm's `vit_base_patch16_224.orig_in21k`):
    transformer.embeddings.patch_embeddings.*              ->  patch_embed.proj.*
    transformer.embeddings.{cls_token,position_embeddings} ->  cls_token, pos_embed
    {i}.attention_norm.*, {i}.ffn_norm.*                    ->  norm1.*, norm2.*
    {i}.attn.{query,key,value}.mlp.*                       ->  attn.qkv.* (rows concatenated q, k, v)
    {i}.attn.out.mlp.*, {i}.ffn.fc1.mlp.*, {i}.ffn.fc2.mlp.* ->  attn.proj.*, mlp.fc1.*, mlp.fc2.*
    transformer.encoder.encoder_norm.*                     ->  norm.*
"""

from __future__ import annotations

import torch

from vitfold.pipeline.official.rlrr_swin import convert_rlrr_swin, is_rlrr_swin
from vitfold.pipeline.official.state import OfficialImport, OfficialState

BLOCK = "transformer.encoder.layer.{}."
QKV = ("attn.query", "attn.key", "attn.value")
LINEARS = {"attn.out": "attn.proj", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2"}  # official unit -> timm layer
BLOCK_SSF = {"attn_norm": "norm1", "ffn_norm": "norm2"}
BLOCK_NORMS = {"attention_norm": "norm1", "ffn_norm": "norm2"}
EMBEDDING = "transformer.embeddings."
GLOBAL_BACKBONE = {  # official -> timm, outside the blocks
    EMBEDDING + "patch_embeddings.weight": "patch_embed.proj.weight",
    EMBEDDING + "patch_embeddings.bias": "patch_embed.proj.bias",
    EMBEDDING + "cls_token": "cls_token",
    EMBEDDING + "position_embeddings": "pos_embed",
    "transformer.encoder.encoder_norm.weight": "norm.weight",
    "transformer.encoder.encoder_norm.bias": "norm.bias",
}


def _rescaling(state: OfficialState, unit: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_out [out], s_in [in], f [out]) of the official RLRRLinear `unit`."""
    line, col, shift = (state.take(f"{unit}.{name}") for name in ("scale_line", "scale_col", "shift_bias"))
    return line.reshape(-1), col.reshape(-1), shift.reshape(-1)  # [out, 1], [1, in], [1, out] -> vectors


def _adapter(state: OfficialState, depth: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def ssf(official: str, layer: str) -> None:  # official: a name with {} for scale | shift
        for kind in ("scale", "shift"):
            out[f"{layer}.{kind}"] = state.take(official.format(kind))

    ssf(EMBEDDING + "ssf_{}_patch", "patch_embed.proj")
    for i in range(depth):
        official, timm = BLOCK.format(i), f"blocks.{i}."
        for name, layer in BLOCK_SSF.items():
            ssf(official + "ssf_{}_" + name, timm + layer)
        s_out, s_in, f = zip(*(_rescaling(state, official + unit) for unit in QKV), strict=True)
        out |= {timm + "attn.qkv.s_out": torch.cat(s_out), timm + "attn.qkv.s_in": torch.stack(s_in)}
        out[timm + "attn.qkv.f"] = torch.cat(f)
        for unit, layer in LINEARS.items():
            s_out, s_in, f = _rescaling(state, official + unit)
            out |= {f"{timm}{layer}.s_out": s_out, f"{timm}{layer}.s_in": s_in[None], f"{timm}{layer}.f": f}
    ssf("transformer.encoder.ssf_{}_enc_norm", "norm")
    return out | {"head.weight": state.take("head.weight"), "head.bias": state.take("head.bias")}


def _backbone(state: OfficialState, depth: int) -> dict[str, torch.Tensor]:
    """The backbone under timm's names, when the checkpoint holds it (a full state_dict); else {}."""
    if not any(state.has(key) for key in GLOBAL_BACKBONE):
        return {}
    out = {timm: state.take(official) for official, timm in GLOBAL_BACKBONE.items()}
    for i in range(depth):
        official, timm = BLOCK.format(i), f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{timm}attn.qkv.{kind}"] = torch.cat([state.take(f"{official}{unit}.mlp.{kind}") for unit in QKV])
            for unit, layer in LINEARS.items():
                out[f"{timm}{layer}.{kind}"] = state.take(f"{official}{unit}.mlp.{kind}")
            for norm, layer in BLOCK_NORMS.items():
                out[f"{timm}{layer}.{kind}"] = state.take(f"{official}{norm}.{kind}")
    return out


def convert_rlrr(state: OfficialState) -> OfficialImport:
    """The official RLRR checkpoint as vitfold's `rlrr` (default options: the residual, both scales); a Swin
    checkpoint of its `models/swin.py` goes to `convert_rlrr_swin`."""
    if is_rlrr_swin(state):
        return convert_rlrr_swin(state)
    depth = state.count(r"transformer\.encoder\.layer\.(\d+)\.")
    adapter, backbone = _adapter(state, depth), _backbone(state, depth)
    state.finish()
    return OfficialImport("rlrr", adapter, backbone, {}, int(adapter["head.weight"].shape[0]), depth)
