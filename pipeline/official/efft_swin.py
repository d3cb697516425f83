"""Swin checkpoints of the official EFFT code (`methods/Set_EFFT.py`: `set_Swin_EFFT`, `set_Swin_S_EFFT`,
`set_Swin_L_EFFT`, saved by `execute.py` as {"model_state_dict": ...}) in vitfold's terms.

One factor set per stage s = 1..4 on the model root, in x·W orientation, the core's slice axis FIRST:

    EFFT_{s}_attn_u [C, r], EFFT_{s}_attn_c [4, r, r], EFFT_{s}_attn_v [r, C]
        ΔW_{q,k,v,o} = scale · u c[j] v  (j = 0..3)
    EFFT_{s}_mlp_u [C, r1], EFFT_{s}_mlp_c [k, r1, r2], EFFT_{s}_mlp_v [r2, 4C]
        ΔW_fc1 = scale · u c[0] v,  ΔW_fc2 = (scale · u c[1] v)ᵀ

Every block of a stage reads the same slices (a shared core: vitfold's `core=shared`), so only c[:4] and
c[:2] are ever read; the released code gives stage 3's FFN core k = 18 slices, of which 16 are unused:
they are dropped, with a note. The ranks double from stage to stage (vitfold's `rank`, `ffn_rank`,
`ffn_rank2` are the last stage's). Each block's attention and MLP register the same tensors again
(`layers.{i}.blocks.{j}.{attn,mlp}.EFFT_{u,v,c}`): aliases, dropped. vitfold's layout, its slice axis last:

    EFFT_{s}_attn_{u,c,v}  ->  layers.{s-1}.efft.U1, C1 = c[:4] moved to [r, r, 4], V1
    EFFT_{s}_mlp_{u,c,v}   ->  layers.{s-1}.efft.U2, C2 = c[:2] moved to [r1, r2, 2], V2
    head.*, the backbone   ->  timm 1.0's names (`vitfold.pipeline.official.swin`)
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vitfold.errors import CheckpointError
from vitfold.pipeline.official.state import OfficialImport, OfficialState
from vitfold.pipeline.official.swin import BUFFERS, is_release_layout, timm_name

USED_SLICES = {"attn": 4, "mlp": 2}
ALIASES = r"layers\.\d+\.blocks\.\d+\.(attn|mlp)\.EFFT_[ucv]"


def is_efft_swin(state: OfficialState) -> bool:
    return state.has("EFFT_1_attn_u")


def convert_efft2_swin(state: OfficialState, options: dict[str, Any]) -> OfficialImport:
    """The official EFFT Swin checkpoint as vitfold's `efft2` with `core=shared` and the checkpoint's ranks."""
    release = is_release_layout(state.names())
    stages = 1 + max(int(m.group(1)) for n in state.names() if (m := re.fullmatch(r"EFFT_(\d+)_attn_u", n)))
    adapter: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    ranks: list[tuple[int, int, int]] = []
    for s in range(1, stages):
        ours = f"layers.{s - 1}.efft."
        for part, n in (("attn", "1"), ("mlp", "2")):
            u, c, v = (state.take(f"EFFT_{s}_{part}_{f}") for f in "ucv")
            used = USED_SLICES[part]
            if c.shape[0] < used:
                raise CheckpointError(
                    f"{state.path}: 'EFFT_{s}_{part}_c' has {c.shape[0]} core slices, fewer than {used}"
                )
            if c.shape[0] > used:
                unused.append(f"EFFT_{s}_{part}_c[{used}:{c.shape[0]}] ({(c.shape[0] - used) * c[0].numel():,} values)")
            adapter |= {ours + f"U{n}": u, ours + f"C{n}": c[:used].movedim(0, -1).contiguous(), ours + f"V{n}": v}
        ranks.append((adapter[ours + "U1"].shape[1], adapter[ours + "U2"].shape[1], adapter[ours + "V2"].shape[0]))
    last = ranks[-1]
    for index, stage_ranks in enumerate(ranks):
        expected = tuple(r >> (len(ranks) - 1 - index) for r in last)
        if stage_ranks != expected:
            raise CheckpointError(
                f"{state.path}: stage {index + 1}'s ranks (attention, FFN r1, r2) are {stage_ranks}, not {expected}: "
                "vitfold's Swin EFFT doubles its ranks from stage to stage"
            )
    state.take_matching(ALIASES)
    state.take_matching(BUFFERS)
    backbone = {timm_name(n, release): t for n, t in state.take_matching(r".*").items()}
    head = {k: backbone.pop(k) for k in ("head.fc.weight", "head.fc.bias") if k in backbone}
    if len(head) != 2:
        raise CheckpointError(f"{state.path} lacks the classifier 'head.weight' / 'head.bias' of an official EFFT Swin")
    notes = (f"dropped core slices the released forward never reads: {', '.join(unused)}",) if unused else ()
    found = {"rank": last[0], "ffn_rank": last[1], "ffn_rank2": last[2], "core": "shared"}
    depth = sum(1 for key in backbone if key.endswith(".attn.qkv.weight"))
    num_classes = int(head["head.fc.weight"].shape[0])
    return OfficialImport("efft2", adapter | head, backbone, found | options, num_classes, depth, notes)
