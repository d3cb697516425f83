"""Swin checkpoints of the official RLRR code (github.com/zstarN70/RLRR, `models/swin.py`) in vitfold's terms.

Its `RLRRLinear` subclasses nn.Linear, so the frozen weight keeps the layer's own name, and adds
`scale_col` [1, in], `scale_line` [out, 1], `shift_bias` [1, out]: W' = W ⊙ scale_line ⊙ scale_col + W,
b' = b + shift_bias (or shift_bias alone where the official layer has `bias=False`: the PatchMerging
`reduction`). The fused qkv has ONE scale_col for q, k and v, as vitfold's Swin qkv has (s_in [1, C]).
Names (old layout first; `vitfold.pipeline.official.swin` maps the backbone to timm 1.0):

    {linear}.scale_line / scale_col / shift_bias   ->  {linear}.s_out / s_in / f
        linear: layers.{s}.blocks.{b}.attn.qkv, attn.proj, mlp.fc1, mlp.fc2; layers.{s}.downsample.reduction
    layers.{s}.blocks.{b}.ssf_{scale,shift}_norm{1,2}  ->  layers.{s}.blocks.{b}.norm{1,2}.{scale,shift}
    ssf_{scale,shift}_encode_norm                      ->  norm.{scale,shift}
    head.{weight,bias}                                 ->  head.fc.{weight,bias}
    everything else                                    ->  the backbone, under timm 1.0's name

The reductions' shifts make the import exact only with vitfold's `reduction_shift=true`, which is then
chosen (and said so); the folded model carries `reduction.bias` tensors that plain timm's Swin has no
place for (a per-channel constant added to every token before a LayerNorm folds nowhere else), so it
loads through `vitfold.pipeline.backbones.load_folded`. The official reduction also holds an nn.Linear
`bias` its forward never reads (`RLRRLinear(bias=False)` still builds one): dropped, with a note.
"""

from __future__ import annotations

import re

import torch

from vitfold.pipeline.official.state import OfficialImport, OfficialState
from vitfold.pipeline.official.swin import BUFFERS, head_names, is_release_layout, timm_name

RESCALING = {"scale_line": "s_out", "scale_col": "s_in", "shift_bias": "f"}  # official -> vitfold
SSF = re.compile(r"(.*?)\.?ssf_(scale|shift)_(norm1|norm2|encode_norm)")  # layer prefix, kind, norm
SSF_NORMS = {"norm1": "norm1", "norm2": "norm2", "encode_norm": "norm"}
UNUSED_BIAS = r"layers\.\d+\.downsample\.reduction\.bias"


def is_rlrr_swin(state: OfficialState) -> bool:
    """Whether the checkpoint is of the official RLRR Swin (its tensors live under `layers.` or the final SSF)."""
    return any(name.startswith("layers.") or "encode_norm" in name for name in state.names())


def _adapter_name(name: str) -> str | None:
    """The vitfold name of an official adapter tensor (official layout), or None for any other tensor."""
    layer, _, leaf = name.rpartition(".")
    if leaf in RESCALING:
        return f"{layer}.{RESCALING[leaf]}"
    if m := SSF.fullmatch(name):
        prefix, kind, norm = m.groups()
        return ".".join(p for p in (prefix, SSF_NORMS[norm], kind) if p)
    return None


def convert_rlrr_swin(state: OfficialState) -> OfficialImport:
    """The official RLRR Swin checkpoint as vitfold's `rlrr` on timm's Swin (reduction_shift when it has one)."""
    release = is_release_layout(state.names())
    state.take_matching(BUFFERS)
    notes = []
    has_rescaled_reductions = any(
        re.fullmatch(r"layers\.\d+\.downsample\.reduction\.scale_col", n) for n in state.names()
    )
    unused = state.take_matching(UNUSED_BIAS) if has_rescaled_reductions else {}
    if unused:
        notes.append(
            f"dropped {len(unused)} PatchMerging 'reduction.bias' tensor(s) the official forward never reads "
            "(RLRRLinear(bias=False) still builds an nn.Linear bias)"
        )
    adapter: dict[str, torch.Tensor] = {}
    for name in sorted(state.names()):
        ours = _adapter_name(name)
        if ours is not None:
            value = state.take(name)
            leaf = ours.rpartition(".")[2]
            adapter[timm_name(ours, release)] = value.reshape(1, -1) if leaf == "s_in" else value.reshape(-1)
    head = {timm_name(n, release): state.take(n) for n in head_names(state.names())}
    backbone = {timm_name(n, release): t for n, t in state.take_matching(r".*").items()}
    shift = any(re.fullmatch(r"layers\.\d+\.downsample\.reduction\.f", n) for n in adapter)
    if shift:
        notes.append(
            "the checkpoint shifts its PatchMerging reductions: reduction_shift=true (the folded model carries "
            "'reduction.bias' tensors; load it with vitfold.pipeline.backbones.load_folded)"
        )
    depth = sum(1 for n in adapter if n.endswith(".attn.qkv.s_out"))
    num_classes = int(head["head.fc.weight"].shape[0])
    return OfficialImport(
        "rlrr", adapter | head, backbone, {"reduction_shift": shift}, num_classes, depth, tuple(notes)
    )
