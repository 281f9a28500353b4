"""The custom-operator experiment times the same kernels: same logits and gradients, no statistics update."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import models
from benchmarks import compile_custom_ops_experiment as experiment
from models import fused_ops

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and fused_ops.load_extension() is None,
    reason="the fused C++ extension could not be built here (see the warning)",
)


def _train_step(model: torch.nn.Module, x: torch.Tensor):
    logits = model(x)
    logits.sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_custom_operators_compute_what_the_fused_functions_compute(monkeypatch) -> None:
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 16]).train()
    x = torch.randn(4, 3, 16, 16)
    via_functions = copy.deepcopy(model)
    expected_logits, expected_grads = _train_step(via_functions, x)
    for name, replacement in experiment.REPLACEMENTS.items():
        monkeypatch.setattr(fused_ops, name, replacement)
    before = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
    logits, grads = _train_step(model, x)
    assert torch.equal(logits, expected_logits)
    assert len(grads) == len(expected_grads)
    for grad, expected in zip(grads, expected_grads):
        assert torch.equal(grad, expected)
    # The stated limitation: the kernels' batch norms update throw-away statistics.
    after = dict(model.named_buffers())
    kernel_norms = [name for name in before if ".norm1." in name]
    assert kernel_norms and all(torch.equal(before[name], after[name]) for name in kernel_norms)


def test_the_compiled_graph_has_no_breaks(monkeypatch) -> None:
    """What the experiment times: one graph; the kernels without a custom operator stay out of it."""
    torch._dynamo.reset()
    for name, replacement in experiment.REPLACEMENTS.items():
        monkeypatch.setattr(fused_ops, name, replacement)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 16]).train()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 16, 16))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
