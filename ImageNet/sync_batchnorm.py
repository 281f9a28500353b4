"""Batch norm whose statistics cover the global batch of all processes, on any backend (gloo included).

``torch.nn.SyncBatchNorm`` runs only on CUDA tensors. :class:`SyncBatchNorm` here does the
same with plain collectives (``all_gather`` in the forward pass, ``all_reduce`` in the
backward pass), so CPU runs with the gloo backend can use ``--sync-bn`` too; on CUDA
:func:`convert_sync_batchnorm` still picks torch's fused implementation.

Forward (training): each process computes its per-channel count, mean and sum of squared
deviations; the processes exchange them and combine them exactly (the parallel variance
formula, in float64), so every process normalises with the mean and variance of the
global batch, and updates the running statistics with the same (unbiased) values.

Backward: with x̂ = (x - μ)/σ over the global batch of N values per channel and y = w x̂ + b,

    dL/dx = w/σ · (dL/dy - mean(dL/dy) - x̂ · mean(dL/dy · x̂)),

where both means run over the global batch: the two per-channel sums are all-reduced.
The weight and bias gradients are the local sums, as in torch's SyncBatchNorm:
DistributedDataParallel averages them over the processes like every other gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channels (dimension 1)."""
    return [0, *range(2, x.dim())]


def _per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against ``x`` of shape (N, C, ...)."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def global_batch_statistics(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, sum of squared deviations) per channel over ``x`` of every process of ``group``.

    The mean and deviation sums are float64; processes may hold batches of different sizes.
    """
    channels = x.shape[1]
    values = x.detach().double()
    dims = _reduce_dims(x)
    count = values.numel() // channels
    mean = values.mean(dims)
    m2 = (values - _per_channel(mean, values)).square().sum(dims)
    local = torch.cat([mean.new_tensor([float(count)]), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    counts, means, m2s = stats[:, :1], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    # Chan et al.: the deviations from each process's mean, moved to the global mean.
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return total, global_mean, global_m2


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalisation with given global statistics; the backward pass all-reduces the gradient sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total, group):
        # at least float32 (half inputs under autocast), float64 stays float64
        compute = torch.promote_types(x.dtype, torch.float32)
        mean, invstd = mean.to(compute), invstd.to(compute)
        x_hat = (x.to(compute) - _per_channel(mean, x)) * _per_channel(invstd, x)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.total, ctx.group, ctx.dtype = total, group, x.dtype
        out = x_hat
        if weight is not None:
            out = out * _per_channel(weight.to(compute), x) + _per_channel(bias.to(compute), x)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, invstd, weight = ctx.saved_tensors
        grad = grad_out.to(x_hat.dtype)
        dims = _reduce_dims(grad)
        sum_grad = grad.sum(dims)
        sum_grad_xhat = (grad * x_hat).sum(dims)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = sum_grad_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = sum_grad.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_grad, sum_grad_xhat])
            dist.all_reduce(sums, group=ctx.group)  # the means run over the global batch
            channels = sum_grad.numel()
            mean_grad = sums[:channels] / ctx.total
            mean_grad_xhat = sums[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
            grad_x = (grad - _per_channel(mean_grad, grad) - x_hat * _per_channel(mean_grad_xhat, grad)) * (
                _per_channel(scale, grad)
            )
            grad_x = grad_x.to(ctx.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all processes, for any input of shape (N, C, ...).

    Outside a process group, or in evaluation with running statistics, it is ordinary
    batch norm. Build it with :func:`convert_sync_batchnorm`.
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {x.dim()}-D input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` with the global batch statistics in training, the running ones in evaluation."""
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1
        if not (use_batch_stats and distributed):
            return super().forward(x)  # ordinary batch norm (momentum, running stats)
        total, mean, m2 = global_batch_statistics(x, self.process_group)
        if total < 2:
            raise ValueError(f"batch norm needs more than one value per channel over all processes, got {total}")
        variance = m2 / total
        invstd = torch.rsqrt(variance + self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, m2 / (total - 1))
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, mean, invstd, float(total), self.process_group)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None means a cumulative average, as in torch's batch norm
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_variance.to(self.running_var.dtype), alpha=factor)


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert(child, process_group))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device, process_group: Any = None) -> nn.Module:
    """Replace every batch-norm layer (1-D, 2-D, 3-D) of ``model`` by one synchronised over the processes.

    CUDA models get ``torch.nn.SyncBatchNorm`` (fused kernels); others get :class:`SyncBatchNorm`,
    which works with any process-group backend. Parameters and running statistics are kept
    (the same tensors), so a converted model loads and saves the same state dict.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert(model, process_group)
