"""Optimizer, learning-rate schedule and the progressive-binarization temperature schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim.adam import adam

import models


def parameter_groups(model: nn.Module, weight_decay: float, binary_weight_decay: float) -> list[dict]:
    """Two AdamW groups chosen by the layers' precision tags.

    Latent binary weights (``models.latent_binary_parameters``) get
    ``binary_weight_decay`` (official 1e-8); every other trainable parameter gets
    ``weight_decay`` (official 1e-3). The official script grouped by tensor rank
    instead (all 4-D tensors, which also caught the stem, the SE convs, the sign
    thresholds and the recoupling mixes, got 1e-8); this grouping follows the
    precision, as the paper's binary/real split does.
    """
    binary_ids = {id(param) for _, param in models.latent_binary_parameters(model)}
    binary, real = [], []
    for param in model.parameters():
        if param.requires_grad:
            (binary if id(param) in binary_ids else real).append(param)
    return [
        {"params": binary, "weight_decay": binary_weight_decay, "group": "binary"},
        {"params": real, "weight_decay": weight_decay, "group": "real"},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    binary_weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    updates_in_layers: bool = True,
) -> torch.optim.AdamW:
    """AdamW over the two precision groups, with the fused kernel where torch has one.

    The fused implementation updates every parameter in one kernel instead of a
    Python loop of element-wise operations per tensor: on the CPU it takes BNext-T's
    optimizer step from about 280 ms to 50 ms (one thread), as much as all its batch
    norms. It computes the same update to float rounding. Parameters on a device
    without the fused kernel get the default implementation. A model on the CPU with
    binary layers gets :class:`LayerConstrainedAdamW`, which makes each binary weight's
    update in its layer's constraint pass (the same bits, one pass less), unless
    ``updates_in_layers`` is False (for side-by-side timings).
    """
    groups = parameter_groups(model, weight_decay, binary_weight_decay)
    fused = _fused_supported(model)
    if updates_in_layers and fused and all(param.device.type == "cpu" for param in model.parameters()):
        layers = dict(models.constrained_binary_weights(model))
        if layers:
            return LayerConstrainedAdamW(groups, layers, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


class LayerConstrainedAdamW(torch.optim.AdamW):
    """Fused AdamW that hands the binary layers' weight updates to the layers' constraint pass.

    A binary layer clamps its latent weight after every optimizer step and binarizes it
    for the next step (``models.apply_constraints``): two passes over the weight, the
    optimizer's and the constraint's. Here each latent weight's AdamW update goes to its
    layer's ``update_and_constrain_`` instead, which makes the update, the clamp and the
    binarization one pass (on the CPU, where the layer's kernel applies); the weight and
    the moments are bit for bit what ``torch.optim.AdamW(fused=True)`` and the clamp
    leave, and ``models.apply_constraints`` then finds those layers done. Every other
    parameter, and a weight whose layer declines, gets torch's fused kernel as before.
    The state and its ``state_dict`` are AdamW's: checkpoints move freely between the two.
    ``layers`` maps each latent weight to its layer (``models.constrained_binary_weights``).

    A step with a gradient scaler's ``grad_scale`` or ``found_inf``, or in a group with
    amsgrad, ``maximize``, ``capturable``, ``differentiable`` or a tensor learning rate,
    is torch's throughout. The per-group work before the kernels is torch's own
    ``Adam._init_group`` (torch 2.14), the state's creation included.
    """

    def __init__(self, params: list[dict], layers: dict[torch.Tensor, nn.Module], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._layers = layers

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step (see the class docstring)."""
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if scaled or any(group["differentiable"] for group in self.param_groups):
            return super().step(closure)  # torch's own grad mode and scaling
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            if self._layers_may_update(group):
                rest = [
                    i
                    for i in range(len(params))
                    if not self._layer_update(group, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i])
                ]
                # The other parameters in one kernel call where it takes them (torch's bits), else torch's.
                if rest:
                    lists = [[values[i] for i in rest] for values in (params, grads, exp_avgs, exp_avg_sqs, steps)]
                    left = models.adamw_update_many(
                        *lists, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                        eps=group["eps"],
                    )  # fmt: skip
                    if left is not None:
                        rest = [rest[i] for i in left]
                params, grads, exp_avgs, exp_avg_sqs, steps = (
                    [values[i] for i in rest] for values in (params, grads, exp_avgs, exp_avg_sqs, steps)
                )
            if params:
                adam(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    max_exp_avg_sqs,
                    steps,
                    amsgrad=group["amsgrad"],
                    has_complex=has_complex,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    grad_scale=None,
                    found_inf=None,
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                )
        return loss

    @staticmethod
    def _layers_may_update(group: dict) -> bool:
        numbers = [group["lr"], group["weight_decay"], group["eps"], *group["betas"]]
        plain_numbers = not any(torch.is_tensor(value) for value in numbers)
        return (
            group["fused"]
            and group["decoupled_weight_decay"]
            and plain_numbers
            and not (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"])
        )

    def _layer_update(
        self,
        group: dict,
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: torch.Tensor,
    ) -> bool:
        layer = getattr(self, "_layers", {}).get(param)  # a copy made by pickling has none
        if layer is None:
            return False
        # torch's kernel adds 1 to the float32 step count, then reads it.
        next_step = float(numpy.float32(step.item()) + numpy.float32(1))
        beta1, beta2 = group["betas"]
        update = models.AdamWUpdate(
            grad, exp_avg, exp_avg_sq, next_step, group["lr"], beta1, beta2, group["weight_decay"], group["eps"]
        )
        if not layer.update_and_constrain_(update):
            return False
        step.add_(1)
        return True


def conform_state_to_parameters(optimizer: torch.optim.Optimizer) -> int:
    """Give every per-parameter state tensor its parameter's memory layout; returns how many were copied.

    A checkpoint written with one layout and resumed with the other (``--channels-last``
    switched) hands the optimizer moments whose strides differ from their parameters'.
    ``Optimizer.load_state_dict`` keeps the saved strides, and torch's fused AdamW walks a
    parameter and its moments in memory order: it would pair the wrong values, silently
    (torch 2.14.1). The copies hold the same values in the parameter's layout.
    """
    copied = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                # empty_like keeps the parameter's strides; copy_ moves the values by index, not by memory order
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                copied += 1
    return copied


#: Devices with a fused AdamW kernel for floating-point parameters (torch 2.4+).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_supported(model: nn.Module) -> bool:
    params = [param for param in model.parameters() if param.requires_grad]
    return bool(params) and all(
        param.device.type in FUSED_ADAMW_DEVICES and param.is_floating_point() for param in params
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    warmup_epochs: int,
    warmup_lr: float,
    min_lr: float,
    steps_per_epoch: int,
    on_updates: bool,
) -> CosineLRScheduler:
    """timm's cosine schedule after a linear warm-up prefix (official settings by default).

    Per epoch (official) the schedule is indexed by epoch; with ``on_updates`` by
    optimizer step, with the same shape stretched over the steps.
    """
    scale = steps_per_epoch if on_updates else 1
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs * scale,
        warmup_t=warmup_epochs * scale,
        warmup_lr_init=warmup_lr,
        lr_min=min_lr,
        warmup_prefix=True,
        t_in_epochs=not on_updates,
    )


@dataclass(frozen=True)
class TemperatureSchedule:
    """Progressive binarization: ``T(epoch) = start * decay ** epoch`` (official 1.0 and 0.9).

    With the official values the weights become exact signs (``T < 1e-7``) from
    epoch 153 on. Being a function of the epoch alone, it resumes exactly.
    """

    start: float = 1.0
    decay: float = 0.9

    def __post_init__(self) -> None:
        if not self.start > 0 or not 0 < self.decay <= 1:
            raise ValueError(f"temperature start must be > 0 and decay in (0, 1], got {self.start}, {self.decay}")

    def __call__(self, epoch: int) -> float:
        # Floor at the smallest normal float so that the value stays a valid positive temperature.
        return max(self.start * math.pow(self.decay, epoch), 1e-30)
