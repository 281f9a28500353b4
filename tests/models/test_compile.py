"""The networks are captured by torch.compile's frontend in one graph (no host syncs, no value branches)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import models


@pytest.mark.parametrize("name", ["bnext_tiny", "bnext18"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_has_no_graph_breaks(name: str, training: bool) -> None:
    torch._dynamo.reset()
    model = models.create_model(name, num_classes=10, stem="cifar", width_mult=0.125).train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_temperature_change_needs_no_recapture() -> None:
    # The temperature is a tensor read inside the graph, never a Python constant.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    outputs = []
    for temperature in (1.0, 0.3, 1e-8):
        models.set_temperature(model, temperature)
        outputs.append(compiled(x))
        with torch.no_grad():
            assert torch.allclose(outputs[-1], model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert not torch.allclose(outputs[0], outputs[2])
