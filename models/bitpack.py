"""Bit packing of binary tensors into 64-bit words, and a pure-PyTorch XNOR convolution.

Format (shared with the C++ kernel in ``models/csrc/xnor_conv.cpp``):

* a value of ``-1`` is bit 1, a value of ``+1`` is bit 0;
* channel ``c`` is bit ``c % 64`` of word ``c // 64``; the unused high bits of the
  last word are 0 (so two such bits XOR to 0 and never count);
* words are stored in ``int64`` tensors (the same bits as ``uint64``; ``int64`` is
  what every PyTorch operator and safetensors support);
* weights are ``[O, K, K, Cw]``; activations are ``[N, H + 2p, W + 2p, Cw]``
  (NHWC, spatially padded with words of 0, i.e. with ``+1``).

For two ``±1`` vectors of length ``C`` the dot product is ``C - 2 * popcount(a ^ w)``.
The float model pads with zeros, not ``+1``; :func:`xnor_conv2d_reference` (and the
C++ kernel) subtract the padded taps' contribution, ``sum_c w[o, c, tap]``, again
(:func:`tap_sums`). Exact zeros (``sign(0) == 0``) are packed as ``+1`` and corrected
by the caller (see :mod:`models.binary_inference`).

Everything here is written with ordinary PyTorch integer operations, so it runs
wherever PyTorch does; it is the fallback of the compiled kernel and its reference.
"""

from __future__ import annotations

import torch

WORD_BITS = 64
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)
# SWAR popcount masks. Each has bit 63 clear, so the arithmetic right shifts of
# int64 (which copy the sign bit) can never leak a bit into the masked result.
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F
#: Bound on the elements of one intermediate XOR tensor in the reference convolution.
_CHUNK_ELEMENTS = 1 << 22


def words_for(channels: int) -> int:
    """Number of 64-bit words holding ``channels`` bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor along its last dimension into int64 words (bit ``c % 64`` of word ``c // 64``)."""
    *lead, channels = bits.shape
    cw = words_for(channels)
    padded = torch.zeros((*lead, cw * WORD_BITS), dtype=torch.int32, device=bits.device)
    padded[..., :channels] = bits.to(torch.int32)
    # Bytes first (little-endian byte order inside a word matches bit c % 64 of the word).
    as_bytes = (padded.view(*lead, cw * 8, 8) * _BIT_WEIGHTS.to(bits.device)).sum(-1).to(torch.uint8)
    return as_bytes.view(torch.int64).view(*lead, cw) if lead else as_bytes.view(torch.int64)


def unpack_bits(words: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor ``[..., channels]``."""
    *lead, cw = words.shape
    as_bytes = words.contiguous().view(torch.uint8).view(*lead, cw * 8, 1).to(torch.int32)
    bits = (as_bytes & _BIT_WEIGHTS.to(words.device)) != 0
    return bits.view(*lead, cw * WORD_BITS)[..., :channels]


def pack_signs(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack ``±1`` values along ``dim`` (moved last): negative values become bit 1, others bit 0."""
    return pack_bits(values.movedim(dim, -1) < 0)


def unpack_signs(words: torch.Tensor, channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``±1`` values ``[..., channels]`` from packed words (bit 1 -> -1, bit 0 -> +1)."""
    return 1 - 2 * unpack_bits(words, channels).to(dtype)


def pack_weights(weight_signs: torch.Tensor) -> torch.Tensor:
    """Pack binary conv weights ``[O, C, K, K]`` (values ``±1``; 0 counts as +1) into ``[O, K, K, Cw]`` words."""
    return pack_bits(weight_signs.permute(0, 2, 3, 1) < 0).contiguous()


def unpack_weights(words: torch.Tensor, channels: int) -> torch.Tensor:
    """``±1`` float weights ``[O, C, K, K]`` from :func:`pack_weights` words."""
    return unpack_signs(words, channels).permute(0, 3, 1, 2).contiguous()


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits in each int64 word (SWAR bit counting with PyTorch integer ops)."""
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    # Every byte now holds a count <= 8, so x is non-negative and the shifts are logical.
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def tap_sums(packed_weights: torch.Tensor, channels: int) -> torch.Tensor:
    """``sum_c w[o, c, kh, kw]`` for each output channel and tap, int32 ``[O, K*K]``.

    These are what a ``+1``-padded tap adds to an output; the zero-padded float
    model adds nothing there.
    """
    out_channels, k = packed_weights.shape[0], packed_weights.shape[1]
    negatives = popcount64(packed_weights).sum(-1)
    return (channels - 2 * negatives).to(torch.int32).reshape(out_channels, k * k)


def pack_activations(x: torch.Tensor, threshold: torch.Tensor, padding: int) -> tuple[torch.Tensor, int]:
    """Pack ``sign(x - threshold)`` of an NCHW tensor into padded NHWC words.

    Returns the words and the number of elements equal to their threshold (whose
    sign is 0; they are packed as ``+1`` and must be corrected by the caller).
    """
    bits = (x < threshold.view(1, -1, 1, 1)).permute(0, 2, 3, 1)
    zeros = int((x == threshold.view(1, -1, 1, 1)).sum())
    words = pack_bits(bits)
    if padding:
        words = torch.nn.functional.pad(words, (0, 0, padding, padding, padding, padding))
    return words.contiguous(), zeros


def border_taps(height: int, width: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Float mask ``[OH, OW, K*K]``: 1 where an output position's tap falls in the zero padding."""
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    rows = torch.arange(out_h).view(-1, 1) * stride - padding + torch.arange(kernel).view(1, -1)
    cols = torch.arange(out_w).view(-1, 1) * stride - padding + torch.arange(kernel).view(1, -1)
    row_out = (rows < 0) | (rows >= height)  # [OH, K]
    col_out = (cols < 0) | (cols >= width)  # [OW, K]
    outside = row_out.view(out_h, 1, kernel, 1) | col_out.view(1, out_w, 1, kernel)
    return outside.reshape(out_h, out_w, kernel * kernel).to(torch.float32)


def xnor_conv2d_reference(
    packed: torch.Tensor,
    packed_weights: torch.Tensor,
    weight_tap_sums: torch.Tensor,
    channels: int,
    stride: int,
    padding: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """XNOR/popcount convolution in pure PyTorch, float32 ``[N, O, OH, OW]`` of exact integers.

    Same inputs and result as the C++ ``xnor_conv2d``: ``packed`` from
    :func:`pack_activations`, ``packed_weights`` ``[O, K, K, Cw]``.
    """
    n = packed.shape[0]
    out_channels, kernel = packed_weights.shape[0], packed_weights.shape[1]
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    cw = packed.shape[-1]
    mismatches = torch.zeros(n, out_h, out_w, out_channels, dtype=torch.int64, device=packed.device)
    # Chunk the output channels so the [N, OH, OW, O_chunk, Cw] XOR stays small.
    per_channel = max(1, n * out_h * out_w * cw)
    chunk = max(1, _CHUNK_ELEMENTS // per_channel)
    for kh in range(kernel):
        for kw in range(kernel):
            window = packed[:, kh : kh + stride * (out_h - 1) + 1 : stride, kw : kw + stride * (out_w - 1) + 1 : stride]
            window = window.unsqueeze(3)  # [N, OH, OW, 1, Cw]
            for start in range(0, out_channels, chunk):
                w = packed_weights[start : start + chunk, kh, kw]  # [o, Cw]
                mismatches[..., start : start + chunk] += popcount64(window ^ w).sum(-1)
    values = kernel * kernel * channels - 2 * mismatches
    # Padded taps were read as +1: remove what they added (the float model adds 0 there).
    border = border_taps(height, width, kernel, stride, padding).to(packed.device)
    correction = (border.view(-1, kernel * kernel) @ weight_tap_sums.t().to(torch.float32)).view(
        1, out_h, out_w, out_channels
    )
    return (values.to(torch.float32) - correction).permute(0, 3, 1, 2).contiguous()
