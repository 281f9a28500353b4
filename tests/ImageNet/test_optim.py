"""The optimizer: binary layers take their AdamW update into their constraint pass, with torch's bits."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import models
from ImageNet.optim import LayerConstrainedAdamW, build_optimizer, parameter_groups
from models import fused_ops

_needs_kernels = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model("bnext_tiny", num_classes=5, stem="cifar", width_mult=0.25).train()


def _torch_adamw(model: torch.nn.Module, **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, 1e-3, 1e-8), lr=1e-2, fused=True, **kwargs)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, scale: float | None = None) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=generator)
        y = torch.randint(0, 5, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if scale is not None:  # what a gradient scaler hands a fused optimizer
            optimizer.grad_scale, optimizer.found_inf = torch.tensor(scale), torch.tensor(0.0)
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
        optimizer.step()
        models.apply_constraints(model)


def _assert_same(model: torch.nn.Module, twin: torch.nn.Module, optimizer, reference) -> None:
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state_dict()["state"].values(), reference.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def layer_updates(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each binary layer's update_and_constrain_ returned, in order."""
    returned: list[bool] = []
    real = models.BinaryConv2d.update_and_constrain_

    def spy(layer, update):
        returned.append(real(layer, update))
        return returned[-1]

    monkeypatch.setattr(models.BinaryConv2d, "update_and_constrain_", spy)
    return returned


@pytest.fixture
def many_updates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], list[int] | None]]:
    """Per call of models.adamw_update_many: the sizes of the parameters it was handed, and those it left."""
    calls: list[tuple[list[int], list[int] | None]] = []
    real = models.adamw_update_many

    def spy(params, *args, **kwargs):
        left = real(params, *args, **kwargs)
        calls.append(([param.numel() for param in params], left))
        return left

    monkeypatch.setattr(models, "adamw_update_many", spy)
    return calls


def test_a_cpu_model_with_binary_layers_gets_the_layer_constrained_adamw() -> None:
    model = _model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8)
    assert type(optimizer) is LayerConstrainedAdamW and optimizer.defaults["fused"]
    plain = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert type(build_optimizer(plain, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8)) is torch.optim.AdamW


@_needs_kernels
def test_training_steps_give_torchs_fused_adamw_bits_with_one_pass_per_binary_weight(
    layer_updates, many_updates
) -> None:
    model = _model()
    twin = copy.deepcopy(model)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=1e-3, binary_weight_decay=1e-8)
    reference = _torch_adamw(twin)
    layers = sum(isinstance(m, models.BinaryConv2d) for m in model.modules())
    _train(model, optimizer, 4)
    calls_before_twin = len(layer_updates)
    _train(twin, reference, 4)
    # Every binary layer of this model holds a multiple of 16 values: all took the update, in every step.
    assert layer_updates == [True] * (4 * layers) and calls_before_twin == 4 * layers
    # The real-valued group's parameters went to one kernel call per step, which left to torch's kernel
    # exactly those of sizes that are not multiples of 16 (this narrow model has many).
    assert len(many_updates) == 4
    for sizes, left in many_updates:
        assert left == [i for i, size in enumerate(sizes) if size % 16]
    assert any(left for _, left in many_updates) and any(len(left) < len(sizes) for sizes, left in many_updates)
    _assert_same(model, twin, optimizer, reference)


@_needs_kernels
def test_checkpoints_move_between_the_layer_constrained_and_torchs_adamw() -> None:
    model = _model()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=1e-3, binary_weight_decay=1e-8)
    _train(model, optimizer, 2)
    twin = copy.deepcopy(model)
    reference = _torch_adamw(twin)
    reference.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, optimizer, 2)
    _train(twin, reference, 2)
    _assert_same(model, twin, optimizer, reference)
    resumed = build_optimizer(twin, lr=1e-2, weight_decay=1e-3, binary_weight_decay=1e-8)
    resumed.load_state_dict(reference.state_dict())
    _train(model, optimizer, 1)
    _train(twin, resumed, 1)
    _assert_same(model, twin, optimizer, resumed)


@_needs_kernels
@pytest.mark.parametrize("case", ["gradient scaler", "amsgrad", "tensor learning rate"])
def test_steps_that_the_layers_kernel_does_not_cover_are_torchs_throughout(layer_updates, case: str) -> None:
    model = _model()
    twin = copy.deepcopy(model)
    kwargs = {"amsgrad": True} if case == "amsgrad" else {}
    optimizer = LayerConstrainedAdamW(
        parameter_groups(model, 1e-3, 1e-8),
        dict(models.constrained_binary_weights(model)),
        lr=1e-2,
        fused=True,
        **kwargs,
    )
    reference = _torch_adamw(twin, **kwargs)
    if case == "tensor learning rate":
        for group in (*optimizer.param_groups, *reference.param_groups):
            group["lr"] = torch.tensor(1e-2)
    scale = 4.0 if case == "gradient scaler" else None
    _train(model, optimizer, 3, scale)
    _train(twin, reference, 3, scale)
    assert layer_updates == []
    _assert_same(model, twin, optimizer, reference)
