"""torch.compile with the default inductor backend computes what the eager network computes.

The benchmark's ``compile`` modes are only worth timing if the compiled network is the
same function. On the CPU inductor generates and builds C++ kernels, which takes tens
of seconds, so the network is the smallest BNext-T layout that still has every module
type: stem, 3x3 FFN, stride-2 ELM-attention that doubles into two 1x1 FFNs, SE gates, head.
"""

from __future__ import annotations

import copy

import torch
import torch._dynamo

import models
from models import fused_ops, tap_conv


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


def _training_step(forward, model: torch.nn.Module, x: torch.Tensor):
    logits = forward(x)
    (logits * torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    statistics = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
    return logits.detach(), grads, statistics


def test_compiled_training_step_matches_eager(monkeypatch) -> None:
    """Training mode: the compiled graph runs the fused kernels, the weight binarization and the tap
    products (custom operators) and updates the statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Two more blocks reach 4x4 planes, whose stride-1 3x3 binary convolution trains by tap products.
    layout = [8, 8, 16, 32, 32]
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=layout).train()
    models.set_temperature(model, 0.3)
    # In a network this small, a batch-norm channel can see four identical values (the
    # same signs in every sample): its variance is 0 and its backward multiplies the
    # rounding noise of its input gradient by gamma / sqrt(eps), about 300 per such layer.
    # Two eager implementations (fused and unfused kernels) then differ by 2 % on some
    # seeds; a larger eps keeps the comparison about the compiled code, not that noise.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.1
    x = torch.randn(4, 3, 16, 16)
    eager_model = copy.deepcopy(model)
    expected = _training_step(eager_model, eager_model, x)
    # The binarization writes the taps' layout in the graph too: the tap products copy no weight.
    copies = []
    monkeypatch.setattr(tap_conv, "tap_matrices", lambda weight: copies.append(weight.shape) or weight)
    with torch.profiler.profile() as profile:
        actual = _training_step(torch.compile(model, options=fused_ops.compile_options("cpu")), model, x)
    operators = {event.name for event in profile.events()}
    assert {"bnext::tap_conv2d", "bnext::tap_conv2d_backward", "bnext::processor_tail"} <= operators
    assert "bnext::processor_tail_backward" in operators
    assert "bnext::binarize_weight" in operators
    assert copies == []

    scale = expected[0].abs().max().item()
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5 * scale)
    assert actual[1].keys() == expected[1].keys() and len(expected[1]) > 20
    # Inductor's code for the glue between the kernels rounds differently. Each gradient is
    # compared at its own scale, but at least 1e-3 of the largest gradient in the model:
    # some are sums that cancel to nearly nothing (1e-9, against 1e-1 elsewhere) and
    # keep only rounding noise, which no implementation reproduces.
    floor = 1e-3 * max(grad.abs().max().item() for grad in expected[1].values())
    for name, grad in expected[1].items():
        scale = max(grad.abs().max().item(), floor)
        torch.testing.assert_close(
            actual[1][name], grad, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert actual[2].keys() == expected[2].keys()
    for name, buffer in expected[2].items():
        torch.testing.assert_close(actual[2][name], buffer, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    torch._dynamo.reset()


def _compiled_training(model: torch.nn.Module, x: torch.Tensor, steps: int, calls: list[str]):
    # The training script's loop: forward, backward, its optimizer, the constraints; the kernels each step called.
    from ImageNet.optim import build_optimizer

    forward = torch.compile(model, options=fused_ops.compile_options("cpu"))
    optimizer = build_optimizer(model, lr=0.05, weight_decay=1e-3, binary_weight_decay=1e-8)
    logits, called = [], []
    for _ in range(steps):
        calls.clear()
        output = forward(x)
        (output * torch.linspace(-1.0, 1.0, output.numel()).view_as(output)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        models.apply_constraints(model)
        logits.append(output.detach())
        called.append(set(calls))
    return logits, called, optimizer.state_dict()["state"]


def test_compiled_steps_take_the_prepared_weights_with_the_same_bits(monkeypatch, extension_calls) -> None:
    """From its third step on, a compiled step's graph takes the binarized weights that the optimizer's
    one-pass update prepared, as an eager step does, and computes exactly what binarizing anew gives."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16, 32, 32]).train()
    models.set_temperature(model, 0.3)
    start = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    logits, called, state = _compiled_training(model, x, 4, extension_calls)
    weights = copy.deepcopy(model.state_dict())
    # Steps 1 and 2 binarize in the graph (the first step's graph tells the layers their layout);
    # from step 3 the graph takes what the one-pass update of the step before prepared.
    assert all("divide_clamp" in kernels for kernels in called[:2])
    assert all("divide_clamp" not in kernels for kernels in called[2:])
    assert all("adamw_clamp_and_divide_clamp" in kernels for kernels in called[1:])

    model.load_state_dict(start)
    monkeypatch.setattr(fused_ops, "prepared_in_graph", lambda *args: None)  # the graph binarizes every step
    expected_logits, expected_called, expected_state = _compiled_training(model, x, 4, extension_calls)
    assert all("divide_clamp" in kernels for kernels in expected_called)
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    for index, moments in expected_state.items():
        assert all(torch.equal(state[index][key], value) for key, value in moments.items()), index
    torch._dynamo.reset()


def test_compiled_steps_add_the_residual_gradients_in_the_sign_kernel(monkeypatch) -> None:
    """A stride-1 binary FFN's residual is its input: in a compiled step, as in an eager one, the
    sign's backward kernel adds the residual's gradient while it writes the input's, instead of
    the graph adding it in a pass of its own."""
    from models.blocks import BinaryFFN

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 8, 16]).train()
    residual_inputs = sum(isinstance(m, BinaryFFN) and m.stride == 1 for m in model.modules())
    assert residual_inputs >= 3
    real = fused_ops.load_extension()
    folded: list[bool] = []

    class Spy:
        def __getattr__(self, name: str):
            if name != "biased_sign_backward":
                return getattr(real, name)

            def backward(*args):
                folded.append(args[-1].numel() > 0)  # the residual's gradient, or an empty tensor
                return real.biased_sign_backward(*args)

            return backward

    monkeypatch.setattr(fused_ops, "load_extension", lambda: Spy())
    x = torch.randn(2, 3, 16, 16)
    for forward in (model, torch.compile(model, options=fused_ops.compile_options("cpu"))):
        folded.clear()
        forward(x).sum().backward()
        model.zero_grad(set_to_none=True)
        assert sum(folded) == residual_inputs, "eager" if forward is model else "compiled"
    torch._dynamo.reset()
