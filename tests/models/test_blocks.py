"""The processor modules compute the official formulas, whichever way a training step evaluates them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import fused_ops
from models.blocks import ELMAttention


def _official_elm_attention(m: ELMAttention, x: torch.Tensor) -> torch.Tensor:
    """Official ``bnext.py`` ELM attention at stride 2: the mix is the pooled input, pooled to its mean."""
    signs = m.binary_activation(m.move(x))
    b = m.activation2(m.norm1(F.conv2d(signs, m.binary_conv.binary_weight(), stride=2, padding=1)))
    residual = F.avg_pool2d(m.activation1(x), 2, 2)
    mix = F.avg_pool2d(x, 2, 2)
    scale = m.scale
    gate = m.se(scale * mix + (1 - scale) * b)
    return m.norm2(gate * b * residual) + residual


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
def test_strided_elm_attention_trains_on_the_official_formula(fused: bool) -> None:
    # In training the mix's mean is taken as x's own, which equals that of its pooling.
    torch.manual_seed(0)
    module = ELMAttention(16, stride=2).train()
    with torch.no_grad():
        module.binary_conv.weight.normal_(0, 0.5)
        module.scale.uniform_(0.2, 0.8)
    reference = ELMAttention(16, stride=2).train()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(4, 16, 8, 8) * 2
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    upstream = torch.randn(4, 16, 4, 4)
    with fused_ops.disabled() if not fused else torch.enable_grad():
        (module(x) * upstream).sum().backward()
    (_official_elm_attention(reference, x_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for (name, buffer), expected in zip(module.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, expected, msg=lambda m, name=name: f"{name}: {m}")


def test_strided_elm_attention_in_evaluation_keeps_the_official_bits() -> None:
    torch.manual_seed(0)
    module = ELMAttention(16, stride=2).eval()
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(module(x), _official_elm_attention(module, x))
