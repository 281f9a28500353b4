"""The XNOR/popcount convolution: a JIT-built C++ extension, or the pure-PyTorch fallback.

The extension (``models/csrc/xnor_conv.cpp``) is compiled on first use by
:func:`models.extensions.build_cpu_extension`, for the CPU it runs on (AVX2/AVX-512
popcount where present) and with OpenMP threads.

Where it cannot be built, :func:`backend` is ``"torch"``, a warning says so once, and
:mod:`models.bitpack` computes the same integers. ``BNEXT_BINARY_BACKEND=torch`` forces
the fallback (tests use it); ``BNEXT_BINARY_BACKEND=cpp`` makes a failed build an error.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch

from . import bitpack
from .extensions import build_cpu_extension

BACKEND_ENV = "BNEXT_BINARY_BACKEND"


@lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled extension, or None (with a warning) when it cannot be built or is disabled."""
    return build_cpu_extension(
        "bnext_xnor",
        "xnor_conv.cpp",
        BACKEND_ENV,
        "binary convolutions use the pure-PyTorch fallback, which gives the same results but is much slower.",
    )


def backend() -> str:
    """``"cpp"`` when the compiled kernel is in use, ``"torch"`` for the pure-PyTorch fallback."""
    return "cpp" if load_extension() is not None else "torch"


def build_features() -> str:
    """Instruction-set features the extension was compiled with ("" for the fallback)."""
    ext = load_extension()
    return ext.build_features().strip() if ext is not None else ""


def pack_activations(x: torch.Tensor, threshold: torch.Tensor, padding: int) -> tuple[torch.Tensor, int]:
    """Pack ``sign(x - threshold)`` (NCHW float32) into padded NHWC words; also count exact zeros."""
    ext = load_extension()
    if ext is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return ext.pack_activations(x, threshold, padding)
    return bitpack.pack_activations(x, threshold, padding)


def prepare_weights(packed_weights: torch.Tensor) -> torch.Tensor | None:
    """The kernel's interleaved weight layout, or None for the fallback (which reads the canonical layout)."""
    ext = load_extension()
    return ext.interleave_weights(packed_weights) if ext is not None else None


def xnor_conv2d(
    packed: torch.Tensor,
    packed_weights: torch.Tensor,
    kernel_weights: torch.Tensor | None,
    weight_tap_sums: torch.Tensor,
    channels: int,
    stride: int,
    padding: int,
    height: int,
    width: int,
    epilogue: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact integer results (float32 NCHW) of the zero-padded ``±1`` convolution.

    ``packed`` comes from :func:`pack_activations`; ``packed_weights`` is the
    canonical ``[O, K, K, Cw]`` layout and ``kernel_weights`` its
    :func:`prepare_weights` form (None selects the fallback). ``epilogue`` =
    ``(scale, shift, slope)`` applies ``prelu(y * scale + shift, slope)`` per output
    channel to the integers (a folded batch norm and its PReLU), with the same
    rounding as PyTorch's batch-norm and PReLU kernels.
    """
    ext = load_extension()
    if ext is not None and kernel_weights is not None and packed.device.type == "cpu":
        empty = packed.new_empty(0, dtype=torch.float32)
        scale, shift, slope = (pad_channels(t) for t in epilogue) if epilogue is not None else (empty, empty, empty)
        return ext.xnor_conv2d(
            packed,
            kernel_weights,
            weight_tap_sums,
            channels,
            packed_weights.shape[0],
            packed_weights.shape[1],
            stride,
            padding,
            height,
            width,
            scale,
            shift,
            slope,
        )
    y = bitpack.xnor_conv2d_reference(packed, packed_weights, weight_tap_sums, channels, stride, padding, height, width)
    return apply_epilogue(y, epilogue)


def apply_epilogue(y: torch.Tensor, epilogue: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``prelu(y * scale + shift, slope)`` per channel with PyTorch's own kernels (identity for None)."""
    if epilogue is None:
        return y
    scale, shift, slope = epilogue
    # Eval batch norm with mean 0, variance 1, eps 0 is exactly fma(y, scale, shift).
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    y = torch.nn.functional.batch_norm(y, zeros, ones, scale, shift, False, 0.0, 0.0)
    return torch.nn.functional.prelu(y, slope)


def mix_mean(b: torch.Tensor, x_mix: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``mean_hw(g * x_mix + (1 - g) * b)`` as ``[N, C]``: the squeeze-excitation input of info-recoupling."""
    ext = load_extension()
    if ext is not None and b.device.type == "cpu" and b.dtype == x_mix.dtype == torch.float32:
        return ext.mix_mean(b, x_mix, gate.reshape(-1).float())
    g = gate.reshape(1, -1, 1, 1)
    return (g * x_mix + (1 - g) * b).mean(dim=(2, 3))


def gate_affine_residual(
    b: torch.Tensor,
    s: torch.Tensor,
    residual: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    multiply_residual: bool,
) -> torch.Tensor:
    """``(s * b [* residual]) * scale + shift + residual`` per channel (``s`` is ``[N, C]``), in one pass."""
    ext = load_extension()
    if ext is not None and b.device.type == "cpu" and b.dtype == residual.dtype == torch.float32:
        return ext.gate_affine_residual(b, s.float(), residual, scale, shift, multiply_residual)
    v = s.reshape(*s.shape[:2], 1, 1) * b
    if multiply_residual:
        v = v * residual
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    return torch.nn.functional.batch_norm(v, zeros, ones, scale, shift, False, 0.0, 0.0) + residual


def pad_channels(values: torch.Tensor) -> torch.Tensor:
    """A float32 ``[O]`` vector zero-padded to a whole number of the kernel's 16-channel blocks."""
    blocks = -(-values.numel() // 16) * 16
    if values.numel() == blocks and values.is_contiguous() and values.dtype == torch.float32:
        return values
    return torch.nn.functional.pad(values.float().reshape(-1), (0, blocks - values.numel()))


def pool2x2_prelu(x: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(avg_pool2x2(x), avg_pool2x2(prelu(x, slope)))`` in one pass (ELM attention's stride-2 shortcuts)."""
    ext = load_extension()
    if ext is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return ext.pool2x2_prelu(x, slope.reshape(-1).float().expand(x.shape[1]).contiguous())
    pool = torch.nn.functional.avg_pool2d
    return pool(x, 2, 2), pool(torch.nn.functional.prelu(x, slope), 2, 2)
