"""Training-step speed against its convolution floor, measured side by side in one run.

For a model, input size and batch this times, alternately after warm-up:

* the full training step: forward, cross-entropy, backward, the AdamW step the
  training script builds (:func:`ImageNet.optim.build_optimizer`: precision-tag
  groups, the fused kernel where torch has one) and :func:`models.apply_constraints`
  (the binarization constraints), and
* the *convolution floor*: every convolution and linear layer the model calls (binary
  and real-valued alike), with the shapes, strides, paddings and groups recorded from
  one forward, run as bare ``F.conv2d``/``F.linear`` forward plus backward and nothing
  else. The binary convolutions run through :func:`models.fused_ops.training_conv2d`,
  as in the step (tap products on small CPU planes, :mod:`models.tap_conv`), so the
  floor stays the same convolutions however the step computes them. The floor is what
  the step would cost if everything but the convolutions were free, so
  ``step / floor`` says how much room the non-convolution work leaves.

On the CPU it also measures, before every timed pair, how far apart the two threads
run (:mod:`benchmarks.thread_placement`): on a virtual machine they may share a cache in
some pairs and not in others, which moved the step by 10 to 13 % and the floor by 7 to
11 % on the development machine, so a run whose pairs fell in both placements reports
step/floor for each.

Usage::

    python benchmarks/train_step.py --model bnext_tiny --width-mult 0.25 --batch 16 --mode eager --mode channels_last
    python benchmarks/train_step.py --mode eager --mode eager_unfused   # the fused CPU training kernels on and off
    python -m benchmarks.train_step --device cuda --img-size 224 --stem imagenet --batch 128 --mode all --json out.json
    python benchmarks/train_step.py --mode eager --mode compile --interleave --iters 40   # round by round
    python benchmarks/train_step.py --mode eager --mode eager_torch_adamw --interleave   # the one-pass binary update

The functions (:func:`collect_conv_shapes`, :func:`make_floor`, :func:`make_step`,
:func:`measure`) are importable for tests and notebooks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from benchmarks import thread_placement  # noqa: E402
from ImageNet.host_memory import add_huge_pages_flag, add_keep_freed_memory_flag, apply_host_memory_flags  # noqa: E402
from ImageNet.optim import build_optimizer  # noqa: E402
from models import fused_ops  # noqa: E402

#: Modules whose calls make up the floor; every other weight-multiplying layer is refused.
FLOOR_MODULES = (models.BinaryConv2d, nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ConvShape:
    """One convolution or linear call of a forward pass, as the floor replays it.

    ``input_requires_grad`` is False for the first layer (its input is the image
    batch): the training step never computes that input gradient, so neither does
    the floor.
    """

    name: str
    kind: str  # "conv2d" or "linear"
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    binary: bool = False
    input_requires_grad: bool = True

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward call."""
        if self.kind == "linear":
            rows = 1
            for size in self.output_shape[:-1]:
                rows *= size
            return rows * self.weight_shape[0] * self.weight_shape[1]
        n, c_out, h_out, w_out = self.output_shape
        _, c_in_per_group, k_h, k_w = self.weight_shape
        return n * c_out * h_out * w_out * c_in_per_group * k_h * k_w

    @property
    def training_macs(self) -> int:
        """Multiply-accumulates of forward, weight gradient and (when needed) input gradient."""
        return self.macs * (3 if self.input_requires_grad else 2)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _check_floor_covers(model: nn.Module) -> None:
    # A weight layer the hooks do not see would silently lower the floor: refuse instead.
    for name, module in model.named_modules():
        if models.layer_precision(module) is not None and not isinstance(module, FLOOR_MODULES):
            raise NotImplementedError(f"{name}: {type(module).__name__} is not covered by the convolution floor")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode={module.padding_mode!r} is not covered by the floor")
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            raise NotImplementedError(f"{name}: string padding {module.padding!r} is not covered by the floor")


def _conv_shape(name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> ConvShape:
    common = {
        "name": name,
        "input_shape": tuple(x.shape),
        "weight_shape": tuple(module.weight.shape),
        "output_shape": tuple(output.shape),
        "input_requires_grad": x.requires_grad,
    }
    if isinstance(module, nn.Linear):
        return ConvShape(kind="linear", bias=module.bias is not None, **common)
    if isinstance(module, models.BinaryConv2d):
        return ConvShape(
            kind="conv2d",
            stride=_pair(module.stride),
            padding=_pair(module.padding),
            groups=module.groups,
            binary=True,
            **common,
        )
    return ConvShape(
        kind="conv2d",
        stride=_pair(module.stride),
        padding=_pair(module.padding),
        dilation=_pair(module.dilation),
        groups=module.groups,
        bias=module.bias is not None,
        **common,
    )


def collect_conv_shapes(model: nn.Module, example: torch.Tensor) -> list[ConvShape]:
    """Every convolution and linear call of one forward of ``model`` on ``example``, in call order.

    A module called twice gives two entries. The forward runs in eval mode (so that
    batch-norm running statistics are left alone) but with gradients enabled, to see
    which inputs need a gradient; the model's train/eval mode is restored. Pass the
    eager model, not a ``torch.compile`` wrapper.
    """
    _check_floor_covers(model)
    shapes: list[ConvShape] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, FLOOR_MODULES):

            def hook(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
                shapes.append(_conv_shape(name, mod, args[0], output))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


# --------------------------------------------------------------------------- floor


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class ConvFloor:
    """The floor: each recorded call run as a bare forward plus backward, on preallocated tensors.

    Inputs, weights and output gradients are created once, in the dtype the step hands
    each call (:meth:`step_dtype`: under autocast the compute dtype, except on the CPU
    for the calls an eager step hands float32; the casts of the fp32 master weights
    and of the convolutions' outputs belong to the step, not to the floor). A binary convolution's
    input holds signs (±1), as the step's does, and with ``sign_weights`` its weight
    too (the step's below the sign threshold): where both are signs the tap products
    run on integers (:mod:`models.tap_conv`), in the step and in the floor alike. Biases take part in the
    forward, as in the model, but get no gradient. Gradients are returned by
    :func:`torch.autograd.grad`, so nothing is accumulated between calls. Binary
    convolutions go through :func:`models.fused_ops.training_conv2d`, as the model's
    do in training (and so, inside :func:`models.fused_ops.disabled`, ``F.conv2d``).
    """

    def __init__(
        self,
        shapes: Sequence[ConvShape],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        sign_weights: bool = False,
        compiled: bool = False,
    ) -> None:
        self.shapes = list(shapes)
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.sign_weights = sign_weights
        self.compiled = compiled
        self._tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._tap_major: dict[int, torch.Tensor] = {}  # channels-last copies of binary weights, made on first use
        for shape in self.shapes:
            self._tensors.append(self._allocate(shape))

    def step_dtype(self, shape: ConvShape) -> torch.dtype:
        """The dtype of the tensors the training step hands ``shape``'s call: the compute dtype, except
        under CPU autocast for what an eager step keeps in float32 (:func:`models.fused_ops.autocast_allows_float32`):
        the inputs of the binary convolutions that take the tap products (whose products run on
        bf16 inside) and the recoupling gates' 1x1 products of 1x1 planes (not in a compiled step,
        nor on channels-last tensors, which the kernels and the tap products do not take)."""
        if self.dtype == torch.float32 or self.device.type != "cpu" or self.compiled or self.channels_last:
            return self.dtype
        if shape.binary:
            x = torch.empty(shape.input_shape, requires_grad=True)
            weight = torch.empty(shape.weight_shape)
            geometry = (shape.stride[0], shape.padding[0], shape.groups)
            return torch.float32 if fused_ops.takes_tap_products(x, weight, *geometry) else self.dtype
        gate = shape.kind == "conv2d" and shape.input_shape[-2:] == (1, 1) and shape.weight_shape[-2:] == (1, 1)
        return torch.float32 if gate and fused_ops.switched_on() else self.dtype

    def _allocate(self, shape: ConvShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        dtype = self.step_dtype(shape)

        def tensor(size: tuple[int, ...], signs: bool = False) -> torch.Tensor:
            # Random normal values (or their signs): zeros or denormals could make CPU kernels take other paths.
            t = torch.randn(size, device=self.device, dtype=dtype)
            if signs:
                t = t.sign()
            if self.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            return t

        x = tensor(shape.input_shape, signs=shape.binary).requires_grad_(shape.input_requires_grad)
        weight = tensor(shape.weight_shape, signs=shape.binary and self.sign_weights).requires_grad_(True)
        bias = torch.randn(shape.weight_shape[0], device=self.device, dtype=dtype) if shape.bias else None
        grad_output = tensor(shape.output_shape)
        return x, weight, bias, grad_output

    def __len__(self) -> int:
        return len(self.shapes)

    def run_one(self, index: int) -> tuple[torch.Tensor, ...]:
        """Forward and backward of call ``index``; returns ``(grad_input, grad_weight)`` or ``(grad_weight,)``."""
        shape = self.shapes[index]
        x, weight, bias, grad_output = self._tensors[index]
        # Under autocast as the step, but for the gates' float32 products (the tap products take
        # their float32 inputs under autocast as the step's do: bf16 products summed in float32).
        float32_gate = not shape.binary and x.dtype != self.dtype
        with _autocast(self.device, None if float32_gate else self.dtype):
            if shape.kind == "linear":
                y = F.linear(x, weight, bias)
            elif shape.binary:
                # What BinaryConv2d runs in a training step: tap products on small CPU planes.
                weight = self._binary_weight(index, x, weight)
                y = fused_ops.training_conv2d(x, weight, shape.stride[0], shape.padding[0], shape.groups)
            else:  # as the step computes it: the gates' 1x1 convolutions of 1x1 planes as matrix products
                geometry = (shape.stride, shape.padding, shape.dilation, shape.groups)
                y = fused_ops.conv2d_of_points(x, weight, bias, *geometry)
        wanted = (x, weight) if shape.input_requires_grad else (weight,)
        return torch.autograd.grad(y, wanted, grad_output)

    def _binary_weight(self, index: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The weight of binary call ``index`` in the layout the step's binarization hands its convolution."""
        shape = self.shapes[index]
        if not fused_ops.hands_tap_major_weight(x, weight, shape.stride[0], shape.padding[0], shape.groups):
            return weight
        if index not in self._tap_major:
            tap_major = weight.detach().contiguous(memory_format=torch.channels_last)
            self._tap_major[index] = tap_major.requires_grad_(True)
        return self._tap_major[index]

    def __call__(self) -> None:
        for index in range(len(self.shapes)):
            self.run_one(index)

    def resident_bytes(self) -> int:
        """Bytes held by the preallocated tensors (excluded from the step's peak memory on CUDA)."""
        total = sum(t.numel() * t.element_size() for t in self._tap_major.values())
        for tensors in self._tensors:
            for t in tensors:
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def make_floor(
    shapes: Sequence[ConvShape],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    sign_weights: bool = False,
    compiled: bool = False,
) -> ConvFloor:
    """A callable running the convolution floor of ``shapes`` (see :class:`ConvFloor`); ``compiled``:
    for a compiled step."""
    return ConvFloor(shapes, device, dtype, channels_last, sign_weights, compiled)


def binary_weights_are_signs(model: nn.Module) -> bool:
    """Whether every binary layer of ``model`` binarizes its weight to exact signs (temperature below its threshold)."""
    layers = [m for m in model.modules() if isinstance(m, models.BinaryConv2d)]
    # Compared in the temperature's dtype, as the binarization compares it.
    return bool(layers) and all(bool((m.temperature < m.sign_threshold).all()) for m in layers)


# --------------------------------------------------------------------------- step


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that get gradients (frozen checkpoint-compatibility PReLUs are left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], torch.Tensor]:
    """A callable doing one full training step of ``model`` on ``batch = (images, targets)``; it returns the loss.

    Forward (through ``forward``, e.g. ``torch.compile(model)``, default ``model``)
    under autocast when ``amp_dtype`` is given, float32 cross-entropy, backward
    (through ``scaler`` when given), optimizer step (default: the training script's
    AdamW with the official recipe's learning rate and decays), then :func:`models.apply_constraints` on
    ``model``. The model is put in train mode. No host synchronisation is added (the
    returned loss is a detached tensor, not a number).
    """
    images, targets = batch
    model.train()
    run_forward = forward if forward is not None else model
    if optimizer is None:
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8)
    device = images.device

    def step() -> torch.Tensor:
        with _autocast(device, amp_dtype):
            logits = run_forward(images)
        # The loss in float32 also under autocast, as the trainer does.
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        models.apply_constraints(model)
        return loss.detach()

    return step


# --------------------------------------------------------------------------- timing


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(
    step: Callable[[], None], floor: Callable[[], None], device: torch.device | None, timings: dict[str, list]
) -> None:
    """Time one ``step`` then one ``floor`` call, appending to ``timings``' lists (see :func:`measure`)."""
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for name, call in (("step", step), ("floor", floor)):
        faults = minor_page_faults()
        start = time.perf_counter()
        call()
        _synchronize(device)
        timings[f"{name}_ms"].append((time.perf_counter() - start) * 1e3)
        if faults is not None:
            timings[f"{name}_faults"].append(minor_page_faults() - faults)
        if on_cuda and name == "step":
            timings["step_peaks"].append(torch.cuda.max_memory_allocated(device))


def _new_timings() -> dict[str, list]:
    return {"step_ms": [], "floor_ms": [], "step_faults": [], "floor_faults": [], "step_peaks": [], "round_trip_ns": []}


def _summary(timings: dict[str, list], device: torch.device | None) -> dict[str, Any]:
    """What :func:`measure` returns, from the lists :func:`_time_pair` filled."""
    step_ms, floor_ms = timings["step_ms"], timings["floor_ms"]
    step_faults, floor_faults = timings["step_faults"], timings["floor_faults"]
    step_median = statistics.median(step_ms)
    floor_median = statistics.median(floor_ms)
    pair_ratios = [step / floor for step, floor in zip(step_ms, floor_ms, strict=True) if floor > 0]
    on_cuda = device is not None and device.type == "cuda"
    return {
        "step_ms": step_ms,
        "floor_ms": floor_ms,
        "step_ms_median": step_median,
        "floor_ms_median": floor_median,
        "ratio": step_median / floor_median if floor_median > 0 else float("inf"),
        "pair_ratio_quartiles": _quartiles(pair_ratios),
        "step_page_faults_median": statistics.median(step_faults) if step_faults else None,
        "floor_page_faults_median": statistics.median(floor_faults) if floor_faults else None,
        "step_peak_bytes": max(timings["step_peaks"], default=0) if on_cuda else None,
        "round_trip_ns": timings["round_trip_ns"],
    }


def measure(
    step: Callable[[], None],
    floor: Callable[[], None],
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str | None = None,
    probe: Callable[[], float | None] | None = None,
) -> dict[str, Any]:
    """Time ``step`` and ``floor`` alternately (step, floor, step, floor, ...) and take medians.

    ``warmup`` untimed pairs come first (they absorb ``torch.compile``, allocator and
    autotuning start-up). On CUDA the device is synchronised around every timed call,
    and the peak memory allocated during the step calls is returned as
    ``step_peak_bytes`` (None elsewhere). ``ratio`` is ``step_ms_median / floor_ms_median``.
    ``pair_ratio_quartiles`` are the lower and upper quartiles of ``step_ms[i] / floor_ms[i]``
    over the pairs: how far the machine's noise moves a ratio measured side by side.
    ``step_page_faults_median`` and ``floor_page_faults_median`` count the process's minor
    page faults per call (fresh memory the kernel had to map; None where ``getrusage`` is missing).
    ``probe``, when given, is called before each timed pair (untimed) and its values are
    ``round_trip_ns``, one per pair (:func:`benchmarks.thread_placement.round_trip_ns`: where
    the threads ran); without it that list is empty.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device) if device is not None else None
    for _ in range(warmup):
        step()
        floor()
    _synchronize(device)
    timings = _new_timings()
    for _ in range(iters):
        if probe is not None:
            timings["round_trip_ns"].append(probe())
        _time_pair(step, floor, device, timings)
    return _summary(timings, device)


def measure_interleaved(
    runs: Sequence[tuple[Callable[[], None], Callable[[], None], Callable[[], contextlib.AbstractContextManager]]],
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str | None = None,
    probe: Callable[[], float | None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure` for several ``(step, floor, context)`` runs at once, interleaved round by round.

    Each round times one step and one floor of every run, the runs in their order in
    even rounds and in reverse in odd ones (so that none always follows the same
    other), each pair inside a fresh ``context()``. ``probe`` is called once per round
    and its value is every run's ``round_trip_ns`` for that round. Returns one
    :func:`measure` result per run; index ``i`` of every run's ``step_ms`` is round
    ``i``, so runs compare round by round, in the same state of the machine.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    if not runs:
        raise ValueError("measure_interleaved needs at least one run")
    device = torch.device(device) if device is not None else None
    for _ in range(warmup):
        for step, floor, context in runs:
            with context():
                step()
                floor()
    _synchronize(device)
    timings = [_new_timings() for _ in runs]
    for round_index in range(iters):
        round_trip = probe() if probe is not None else None
        order = range(len(runs)) if round_index % 2 == 0 else reversed(range(len(runs)))
        for index in order:
            step, floor, context = runs[index]
            if probe is not None:
                timings[index]["round_trip_ns"].append(round_trip)
            with context():
                _time_pair(step, floor, device, timings[index])
    return [_summary(run_timings, device) for run_timings in timings]


def _quartiles(values: Sequence[float]) -> tuple[float, float] | None:
    """Lower and upper quartiles (inclusive method; one value is its own quartiles); None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """How the step runs: mixed precision, memory format, compilation, loss scaling, fused kernels."""

    name: str
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    grad_scaler: bool = False
    unfused: bool = False  # models.fused_ops.disabled(): the processor's modules one by one
    torch_adamw: bool = False  # torch's fused AdamW, the binary weights constrained in a pass of their own


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("eager"),
        Mode("eager_unfused", unfused=True),
        Mode("eager_torch_adamw", torch_adamw=True),
        Mode("channels_last", channels_last=True),
        Mode("compile", compile=True),
        Mode("bf16", amp_dtype=torch.bfloat16),
        Mode("fp16", amp_dtype=torch.float16, grad_scaler=True),
        Mode("bf16_compile_cl", amp_dtype=torch.bfloat16, channels_last=True, compile=True),
    )
}


def expand_modes(requested: Sequence[str] | None) -> list[str]:
    """Mode names in the order asked, ``all`` expanded, duplicates dropped; ``eager`` when none."""
    names: list[str] = []
    for name in requested or ["eager"]:
        for expanded in MODES if name == "all" else [name]:
            if expanded not in MODES:
                raise ValueError(f"unknown mode {expanded!r}; valid: {', '.join(MODES)}, all")
            if expanded not in names:
                names.append(expanded)
    return names


def _read_cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # private API or no compiler found: fall back to a PATH lookup
        for candidate in (os.environ.get("CXX"), "g++", "clang++", "c++"):
            if candidate and shutil.which(candidate):
                return candidate
        return None


def unsupported_reason(mode: Mode, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device``, or None when it can."""
    if mode.torch_adamw and device.type != "cpu":
        return "the binary weights' one-pass update is CPU-only: elsewhere this mode is eager again"
    if mode.grad_scaler and device.type != "cuda":
        return "fp16 autocast with GradScaler is benchmarked on CUDA only (bf16 is the CPU's mixed precision)"
    if mode.amp_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} does not support bfloat16"
    if mode.compile:
        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile is not supported on Python {platform.python_version()}"
        if device.type == "cpu" and _cpp_compiler() is None:
            return "torch.compile (inductor) on the CPU needs a C++ compiler; none found"
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "torch.compile (inductor) on CUDA needs Triton; it is not installed"
    return None


def mode_notes(mode: Mode, device: torch.device) -> list[str]:
    """Caveats that do not prevent a mode from running but matter when reading its numbers."""
    notes = []
    if mode.amp_dtype == torch.bfloat16 and device.type == "cpu" and not fused_ops.cpu_has_bf16_instructions():
        notes.append(f"{mode.name}: this CPU has no native bf16 instructions (AVX512-BF16/AMX); bf16 is emulated")
    if mode.amp_dtype is not None and device.type == "cpu" and not (mode.compile or mode.channels_last):
        notes.append(
            f"{mode.name}: on the CPU autocast's dtype reaches the binary convolutions (the tap products: bf16 "
            "products summed in float32) and the real-valued layers outside the processors; the fused kernels "
            "and the recoupling gates stay float32, in the floor too"
        )
    return notes


# --------------------------------------------------------------------------- machine and memory


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core counts, torch version and threads, and the GPU name on CUDA."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_cpuinfo() if line.startswith("model name")), "")
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device.type,
        # Other work on the machine skews CPU timings (and oversubscribed OpenMP threads spin): record it.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # "cpp": the processor's fused CPU training kernels are built (used in eager float32 NCHW on the CPU).
        "fused_kernels": fused_ops.backend(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line describing the machine, printed first."""
    line = (
        f"machine: CPU {info['cpu']} | {info['logical_cores']} logical cores ({info['usable_cores']} usable) | "
        f"torch {info['torch']} | {info['torch_threads']} torch threads | device {info['device']} | "
        f"fused kernels {info['fused_kernels']}"
    )
    if "gpu" in info:
        line += f" ({info['gpu']})"
    if info.get("load_average_1min") is not None:
        line += f" | load {info['load_average_1min']:.2f}"
    return line


def _own_usage() -> Any | None:
    """``getrusage`` of this process, or None where the ``resource`` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF)


def minor_page_faults() -> int | None:
    """The process's minor page faults so far (``ru_minflt``), or None where unavailable."""
    usage = _own_usage()
    return usage.ru_minflt if usage is not None else None


def process_max_rss_mb() -> float | None:
    """The process's peak resident set size in MB (``ru_maxrss``), or None where unavailable."""
    usage = _own_usage()
    if usage is None:
        return None
    # Linux reports kilobytes, macOS bytes.
    return usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024


# --------------------------------------------------------------------------- one mode


def _default_num_classes(stem: str) -> int:
    return 10 if stem == "cifar" else 1000


@dataclass
class PreparedMode:
    """A mode's step and floor, built and ready to time."""

    mode: Mode
    step: Callable[[], torch.Tensor]
    floor: ConvFloor
    shapes: list[ConvShape]

    def context(self) -> contextlib.AbstractContextManager:
        """What the mode's calls run inside: the fused kernels off for ``eager_unfused``."""
        return fused_ops.disabled() if self.mode.unfused else contextlib.nullcontext()


def prepare_mode(mode: Mode, args: argparse.Namespace, device: torch.device) -> PreparedMode:
    """Build a fresh model for ``mode`` (seed 0), its training step and its convolution floor."""
    torch.manual_seed(0)
    num_classes = args.num_classes or _default_num_classes(args.stem)
    model = models.create_model(args.model, num_classes=num_classes, stem=args.stem, width_mult=args.width_mult)
    models.set_temperature(model, args.temperature)
    model.to(device)
    memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
    if mode.channels_last:
        model.to(memory_format=memory_format)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, num_classes, (args.batch,), device=device)

    shapes = collect_conv_shapes(model, images)
    signs = binary_weights_are_signs(model)
    floor = make_floor(shapes, device, mode.amp_dtype or torch.float32, mode.channels_last, signs, mode.compile)

    forward = torch.compile(model, options=models.compile_options(device)) if mode.compile else model
    scaler = torch.amp.GradScaler(device.type) if mode.grad_scaler else None
    optimizer = build_optimizer(
        model, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8, updates_in_layers=not mode.torch_adamw
    )
    step = make_step(model, (images, targets), optimizer, forward=forward, amp_dtype=mode.amp_dtype, scaler=scaler)
    return PreparedMode(mode, step, floor, shapes)


def _placement_probe(device: torch.device) -> Callable[[], float | None] | None:
    # Where the CPU threads ran, before every pair or round (a fraction of a millisecond, untimed).
    return thread_placement.probe_if_available() if device.type == "cpu" else None


def mode_result(
    prepared: PreparedMode,
    timings: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    rss_before: float | None,
) -> dict[str, Any]:
    """The result row of a mode from its :func:`measure` timings (``rss_before``: max RSS before timing)."""
    if device.type == "cuda":
        # The floor's preallocated tensors stay allocated while the step runs: take them out.
        peak_mb = (timings["step_peak_bytes"] - prepared.floor.resident_bytes()) / 2**20
        peak_kind = "CUDA max_memory_allocated during the step, floor tensors excluded"
    else:
        peak_mb = process_max_rss_mb()
        peak_kind = "process max RSS (ru_maxrss), cumulative over the run's modes, floor tensors included"
    shapes = prepared.shapes
    floor_gmac = sum(shape.training_macs for shape in shapes) / 1e9
    result = {
        "mode": prepared.mode.name,
        "step_ms_median": timings["step_ms_median"],
        "floor_ms_median": timings["floor_ms_median"],
        "ratio": timings["ratio"],
        "pair_ratio_quartiles": timings["pair_ratio_quartiles"],
        "step_page_faults_median": timings["step_page_faults_median"],
        "floor_page_faults_median": timings["floor_page_faults_median"],
        "images_per_second": args.batch / (timings["step_ms_median"] / 1e3),
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": peak_kind,
        "step_ms": timings["step_ms"],
        "floor_ms": timings["floor_ms"],
        "conv_calls": len(shapes),
        "binary_conv_calls": sum(shape.binary for shape in shapes),
        "floor_gmac": floor_gmac,
        "floor_gflops_per_s": 2 * floor_gmac / (timings["floor_ms_median"] / 1e3),
        "round_trip_ns": timings["round_trip_ns"],
        "placements": thread_placement.placement_timings(
            timings["round_trip_ns"], timings["step_ms"], timings["floor_ms"]
        )
        if timings["round_trip_ns"]
        else [],
    }
    if device.type == "cpu" and rss_before is not None and peak_mb is not None:
        result["max_rss_growth_mb"] = peak_mb - rss_before
    return result


def run_mode(mode: Mode, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build a fresh model for ``mode``, its step and floor, and measure them side by side."""
    prepared = prepare_mode(mode, args, device)
    rss_before = process_max_rss_mb()
    with prepared.context():
        timings = measure(prepared.step, prepared.floor, args.warmup, args.iters, device, _placement_probe(device))
    return mode_result(prepared, timings, args, device, rss_before)


def run_interleaved(modes: Sequence[Mode], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Build every mode first, then time them round by round (:func:`measure_interleaved`): one row each."""
    prepared = [prepare_mode(mode, args, device) for mode in modes]
    rss_before = process_max_rss_mb()
    runs = [(p.step, p.floor, p.context) for p in prepared]
    timings = measure_interleaved(runs, args.warmup, args.iters, device, _placement_probe(device))
    return [mode_result(p, t, args, device, rss_before) for p, t in zip(prepared, timings, strict=True)]


def _release(device: torch.device) -> None:
    # Compiled graphs and cached blocks of one mode must not weigh on the next.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- CLI


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The plain-text table: one row per measured mode.

    ``vs eager`` is eager's step/floor over the mode's, for the modes timed against
    the same float32, contiguous floor as eager (``compile``, ``eager_unfused``,
    ``eager_torch_adamw``): it compares their steps while cancelling a machine that gets
    busier or quieter between modes (>1: faster than eager). Modes with another floor
    (bf16, channels_last) show ``-``.
    """
    header = (
        f"{'mode':<18} {'step ms':>10} {'floor ms':>10} {'step/floor':>10} {'pairs q1-q3':>12} {'vs eager':>9} "
        f"{'img/s':>10} {'peak mem MB':>12} {'page faults step/floor':>23}"
    )
    eager = next((r["ratio"] for r in results if r["mode"] == "eager"), None)
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else "n/a"
        mode = MODES.get(r["mode"])
        same_floor = mode is not None and mode.amp_dtype is None and not mode.channels_last
        versus = f"{eager / r['ratio']:.2f}" if eager is not None and same_floor else "-"
        quartiles = r.get("pair_ratio_quartiles")
        spread = f"{quartiles[0]:.2f}-{quartiles[1]:.2f}" if quartiles else "-"
        step_faults, floor_faults = r.get("step_page_faults_median"), r.get("floor_page_faults_median")
        faults = f"{step_faults:.0f}/{floor_faults:.0f}" if step_faults is not None else "n/a"
        lines.append(
            f"{r['mode']:<18} {r['step_ms_median']:>10.2f} {r['floor_ms_median']:>10.2f} {r['ratio']:>10.2f} "
            f"{spread:>12} {versus:>9} {r['images_per_second']:>10.1f} {peak:>12} {faults:>23}"
        )
    return "\n".join(lines)


def placement_lines(results: Sequence[dict[str, Any]], device: torch.device) -> list[str]:
    """Per mode, where its CPU threads ran during the pairs, and step/floor per placement when there were two.

    On a virtual machine the two threads may share a cache in some pairs and not in
    others (:mod:`benchmarks.thread_placement`): compare runs, and changes, within one
    placement.
    """
    if device.type != "cpu" or not results:
        return []
    reason = thread_placement.unavailable_reason()
    if reason is not None:
        return [f"threads' round trip: not measured ({reason})"]
    lines = []
    for result in results:
        groups = result.get("placements") or []
        if len(groups) == 1:
            (group,) = groups
            pairs = f"all {group['pairs']} pairs" if group["pairs"] > 1 else "its only pair"
            lines.append(
                f"{result['mode']}: threads' round trip {group['low_ns']:.0f} to {group['high_ns']:.0f} ns "
                f"in {pairs} (one placement)"
            )
        elif groups:
            parts = [
                f"{g['low_ns']:.0f} to {g['high_ns']:.0f} ns in {g['pairs']} pair{'s' if g['pairs'] > 1 else ''}: "
                f"step {g['step_ms']:.1f}, "
                f"floor {g['floor_ms']:.1f} ms, step/floor {g['ratio']:.2f}"
                for g in groups
            ]
            lines.append(f"{result['mode']}: threads' round trip " + "; ".join(parts) + " (two placements)")
    return lines


def modes_by_placement(results: Sequence[dict[str, Any]]) -> list[str]:
    """Where the modes' pairs fell into two placements together: each mode's step/floor within each.

    All modes' round trips are grouped together (:func:`benchmarks.thread_placement.group_by_round_trip`);
    one line per placement lists the ratio of every mode with pairs in it. ``vs eager``
    compares modes measured one after the other, so it also compares placements when they
    ran in different ones: the modes compare only within a line. Nothing when there was
    one placement, or fewer than two modes.
    """
    if len(results) < 2:
        return []
    pairs = [(r, i) for r in results for i in range(len(r.get("round_trip_ns") or []))]
    groups = thread_placement.group_by_round_trip([r["round_trip_ns"][i] for r, i in pairs])
    if len(groups) < 2:
        return []
    lines = []
    for group in groups:
        ratios = []
        for result in results:
            mine = [i for r, i in (pairs[k] for k in group.indices) if r is result]
            if mine:
                step, floor = thread_placement.pair_medians(result["step_ms"], result["floor_ms"], mine)
                ratios.append(f"{result['mode']} {step / floor:.2f} ({len(mine)})")
        lines.append(
            f"placement {group.low_ns:.0f} to {group.high_ns:.0f} ns, step/floor (pairs): " + ", ".join(ratios)
        )
    return [*lines, "the modes ran in two placements: compare them within a placement line, not by 'vs eager'"]


def _ratio_summary(ratios: Sequence[float]) -> str:
    quartiles = _quartiles(ratios)
    spread = f", quartiles {quartiles[0]:.3f} to {quartiles[1]:.3f}" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.3f}{spread}, {len(ratios)} round{'s' if len(ratios) > 1 else ''}"


def interleaved_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """For modes timed round by round (``--interleave``): each later mode's step over the first mode's, per round.

    Both steps of a round ran within a second or two of each other, in the same state
    of the machine, so the median of these ratios compares the modes more closely than
    the medians of separate runs do (<1: the later mode is faster). Where the rounds
    fell in two placements of the threads, a line per placement follows.
    """
    if len(results) < 2:
        return []
    first = results[0]
    groups = thread_placement.group_by_round_trip(first.get("round_trip_ns") or [])
    lines = []
    for result in results[1:]:
        ratios = [mine / theirs for mine, theirs in zip(result["step_ms"], first["step_ms"], strict=True)]
        line = f"interleaved: {result['mode']} step / {first['mode']} step per round: {_ratio_summary(ratios)}"
        lines.append(line)
        if len(groups) > 1:
            for group in groups:
                part = _ratio_summary([ratios[i] for i in group.indices])
                lines.append(f"  threads' round trip {group.low_ns:.0f} to {group.high_ns:.0f} ns: {part}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description="Time the BNext training step against its convolution floor (same convs, bare fwd+bwd)."
    )
    parser.add_argument("--model", default="bnext_tiny", choices=models.list_models(), help="default: %(default)s")
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="default: %(default)s")
    parser.add_argument("--img-size", type=int, default=32, help="square input side (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--width-mult", type=float, default=1.0, help="channel multiplier (default: %(default)s)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier size (default: 10 with the cifar stem, else 1000)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="default: cuda when available (here: %(default)s)",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=[*MODES, "all"],
        help="may be repeated; 'all' runs every mode (default: eager)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed step+floor pairs, >= 1 for compile modes (default: %(default)s)"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed step+floor pairs (default: %(default)s)")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="build every mode first, then time them round by round (one step+floor pair of each per round, "
        "the order reversed every other round) and print each mode's step over the first mode's per round; "
        "needs two modes or more, and the memory of all of them at once",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="binarizer temperature during the benchmark (default: %(default)s)",
    )
    add_keep_freed_memory_flag(parser)  # as the training script: off by default
    add_huge_pages_flag(parser)
    return parser


def host_memory_lines(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None
) -> list[str]:
    """Apply ``--keep-freed-memory`` and ``--huge-pages`` (the process may start again); their log lines.

    ``argv`` is what ``parser`` parsed: None (the process's own command line) allows the
    restart that ``--huge-pages`` needs; a refusal is a usage error of ``parser``.
    """
    try:
        return apply_host_memory_flags(args, from_command_line=argv is None)
    except RuntimeError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a mode failed while running."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for flag in ("batch", "img_size", "iters"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Both the step and the floor let cuDNN pick its fastest algorithms.
        torch.backends.cudnn.benchmark = True

    host_memory = host_memory_lines(parser, args, argv)  # may start the process again
    info = machine_info(device)
    info["host_memory"], info["huge_pages"] = host_memory
    print(machine_line(info), flush=True)
    print(*host_memory, sep="\n", flush=True)
    print(
        f"config: {args.model} stem={args.stem} img={args.img_size} batch={args.batch} width_mult={args.width_mult} "
        f"temperature={args.temperature} warmup={args.warmup} iters={args.iters}",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    notes: list[str] = []
    runnable: list[Mode] = []
    for name in expand_modes(args.mode):
        mode = MODES[name]
        reason = unsupported_reason(mode, device)
        if reason is not None:
            skipped.append({"mode": name, "reason": reason})
            print(f"skip {name}: {reason}", file=sys.stderr, flush=True)
            continue
        if mode.compile and args.warmup < 1:
            notes.append(f"{name}: --warmup 0, so the first timed step includes compilation")
        notes.extend(mode_notes(mode, device))
        runnable.append(mode)
    if args.interleave:
        if len(runnable) < 2:
            parser.error(f"--interleave needs two runnable modes or more, got {[m.name for m in runnable]}")
        print(f"running {', '.join(m.name for m in runnable)} interleaved ...", file=sys.stderr, flush=True)
        try:
            results = run_interleaved(runnable, args, device)
        except Exception as error:  # one broken mode spoils the rounds of all
            for mode in runnable:
                failed.append({"mode": mode.name, "error": f"{type(error).__name__}: {error}"})
            print(f"FAILED interleaved run: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        finally:
            _release(device)
    else:
        for mode in runnable:
            print(f"running {mode.name} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_mode(mode, args, device))
            except Exception as error:  # report and go on: one broken mode should not hide the others
                failed.append({"mode": mode.name, "error": f"{type(error).__name__}: {error}"})
                print(f"FAILED {mode.name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            finally:
                _release(device)

    if results:
        print(format_table(results))
        print(
            f"{results[0]['conv_calls']} conv/linear calls per forward ({results[0]['binary_conv_calls']} binary); "
            f"peak mem = {results[0]['peak_mem_kind']}"
        )
        print(*placement_lines(results, device), *modes_by_placement(results), sep="\n")
        if args.interleave:
            print(*interleaved_lines(results), sep="\n")
    for entry in skipped:
        print(f"skipped {entry['mode']}: {entry['reason']}")
    for entry in failed:
        print(f"failed {entry['mode']}: {entry['error']}")
    for note in notes:
        print(f"note: {note}")

    if args.json is not None:
        config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        payload = {"machine": info, "config": config, "results": results, "skipped": skipped, "failed": failed}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


__all__ = [
    "MODES",
    "ConvFloor",
    "ConvShape",
    "Mode",
    "collect_conv_shapes",
    "expand_modes",
    "machine_info",
    "main",
    "binary_weights_are_signs",
    "make_floor",
    "make_step",
    "measure",
    "measure_interleaved",
    "prepare_mode",
    "run_interleaved",
    "run_mode",
    "unsupported_reason",
]

if __name__ == "__main__":
    sys.exit(main())
