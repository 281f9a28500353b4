"""Training losses. A loss sees the student's logits, the batch and the epoch, nothing else.

That signature is the place where distillation plugs in: a distillation loss reads
``batch.images`` to run its teachers and ``epoch`` to pick the round in force.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    """One training batch after augmentation: images and targets (class indices or soft, after mixup)."""

    images: torch.Tensor
    targets: torch.Tensor


class TrainLoss(Protocol):
    """What the training loop calls every step."""

    def __call__(self, logits: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor: ...


class ClassificationLoss(nn.Module):
    """Cross-entropy against class indices (with optional label smoothing) or soft targets (mixup/cutmix)."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor:
        logits = logits.float()  # the loss in float32 also under bf16/fp16 autocast
        if batch.targets.dtype.is_floating_point:  # soft targets already carry mixup's smoothing
            return torch.sum(-batch.targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, batch.targets, label_smoothing=self.smoothing)
