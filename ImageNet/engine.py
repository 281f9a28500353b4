"""One training epoch and one (sharded, exactly reduced) evaluation pass."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import models

from .distributed import all_reduce_sum
from .losses import Batch, TrainLoss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before anything is saved."""


@dataclass
class Trainer:
    """Everything a training step needs that does not change from step to step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: TrainLoss
    device: torch.device
    scheduler: Any = None
    sched_on_updates: bool = False
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float = 0.0
    channels_last: bool = False
    mixup: Callable | None = None
    ema: Any = None
    #: the model whose constraints are applied after each step (unwrapped from DDP/compile)
    constrained: nn.Module | None = None
    global_step: int = 0
    #: test hook (``--debug-nan-at-step``): the loss becomes NaN at this global step
    nan_at_step: int | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the student when asked for, a no-op otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a batch to the device, in the model's memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=fmt)
        return images, targets.to(self.device, non_blocking=non_blocking)

    def step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch with class-index targets; returns the detached loss and logits."""
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits, Batch(images, targets), epoch)
        if self.nan_at_step == self.global_step:
            loss = loss * float("nan")
        # One host sync per step: a non-finite loss must stop the run before the
        # optimizer writes NaNs into the weights (and before any checkpoint).
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"the loss is {loss.item()} at epoch {epoch}, global step {self.global_step}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip()
            self.optimizer.step()
        models.apply_constraints(self.constrained or self.model)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.constrained or self.model, step=self.global_step)
        if self.scheduler is not None and self.sched_on_updates:
            self.scheduler.step_update(num_updates=self.global_step)
        return loss.detach(), logits.detach()

    def _clip(self) -> None:
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is within the top-k logits, for each k (capped at the class count)."""
    maxk = min(max(topk), logits.shape[1])
    predicted = logits.topk(maxk, dim=1).indices
    hits = predicted.eq(targets.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


def train_one_epoch(
    trainer: Trainer,
    loader: Iterable,
    epoch: int,
    *,
    on_step: Callable[[int], None] | None = None,
    progress: Any = None,
    start_batch: int = 0,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns loss, top-1/top-5 and timings.

    Loss and accuracies (against the batch's class labels, before mixup) are summed
    over all processes, so they describe the whole epoch, not one shard.
    ``on_step(batch_index)`` runs after every step (the caller uses it for
    time-based checkpoints); ``start_batch`` is where a resumed epoch begins.
    """
    trainer.model.train()
    totals = torch.zeros(4, dtype=torch.float64, device=trainer.device)  # loss sum, correct1, correct5, count
    data_time = compute_time = 0.0
    tick = time.perf_counter()
    for batch_index, (images, targets) in enumerate(loader, start=start_batch):
        images, targets = trainer.to_device(images, targets)
        started = time.perf_counter()
        data_time += started - tick
        loss, logits = trainer.step(images, targets, epoch)
        top1, top5 = accuracy_counts(logits.float(), targets)
        count = torch.tensor(float(images.shape[0]), dtype=torch.float64, device=trainer.device)
        totals += torch.stack([loss.double() * count, top1.double(), top5.double(), count])
        tick = time.perf_counter()
        compute_time += tick - started
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_step is not None:
            on_step(batch_index + 1)
    local_images = totals[3].item()
    all_reduce_sum(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    elapsed = data_time + compute_time
    return {
        "loss": loss_sum / count if count else float("nan"),
        "top1": 100.0 * correct1 / count if count else float("nan"),
        "top5": 100.0 * correct5 / count if count else float("nan"),
        "images": count,
        "images_per_second": local_images / elapsed if elapsed > 0 else 0.0,
        "data_time": data_time,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole evaluation set.

    Each process evaluates its own shard (every sample exactly once across ranks);
    the counts, not per-rank percentages, are summed over processes, so the result
    is exact for any number of processes.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    for images, targets in loader:
        images = images.to(device).contiguous(memory_format=fmt)
        targets = targets.to(device)
        with autocast:
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy_counts(logits, targets)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        totals += torch.stack([top1.double(), top5.double(), loss.double(), torch.tensor(len(targets), device=device)])
    all_reduce_sum(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the evaluation set is empty")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "count": count,
    }
