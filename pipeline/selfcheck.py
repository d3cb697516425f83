"""Fold self-check: adapt the configured backbone with random (non-identity) adapter values, fold it,
and measure how far the folded model is from the unmerged one, against a float64 evaluation."""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipeline.adapting import adapt, trainable_named_parameters
from pipeline.backbones import create_backbone
from pipeline.config import RunConfig
from pipeline.folding import fold


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖, computed in float64."""
    ref = reference.double()
    return float((value.double() - ref).norm() / ref.norm())


def fold_check(cfg: RunConfig, batch_sizes: tuple[int, ...] = (1, 4), std: float = 0.05) -> dict[str, Any]:
    """Relative logit errors of folded vs unmerged (float32), and of each against float64 unmerged."""
    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg.backbone, **cfg.backbone_kwargs).eval()
    adapted = adapt(model, cfg.method, num_classes=cfg.num_classes, **cfg.method_options)
    with torch.no_grad():
        for _, p in trainable_named_parameters(adapted):
            p.add_(torch.randn_like(p) * std)  # every adapter tensor away from its init
    folded = fold(adapted)
    reference64 = copy.deepcopy(adapted).double()
    size = adapted.patch_embed.img_size
    rows = []
    with torch.no_grad():
        for bs in batch_sizes:
            x = torch.randn(bs, 3, *size)
            unmerged, plain, exact = adapted(x), folded(x), reference64(x.double())
            rows.append(
                {
                    "batch_size": bs,
                    "folded_vs_unmerged": relative_error(plain, unmerged),
                    "unmerged_vs_float64": relative_error(unmerged, exact),
                    "folded_vs_float64": relative_error(plain, exact),
                }
            )
    return {"backbone": cfg.backbone, "method": cfg.method, "results": rows}
