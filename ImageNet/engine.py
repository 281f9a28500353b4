"""One training epoch and one (sharded, exactly reduced) evaluation pass."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import models

from .distributed import all_reduce_sum
from .losses import Batch, TrainLoss

#: What :func:`train_one_epoch` sums per epoch, in this order (the checkpoint keeps a partial epoch's sums).
EPOCH_TOTALS = ("loss_sum", "correct1", "correct5", "images", "skipped_steps", "skipped_images")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before anything is saved."""


def _all_finite(value: float, device: torch.device) -> bool:
    """Whether ``value`` is finite on every process: all processes skip or stop together.

    A process that stopped alone would leave the others waiting in the next collective.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return math.isfinite(value)
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


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
    #: test hook (``--debug-nan-at-step``): the loss becomes NaN at this global step (on rank 0)
    nan_at_step: int | None = None
    #: skip (and count) a step with a non-finite loss or gradient instead of raising NonFiniteLossError
    skip_nonfinite: bool = False
    #: steps skipped so far (a run total; identical on every process)
    skipped_steps: int = 0
    #: whether the last call of :meth:`step` skipped the update
    skipped: bool = False
    _saved_buffers: list = field(default_factory=list, repr=False)

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
        """One optimizer step on a batch with class-index targets; returns the detached loss and logits.

        A non-finite loss on any process raises :class:`NonFiniteLossError` on every
        process before the weights change. With ``skip_nonfinite`` the step is skipped
        instead, also when the gradient norm is non-finite (without fp16 loss scaling,
        which skips such steps itself): no update, gradients zeroed, batch-norm
        statistics restored, ``skipped`` set and ``skipped_steps`` counted. A skipped
        step still advances ``global_step`` (and the schedule): its batch is consumed.
        """
        self.skipped = False
        # A skipped step must not change anything, but its forward pass updates the batch-norm
        # running statistics (with NaNs, if the activations are): keep a copy to put back.
        self._saved_buffers = [(b, b.clone()) for b in self.model.buffers()] if self.skip_nonfinite else []
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits, Batch(images, targets), epoch)
        if self.nan_at_step == self.global_step and _rank() == 0:
            loss = loss * float("nan")
        # One host sync per step: a non-finite loss must stop the run before the
        # optimizer writes NaNs into the weights (and before any checkpoint).
        if not _all_finite(loss.item(), self.device):
            self._non_finite(f"the loss is {loss.item()} (on this process) at epoch {epoch}")
            return loss.detach(), logits.detach()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            # GradScaler skips steps with inf/NaN gradients itself and lowers the scale.
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            norm = self._clip()
            # DDP has averaged the gradients, so every process sees the same norm.
            if norm is not None and not math.isfinite(norm):
                self._non_finite(f"the gradient norm is {norm} at epoch {epoch}")
                return loss.detach(), logits.detach()
            self.optimizer.step()
        self._finish_step(updated=True)
        return loss.detach(), logits.detach()

    def _non_finite(self, what: str) -> None:
        """Skip the step (``skip_nonfinite``) or raise, naming the step."""
        if not self.skip_nonfinite:
            raise NonFiniteLossError(f"{what}, global step {self.global_step}")
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in self._saved_buffers:
                buffer.copy_(saved)
        self.skipped = True
        self.skipped_steps += 1
        self._finish_step(updated=False)

    def _finish_step(self, updated: bool) -> None:
        if updated:
            models.apply_constraints(self.constrained or self.model)
        self.global_step += 1
        if updated and self.ema is not None:
            self.ema.update(self.constrained or self.model, step=self.global_step)
        if self.scheduler is not None and self.sched_on_updates:
            self.scheduler.step_update(num_updates=self.global_step)

    def _clip(self) -> float | None:
        """Clip the gradient norm when asked to; with ``skip_nonfinite``, return the norm too.

        Reading the norm costs a host sync, so only ``skip_nonfinite`` runs pay for it; the
        others catch non-finite weights before a checkpoint is written (training.Run.save).
        """
        if not (self.skip_nonfinite and self.scaler is None):
            if self.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            return None
        if self.clip_grad > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad))
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
    totals: torch.Tensor | None = None,
    skipped_images: Callable[[], int] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns loss, top-1/top-5, skips and timings.

    Loss and accuracies (against the batch's class labels, before mixup) are summed
    over all processes, so they describe the whole epoch, not one shard; skipped steps
    are excluded from them and counted. ``on_step(batch_index)`` runs after every step
    (the caller uses it for checkpoints); ``start_batch`` is where a resumed epoch
    begins. ``totals`` (float64, :data:`EPOCH_TOTALS`) is updated in place, so a
    checkpoint can save a partial epoch and a resumed epoch can continue its sums.
    ``skipped_images()`` is the dataset's running count of skipped bad images.
    """
    trainer.model.train()
    if totals is None:
        totals = torch.zeros(len(EPOCH_TOTALS), dtype=torch.float64, device=trainer.device)
    images_before = skipped_images() if skipped_images is not None else 0
    images_start = totals[3].item()  # a resumed epoch's totals hold the images before the interruption
    data_time = compute_time = 0.0
    tick = time.perf_counter()
    for batch_index, (images, targets) in enumerate(loader, start=start_batch):
        images, targets = trainer.to_device(images, targets)
        started = time.perf_counter()
        data_time += started - tick
        loss, logits = trainer.step(images, targets, epoch)
        if skipped_images is not None:
            images_now = skipped_images()
            totals[5] += images_now - images_before
            images_before = images_now
        if trainer.skipped:
            totals[4] += 1
        else:
            top1, top5 = accuracy_counts(logits.float(), targets)
            count = torch.tensor(float(images.shape[0]), dtype=torch.float64, device=trainer.device)
            totals[:4] += torch.stack([loss.double() * count, top1.double(), top5.double(), count])
        tick = time.perf_counter()
        compute_time += tick - started
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_step is not None:
            on_step(batch_index + 1)
    local_images = totals[3].item() - images_start
    summed = all_reduce_sum(totals.clone())
    loss_sum, correct1, correct5, count, skipped_steps, bad_images = summed.tolist()
    elapsed = data_time + compute_time
    return {
        "loss": loss_sum / count if count else float("nan"),
        "top1": 100.0 * correct1 / count if count else float("nan"),
        "top5": 100.0 * correct5 / count if count else float("nan"),
        "images": count,
        # every process skips the same steps, so the sum over processes counts each one world-size times
        "skipped_steps": skipped_steps / _world_size(),
        "skipped_images": bad_images,
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
