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
* Rounding can land a pre-activation exactly on the tie: on the AMD EPYC development
  machine one of BNext-18's hard-sign (T = 1e-8) samples has a sign input of 5e-7
  (2e-8 in float64; its layer's median is 36), which the official run rounded to the
  other side. No precision or thread count here reproduces it, and that one flip
  changes the sample's logits by 130 %. A sample that fails in both precisions is
  therefore accepted only if flipping its single sign input nearest to zero (within
  ``TIE_DISTANCE`` of its layer's median magnitude) reproduces the reference; a wrong
  formula is not repaired by one flipped tie.
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
from models.quantizers import HardSign

LOGIT_RTOL = 1e-4
#: A sign input this close to zero, relative to the median magnitude of its layer's inputs, is a tie.
TIE_DISTANCE = 1e-6
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


def _sample_errors(key: str, tensors, ours) -> torch.Tensor:
    """Per sample, the smaller relative error of the two precisions."""
    ref = tensors[key].double()
    errors = [(result[key].double() - ref).norm(dim=1) / ref.norm(dim=1) for result in ours.values()]
    return torch.stack(errors).amin(dim=0)


def _logits_with_nearest_tie_flipped(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval logits of one sample with the sign of its input nearest zero (relative to its layer) flipped.

    Fails the test if that input is not within ``TIE_DISTANCE`` of zero: then no tie explains a mismatch.
    """
    binarizers = [module for module in model.modules() if isinstance(module, HardSign)]
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].detach().flatten()))
        for i, module in enumerate(binarizers)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    distance, layer, index = min(
        ((values.abs().min() / values.abs().median()).item(), i, values.abs().argmin().item())
        for i, values in inputs.items()
    )
    assert distance < TIE_DISTANCE, f"the sign input nearest zero is {distance:.2e} of its layer's median: no tie"

    def flip(module, args, out):
        out = out.clone()
        out.view(-1)[index] = -1.0 if out.view(-1)[index] > 0 else 1.0
        return out

    handle = binarizers[layer].register_forward_hook(flip)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_logits_and_loss(computed, reference_dir: Path, reduced_channels) -> None:
    name, tensors, meta, ours = computed
    keys = [f"eval_logits.T={t}" for t in TEMPERATURES] + ["train_logits.T=0.3", "train_loss.T=0.3"]
    for key in keys:
        mismatch = _mismatches([key], tensors, ours, LOGIT_RTOL)
        if not mismatch:
            continue
        assert key.startswith("eval_logits."), f"{name}: {mismatch}"
        # Eval samples are independent (running statistics): redo the ones no precision matches, with a tie flipped.
        logits = ours[torch.float64][key].clone()
        model = _build(CASES[name], reduced_channels, int(meta["num_classes"]), tensors, torch.float64).eval()
        models.set_temperature(model, float(key.removeprefix("eval_logits.T=")))
        for sample in (_sample_errors(key, tensors, ours) > LOGIT_RTOL).nonzero().flatten().tolist():
            x = tensors["input"][sample : sample + 1].double()
            logits[sample] = _logits_with_nearest_tie_flipped(model, x)[0]
        assert _mismatches([key], tensors, {torch.float64: {key: logits}}, LOGIT_RTOL) == [], name


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


def test_a_flipped_tie_does_not_repair_other_logits(reference_dir: Path, reduced_channels) -> None:
    # The tie rule of test_logits_and_loss must not accept a formula error: against logits
    # 1 % off, the one sample it repairs on the AMD machine still fails; and the flip does change it.
    name, key = "bnext18_cifar10", "eval_logits.T=1e-08"
    tensors, meta = _load_fixture(reference_dir / f"{name}.safetensors")
    model = _build(CASES[name], reduced_channels, int(meta["num_classes"]), tensors, torch.float64).eval()
    models.set_temperature(model, 1e-8)
    x = tensors["input"][1:2].double()
    with torch.no_grad():
        plain = model(x)[0]
    flipped = _logits_with_nearest_tie_flipped(model, x)[0]
    reference = tensors[key][1].double()
    assert (flipped - plain).norm() > 0.5 * reference.norm()
    assert (flipped - 1.01 * reference).norm() > LOGIT_RTOL * reference.norm()
