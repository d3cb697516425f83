"""Checkpoints of the official EFFT code (github.com/Dongping-Chen/EFFT-EFfective-Factor-Tuning,
`methods/Set_EFFT.py`, saved by `execute.py`) in vitfold's terms.

`execute.py` saves {"epoch", "model_state_dict", "optimizer_state_dict", ...}; the model is a timm 0.5.4
`VisionTransformer`, so its backbone already carries timm's names, and the whole backbone is in the file.
`set_ViT_EFFT(model, dim=r, s=s)` puts the factors on the model root, in x·W orientation:

    EFFTu1 [d, r], EFFTv1 [r, d], EFFTc1 [r, r, 4]     ΔW_{q,k,v,o} = s · U1 C1[:, :, j] V1
    EFFTu2 [d, r], EFFTv2 [r, 4d], EFFTc2 [r, r, 2]    ΔW_fc1 = s · U2 C2[:, :, 0] V2
                                                       ΔW_fc2 = (s · U2 C2[:, :, 1] V2)ᵀ

and each block's Attention and Mlp register the same tensors again as `blocks.{i}.attn.EFFT{u,v,c}` and
`blocks.{i}.mlp.EFFT{u,v,c}` (aliases: dropped here). The released code shares one core for all L blocks;
the per-layer version (its compiled `Set_PoFT`, factors named `PoFT...`) has EFFTc1 [r, r, 4L] indexed
4l+j and EFFTc2 [r, r, 2L] indexed 2l, 2l+1 -- vitfold's EFFT2 layout. A shared core stays shared
(vitfold's `core=shared`: every block reads slices 0..3 and 0..1), so the import trains on as released:

    EFFTu1, EFFTv1 -> efft.U1, efft.V1       EFFTc1 -> efft.C1 ([r, r, 4] shared, or [r, r, 4L] per layer)
    EFFTu2, EFFTv2 -> efft.U2, efft.V2       EFFTc2 -> efft.C2 ([r, r, 2] shared, or [r, r, 2L] per layer)
    head.{weight,bias} -> head.{weight,bias}; every other tensor is the backbone, under its timm name.

The scale s is a plain attribute of the official layers, in no checkpoint: it must be given (the
official per-task value is in its `configs/EFFT2.json`).
"""

from __future__ import annotations

from typing import Any

from vitfold.errors import CheckpointError
from vitfold.pipeline.official.efft_swin import convert_efft2_swin, is_efft_swin
from vitfold.pipeline.official.state import OfficialImport, OfficialState

PREFIXES = ("EFFT", "PoFT")  # the released names, and those of the per-layer version
FACTORS = {"u1": "U1", "v1": "V1", "c1": "C1", "u2": "U2", "v2": "V2", "c2": "C2"}  # official suffix -> vitfold
SLICES = {"C1": 4, "C2": 2}  # core slices per block


def convert_efft2(state: OfficialState, options: dict[str, Any]) -> OfficialImport:
    """The official EFFT checkpoint as vitfold's `efft2` (shared or per-layer cores, as the checkpoint has
    them); `options` must give `scale`."""
    if "scale" not in options:
        raise CheckpointError(
            f"{state.path}: the official EFFT code keeps the scale s out of its checkpoints; pass it as "
            "-o scale=S (the per-task value of its configs/EFFT2.json)"
        )
    if is_efft_swin(state):
        return convert_efft2_swin(state, options)
    prefix = next((p for p in PREFIXES if state.has(f"{p}u1")), PREFIXES[0])
    factors = {ours: state.take(f"{prefix}{theirs}") for theirs, ours in FACTORS.items()}
    state.take_matching(rf"blocks\.\d+\.(attn|mlp)\.{prefix}[ucv]")  # the per-block aliases of the same tensors
    head = {"head.weight": state.take("head.weight"), "head.bias": state.take("head.bias")}
    backbone = state.take_matching(r".*")
    depth = sum(1 for key in backbone if key.endswith(".attn.qkv.weight"))
    slices = {core: factors[core].shape[-1] for core in SLICES}
    shared = all(slices[core] == per_block for core, per_block in SLICES.items())  # the released code
    for core, per_block in SLICES.items():
        if not shared and (slices[core] % per_block or (depth and slices[core] != per_block * depth)):
            raise CheckpointError(
                f"{state.path}: '{prefix}{core.lower()}' has {slices[core]} core slices; "
                f"{per_block} in both cores (shared) or {per_block}·{depth or 'L'} (per layer) expected"
            )
    depth = depth or slices["C1"] // SLICES["C1"]
    adapter = {f"efft.{name}": t for name, t in factors.items()} | head
    options = {"rank": int(factors["U1"].shape[1]), "core": "shared" if shared else "layer", **options}
    return OfficialImport("efft2", adapter, backbone, options, int(head["head.weight"].shape[0]), depth)
