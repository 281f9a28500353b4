"""torch.compile with the default inductor backend computes what the eager network computes.

The benchmark's ``compile`` modes are only worth timing if the compiled network is the
same function. On the CPU inductor generates and builds C++ kernels, which takes tens
of seconds, so the network is the smallest BNext-T layout that still has every module
type: stem, 3x3 FFN, stride-2 ELM-attention that doubles into two 1x1 FFNs, SE gates, head.
"""

from __future__ import annotations

import torch
import torch._dynamo

import models


def test_compiled_forward_matches_eager_in_eval_mode() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16]).eval()
    # Non-trivial batch-norm statistics and temperature, so that the compared outputs exercise them.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    models.set_temperature(model, 0.01)
    x = torch.randn(2, 3, 16, 16)

    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model)(x)

    assert actual.shape == expected.shape == (2, 10)
    # 1e-5 relative to the output's scale: elementwise, and over the whole tensor.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-5
