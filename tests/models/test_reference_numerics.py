"""The models compute what the official implementation computes (``shared/reference`` fixtures).

Tolerances are the issue's: logits and loss within 1e-4 relative, gradients within
1e-3 relative, batch-norm statistics within 1e-4.

Two float32 facts shape the comparison, both measured on these fixtures:

* A binary network is discontinuous: a pre-activation within rounding distance of
  zero takes either sign depending on the order in which a convolution kernel
  sums. Where that happens, the official float32 value is reproduced by this
  implementation in float32 *or* in float64 (which sums differently), but no single
  precision reproduces every entry on every CPU. Each quantity is therefore
  checked in both and must match in at least one; a wrong formula matches in
  neither.
* A gradient tensor's rounding noise scales with the largest gradient of the
  network, not with the tensor itself: a tensor a million times smaller than the
  largest carries float32 noise of its own size. Gradient errors below
  ``1e-6 * (largest stored gradient norm)`` count as agreement.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import models

LOGIT_RTOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_NOISE_FLOOR = 1e-6
TEMPERATURES = ("1", "0.3", "1e-08")
TRAIN_TEMPERATURE = 0.3

# fixture file -> create_model keywords (the stage_channels key refers to reduced_stage_channels.json)
CASES = {
    "bnext_tiny_w4_cifar10": dict(name="bnext_tiny", stem="cifar", channels="tiny_w4"),
    "bnext_large_w8_cifar10": dict(name="bnext_large", stem="cifar", channels="large_w8"),
    "bnext_tiny_w4_imagenet1000": dict(name="bnext_tiny", stem="imagenet", channels="tiny_w4"),
    "bnext_tiny_w4_cifar10_elm0_ir0": dict(
        name="bnext_tiny", stem="cifar", channels="tiny_w4", elm_attention=False, info_recoupling=False
    ),
    "bnext_tiny_w4_cifar10_elm0_ir1": dict(name="bnext_tiny", stem="cifar", channels="tiny_w4", elm_attention=False),
    "bnext_tiny_w4_cifar10_elm1_ir0": dict(name="bnext_tiny", stem="cifar", channels="tiny_w4", info_recoupling=False),
    "bnext18_cifar10": dict(name="bnext18", stem="cifar"),
}


def test_every_fixture_file_is_covered(reference_dir: Path) -> None:
    present = {path.name.removesuffix(".safetensors") for path in reference_dir.glob("*.safetensors")}
    assert present == set(CASES)


def _load_fixture(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def _build(case: dict, reduced: dict[str, list[int]], num_classes: int, tensors, dtype: torch.dtype):
    kwargs = {key: value for key, value in case.items() if key != "channels"}
    if "channels" in case:
        kwargs["stage_channels"] = reduced[case["channels"]]
    model = models.create_model(num_classes=num_classes, **kwargs)
    state = {key.removeprefix("state."): value for key, value in tensors.items() if key.startswith("state.")}
    # The fixtures do not store temperatures: the test sets them.
    state.update({key: value for key, value in model.state_dict().items() if key.endswith("temperature")})
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _run(case, reduced, tensors, meta, dtype) -> dict[str, torch.Tensor]:
    """Every quantity the fixture stores, computed by our model in ``dtype``."""
    model = _build(case, reduced, int(meta["num_classes"]), tensors, dtype)
    x = tensors["input"].to(dtype)
    out: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        for t in TEMPERATURES:
            models.set_temperature(model, float(t))
            out[f"eval_logits.T={t}"] = model(x)
    model.train()
    models.set_temperature(model, TRAIN_TEMPERATURE)
    logits = model(x)
    loss = F.cross_entropy(logits, tensors["train_target"])
    loss.backward()
    out["train_logits.T=0.3"] = logits.detach()
    out["train_loss.T=0.3"] = loss.detach().reshape(1)
    params = dict(model.named_parameters())
    for key in tensors:
        if key.startswith("train_grad."):
            out[key] = params[key.removeprefix("train_grad.")].grad
    order = json.loads(meta["grad_norm_order"])
    out["train_grad_norms"] = torch.stack([params[name].grad.norm() for name in order])
    out["grad_holders"] = sorted(name for name, p in params.items() if p.grad is not None)
    buffers = dict(model.named_buffers())
    for key in tensors:
        if key.startswith("after_train_state."):
            out[key] = buffers[key.removeprefix("after_train_state.")]
    return out


def _error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.double() - ref.double()).norm().item()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # How a convolution kernel splits its sums depends on the thread count. With two
    # threads, BNext-18's hard-sign logits (|logits| ~ 1e8 at T = 1e-8) flip enough
    # near-zero signs to leave the tolerance in both precisions; with one thread they
    # match. The suite used to pass only because earlier tests had set one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(CASES))
def computed(request, reference_dir: Path, reduced_channels):
    name = request.param
    tensors, meta = _load_fixture(reference_dir / f"{name}.safetensors")
    with _one_thread():
        ours = {
            dtype: _run(CASES[name], reduced_channels, tensors, meta, dtype) for dtype in (torch.float32, torch.float64)
        }
    return name, tensors, meta, ours


def _mismatches(keys, tensors, ours, rtol: float, atol: float = 0.0) -> list[str]:
    bad = []
    for key in keys:
        ref = tensors[key]
        limit = rtol * ref.double().norm().item() + atol
        errors = {str(dtype): _error(result[key], ref) for dtype, result in ours.items()}
        if min(errors.values()) > limit:
            bad.append(f"{key}: errors {errors} > {limit:.3g} (|ref| = {ref.double().norm().item():.3g})")
    return bad


def test_logits_and_loss(computed) -> None:
    name, tensors, _, ours = computed
    keys = [f"eval_logits.T={t}" for t in TEMPERATURES] + ["train_logits.T=0.3", "train_loss.T=0.3"]
    assert _mismatches(keys, tensors, ours, LOGIT_RTOL) == []


def test_float32_alone_matches_most_quantities(computed) -> None:
    # Guard against the float64 escape hatch hiding a float32 problem: at most one
    # logit quantity per fixture may need it (measured: 0 or 1 here).
    name, tensors, _, ours = computed
    keys = [f"eval_logits.T={t}" for t in TEMPERATURES] + ["train_logits.T=0.3", "train_loss.T=0.3"]
    float32_only = {torch.float32: ours[torch.float32]}
    assert len(_mismatches(keys, tensors, float32_only, LOGIT_RTOL)) <= 1


def test_gradients(computed) -> None:
    name, tensors, meta, ours = computed
    grad_keys = [key for key in tensors if key.startswith("train_grad.")]
    largest = max([tensors[key].double().norm().item() for key in grad_keys], default=0.0)
    assert _mismatches(grad_keys, tensors, ours, GRAD_RTOL, GRAD_NOISE_FLOOR * largest) == []
    assert _mismatches(["train_grad_norms"], tensors, ours, GRAD_RTOL) == []
    # The same parameters receive gradients (the official unused PReLUs get none).
    assert ours[torch.float32]["grad_holders"] == sorted(json.loads(meta["grad_norm_order"]))


def test_batchnorm_running_statistics(computed) -> None:
    name, tensors, _, ours = computed
    keys = [key for key in tensors if key.startswith("after_train_state.")]
    assert keys
    assert _mismatches(keys, tensors, ours, LOGIT_RTOL) == []
