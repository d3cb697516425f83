"""Mixup / CutMix with label smoothing, as the official RLRR `train_fgvc_aug.py` trains (timm's `Mixup`,
mode "batch", applied to every batch, mixup or cutmix picked with probability 0.5 when both are on).

With ε = label smoothing, K classes, ỹ = (1 − ε) one_hot(y) + ε / K, and the batch paired with its reverse:

    mixup:   x' = λ x + (1 − λ) x.flip(0),              λ ~ Beta(α_mixup, α_mixup)
    cutmix:  x' = x with a box of x.flip(0) pasted in,   λ = 1 − box area / image area (box from Beta(α_cutmix, ·))
    targets: y' = λ ỹ + (1 − λ) ỹ.flip(0)                (soft: SoftTargetCrossEntropy, −Σ y' log softmax(z))

timm draws λ from numpy's global generator (the train stage seeds it). A batch of odd size (the last partial
one) cannot be paired image by image: it trains on ỹ alone, unmixed.
"""

from __future__ import annotations

import torch

from vitfold.pipeline.config import TrainConfig


class Mixing:
    """(x, y) -> (mixed x, soft targets [B, K]) for the settings of `tc` (when `Mixing.wanted(tc)`)."""

    def __init__(self, tc: TrainConfig, num_classes: int) -> None:
        from timm.data import Mixup

        self.num_classes, self.smoothing = num_classes, tc.label_smoothing
        self.mixup = Mixup(
            mixup_alpha=tc.mixup_alpha,
            cutmix_alpha=tc.cutmix_alpha,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=tc.label_smoothing,
            num_classes=num_classes,
        )

    @staticmethod
    def wanted(tc: TrainConfig) -> bool:
        return tc.mixup_alpha > 0 or tc.cutmix_alpha > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            from timm.data.mixup import mixup_target

            return x, mixup_target(y, self.num_classes, smoothing=self.smoothing)
        return self.mixup(x, y)


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_k targets_k · log softmax(logits)_k (timm's SoftTargetCrossEntropy)."""
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits, targets)
