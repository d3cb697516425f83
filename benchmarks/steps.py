"""The training step the GPU benchmarks time and profile: AdamW over the trainable tensors, bf16 autocast
on CUDA (the train stage's precision), fp32 elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def training_step(
    model: nn.Module,
    params: list[torch.Tensor],
    batch: int,
    classes: int,
    fused: bool = False,
    graphs: bool = False,
) -> Callable[[], None]:
    """A closure running one step of `model` (maybe compiled) on a fixed random batch on its device.

    `fused`: AdamW's fused kernel (one launch for all tensors, instead of a few per tensor group);
    `graphs`: the model was compiled with CUDA graphs (mode reduce-overhead or max-autotune), so each step
    tells torch that a new iteration begins (the graphs' outputs of the last one may be overwritten)."""
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)  # (a compiled module forwards attributes)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
