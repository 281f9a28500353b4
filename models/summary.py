"""Larq-style complexity summary: parameters by precision, packed size, BOPs, FLOPs and OPs.

Everything is read from the precision tags (:func:`models.layer_precision`,
:func:`models.parameter_bits`), never from module or parameter names, and the MACs
come from the shapes seen in one forward pass. Conventions (spec §1.7):

* Only convolutions and linear layers count. BN, PReLU, pooling, the learnable
  thresholds and element-wise products and additions are not counted, as in ReActNet.
* ``bops``: MACs of layers with 1-bit weights *and* 1-bit inputs; ``flops``: the
  MACs of every other conv/linear layer (stem, squeeze-excitation, classifier,
  BNext-18's downsampling shortcuts) that computes in floating point;
  ``macs_int8``: the MACs of those layers when they are tagged with at most 8-bit
  weights and inputs (the ``--quant`` variant, ``create_model(..., real_bits=8)``).
* ``ops = bops / 64 + flops + macs_int8 / 8``: the ReActNet convention, with an 8-bit
  MAC counted as 1/8 of an OP.
* ``ops_readme = bops / 64 + (flops + macs_int8) / 8``: the official README's
  convention, which counts every real-valued layer as 8-bit; its "BOPs (G)" column
  is this number. For the ``--quant`` variant both conventions agree.
* ``binarization_degree = (bops / 64) / ops_readme``, as a fraction: the README's
  "Binarization Degree (BOPs/(64*OPs))" column.
* Sizes are in megabytes of 10**6 bytes (not MiB). Every parameter is stored with
  its tagged bits (1 for the binary weights, 32 for the rest); the int8 size caps
  them at 8 bits. Buffers (BN running statistics, temperatures) are not counted:
  at inference the BN statistics fold into its affine parameters.

Command line::

    python -m models.summary bnext_tiny [--img-size 224] [--stem imagenet] [--quant] [--json]
    python -m models.summary --markdown-table

The command line builds the network on the ``meta`` device, so the forward pass
only propagates shapes and even BNext-L is summarized in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .factory import MODEL_NAMES, create_model
from .precision import layer_precision, parameter_bits

#: One megabyte, in bytes (decimal, as in the spec's ≈111.5 MB for BNext-L).
MEGABYTE = 10**6
BITS_PER_BYTE = 8
#: A 64-bit word holds 64 XNOR/popcount MACs, so 64 BOPs make one OP (ReActNet).
BOPS_PER_OP = 64
#: An 8-bit MAC is 1/8 of an OP; the README counts every real-valued MAC that way.
INT8_MACS_PER_OP = 8
INT8_BITS = 8
#: The order of the keys of :meth:`Summary.to_dict` (and of ``--json``).
TOTAL_KEYS = (
    "model",
    "img_size",
    "params_binary",
    "params_real",
    "size_mb_packed",
    "size_mb_packed_int8",
    "bops",
    "flops",
    "macs_int8",
    "ops",
    "ops_readme",
    "binarization_degree",
)


@dataclass(frozen=True)
class LayerSummary:
    """One conv/linear layer: its precision, shapes, parameters and MACs (summed over its calls)."""

    name: str
    type: str
    weight_bits: int
    input_bits: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    binary_macs: int
    real_macs: int
    calls: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (shapes as lists)."""
        return {
            "name": self.name,
            "type": self.type,
            "weight_bits": self.weight_bits,
            "input_bits": self.input_bits,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "params": self.params,
            "binary_macs": self.binary_macs,
            "real_macs": self.real_macs,
            "calls": self.calls,
        }


@dataclass(frozen=True)
class Summary:
    """Per-layer records and the totals of a network at one input size.

    ``ops``, ``ops_readme`` and ``binarization_degree`` are derived from ``bops``
    and ``flops`` (see the module docstring), so they can never disagree with them.
    """

    model: str
    img_size: int
    layers: tuple[LayerSummary, ...]
    params_binary: int
    params_real: int
    size_mb_packed: float
    size_mb_packed_int8: float
    bops: int
    flops: int
    macs_int8: int = 0

    @property
    def params_total(self) -> int:
        """All parameters, binary and real."""
        return self.params_binary + self.params_real

    @property
    def ops(self) -> float:
        """ReActNet's OPs: ``bops / 64 + flops + macs_int8 / 8``."""
        return self.bops / BOPS_PER_OP + self.flops + self.macs_int8 / INT8_MACS_PER_OP

    @property
    def ops_readme(self) -> float:
        """The official README's OPs: ``bops / 64 + (flops + macs_int8) / 8`` (real layers counted as 8-bit)."""
        return self.bops / BOPS_PER_OP + (self.flops + self.macs_int8) / INT8_MACS_PER_OP

    @property
    def binarization_degree(self) -> float:
        """``(bops / 64) / ops_readme`` as a fraction; 0 for a network without MACs."""
        return (self.bops / BOPS_PER_OP) / self.ops_readme if self.ops_readme else 0.0

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        """The totals under the keys of :data:`TOTAL_KEYS`; with ``layers=True`` also a ``layers`` list."""
        totals = {key: getattr(self, key) for key in TOTAL_KEYS}
        if layers:
            totals["layers"] = [layer.to_dict() for layer in self.layers]
        return totals

    def table(self) -> str:
        """The per-layer table followed by the totals, in readable units."""
        header = ("layer", "type", "w bits", "in bits", "output shape", "params", "binary MACs", "real MACs")
        rows = [
            (
                layer.name or "(model)",
                layer.type,
                str(layer.weight_bits),
                str(layer.input_bits),
                _format_shape(layer.output_shape),
                f"{layer.params:,}",
                f"{layer.binary_macs:,}",
                f"{layer.real_macs:,}",
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        # Text columns read left-aligned, numbers right-aligned.
        align = ("<", "<", ">", ">", "<", ">", ">", ">")

        def line(cells: Sequence[str]) -> str:
            return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)).rstrip()

        rule = "-" * len(line(header))
        out = [line(header), rule, *(line(row) for row in rows), rule]
        out += [
            f"model: {self.model} at {self.img_size}x{self.img_size}",
            f"params: {self.params_total / 1e6:.2f} M "
            f"(binary {self.params_binary / 1e6:.2f} M, real {self.params_real / 1e6:.2f} M)",
            f"size packed: {self.size_mb_packed:.2f} MB (1-bit binary, 32-bit real; MB = 10^6 bytes)",
            f"size packed, int8 real: {self.size_mb_packed_int8:.2f} MB (1-bit binary, 8-bit real)",
            f"BOPs (binary MACs): {self.bops / 1e9:.3f} G",
            f"FLOPs (float MACs): {self.flops / 1e9:.4f} G",
            f"8-bit MACs: {self.macs_int8 / 1e9:.4f} G",
            f"OPs = BOPs/64 + FLOPs + 8-bit MACs/8: {self.ops / 1e9:.4f} G",
            f"OPs, README convention = BOPs/64 + (FLOPs + 8-bit MACs)/8: {self.ops_readme / 1e9:.4f} G",
            f"binarization degree = (BOPs/64) / OPs_README: {100 * self.binarization_degree:.2f} %",
        ]
        return "\n".join(out)


def _format_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(size) for size in shape)


def _fan_in(module: nn.Module, output: torch.Tensor) -> int:
    """Multiplications behind one output element, from the layer's geometry attributes.

    Read from attributes rather than ``isinstance`` checks because
    :class:`~models.layers.BinaryConv2d` is not an ``nn.Conv2d``.
    """
    if hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
        kernel = module.kernel_size
        spatial_dims = output.dim() - 2
        kernel_elements = math.prod(kernel) if isinstance(kernel, (tuple, list)) else int(kernel) ** spatial_dims
        return module.in_channels // getattr(module, "groups", 1) * kernel_elements
    if hasattr(module, "in_features"):
        return int(module.in_features)
    raise TypeError(
        f"{type(module).__name__} carries a precision tag but has neither conv attributes "
        "(in_channels, kernel_size) nor linear ones (in_features): cannot count its MACs"
    )


class _LayerRecorder:
    """Forward hook that accumulates one layer's shapes, calls and MACs."""

    def __init__(self) -> None:
        self.input_shape: tuple[int, ...] | None = None
        self.output_shape: tuple[int, ...] | None = None
        self.macs = 0
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, expected a tensor")
        if self.calls == 0:
            self.input_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            self.output_shape = tuple(output.shape)
        self.calls += 1
        # Per sample: every output element costs fan_in MACs (batch is 1, but divide anyway).
        self.macs += output.numel() // max(output.shape[0], 1) * _fan_in(module, output)


def _input_like(model: nn.Module, in_channels: int, img_size: int) -> torch.Tensor:
    # Follow the model's device (so a model built on "meta" only propagates shapes) and float dtype.
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return torch.zeros(1, in_channels, img_size, img_size, device=tensor.device, dtype=tensor.dtype)
    return torch.zeros(1, in_channels, img_size, img_size)


def summarize(model: nn.Module, img_size: int = 224, in_channels: int = 3, name: str | None = None) -> Summary:
    """Count parameters by precision and the binary/real MACs of one ``1 x C x img_size x img_size`` forward.

    The forward runs in eval mode under ``torch.no_grad`` on the model's device;
    every module's train/eval flag is restored afterwards. A model built on the
    ``meta`` device (``with torch.device("meta"): ...``) gives the same counts
    without any arithmetic. A layer called several times has its MACs summed and
    the shapes of its first call recorded.

    Args:
        model: the network; only modules that :func:`models.layer_precision` tags count MACs.
        img_size: height and width of the input.
        in_channels: channels of the input.
        name: shown as ``model`` in the summary; defaults to the class name.
    """
    recorders: dict[str, tuple[nn.Module, _LayerRecorder]] = {}
    handles = []
    for module_name, module in model.named_modules():
        if layer_precision(module) is not None:
            recorder = _LayerRecorder()
            recorders[module_name] = (module, recorder)
            handles.append(module.register_forward_hook(recorder))

    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(_input_like(model, in_channels, img_size))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    layers = []
    for module_name, (module, recorder) in recorders.items():
        precision = layer_precision(module)
        binary = precision.is_binary
        layers.append(
            LayerSummary(
                name=module_name,
                type=type(module).__name__,
                weight_bits=precision.weight_bits,
                input_bits=precision.input_bits,
                input_shape=recorder.input_shape,
                output_shape=recorder.output_shape,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                binary_macs=recorder.macs if binary else 0,
                real_macs=0 if binary else recorder.macs,
                calls=recorder.calls,
            )
        )

    bits = parameter_bits(model)
    params_binary = params_real = packed_bits = packed_bits_int8 = 0
    for param_name, param in model.named_parameters():
        count, width = param.numel(), bits[param_name]
        if width == 1:
            params_binary += count
        else:
            params_real += count
        packed_bits += count * width
        packed_bits_int8 += count * min(width, INT8_BITS)

    return Summary(
        model=name if name is not None else type(model).__name__,
        img_size=img_size,
        layers=tuple(layers),
        params_binary=params_binary,
        params_real=params_real,
        size_mb_packed=packed_bits / BITS_PER_BYTE / MEGABYTE,
        size_mb_packed_int8=packed_bits_int8 / BITS_PER_BYTE / MEGABYTE,
        bops=sum(layer.binary_macs for layer in layers),
        flops=sum(layer.real_macs for layer in layers if not _is_int8(layer)),
        macs_int8=sum(layer.real_macs for layer in layers if _is_int8(layer)),
    )


def _is_int8(layer: LayerSummary) -> bool:
    return max(layer.weight_bits, layer.input_bits) <= INT8_BITS


def build_on_meta(name: str, **kwargs: Any) -> nn.Module:
    """:func:`models.create_model` on the ``meta`` device: shapes and tags only, no memory, no arithmetic."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def summarize_by_name(
    name: str,
    img_size: int = 224,
    stem: str = "imagenet",
    num_classes: int = 1000,
    width_mult: float = 1.0,
    real_bits: int = 32,
) -> Summary:
    """Build a named network on the ``meta`` device and :func:`summarize` it (``real_bits=8``: the 8-bit variant)."""
    model = build_on_meta(name, num_classes=num_classes, stem=stem, width_mult=width_mult, real_bits=real_bits)
    return summarize(model, img_size=img_size, name=name)


MARKDOWN_HEADER = (
    "| model | params (M): total (binary / real) | size packed (MB): fp32 real / int8 real | BOPs (G) "
    "| FLOPs (G) | 8-bit MACs (G) | OPs = BOPs/64 + FLOPs + 8-bit MACs/8 (G) "
    "| OPs README = BOPs/64 + (FLOPs + 8-bit MACs)/8 (G) | binarization degree (%) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(summary: Summary) -> str:
    """One README-ready markdown table row (columns of :data:`MARKDOWN_HEADER`)."""
    return (
        f"| {summary.model} "
        f"| {summary.params_total / 1e6:.2f} ({summary.params_binary / 1e6:.2f} / {summary.params_real / 1e6:.2f}) "
        f"| {summary.size_mb_packed:.2f} / {summary.size_mb_packed_int8:.2f} "
        f"| {summary.bops / 1e9:.3f} | {summary.flops / 1e9:.4f} | {summary.macs_int8 / 1e9:.4f} "
        f"| {summary.ops / 1e9:.4f} "
        f"| {summary.ops_readme / 1e9:.4f} | {100 * summary.binarization_degree:.2f} |"
    )


def markdown_table(
    names: Sequence[str] = MODEL_NAMES,
    img_size: int = 224,
    stem: str = "imagenet",
    num_classes: int = 1000,
    width_mult: float = 1.0,
    real_bits: int = 32,
) -> str:
    """A markdown table (header and one row per model) of the complexity of the named networks."""
    rows = [markdown_row(summarize_by_name(name, img_size, stem, num_classes, width_mult, real_bits)) for name in names]
    return "\n".join([MARKDOWN_HEADER, *rows])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.summary",
        description="Complexity summary of a BNext network: parameters by precision, packed size, BOPs, FLOPs, OPs.",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help=f"one of: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--img-size", type=_positive_int, default=224, help="input height and width (default 224)")
    parser.add_argument("--stem", choices=("imagenet", "cifar"), default="imagenet", help="stem type")
    parser.add_argument("--num-classes", type=_positive_int, default=1000, help="classifier size (default 1000)")
    parser.add_argument("--width-mult", type=float, default=1.0, help="channel multiplier (default 1.0)")
    parser.add_argument(
        "--quant",
        action="store_true",
        help="summarize the 8-bit variant: stem, squeeze-excitation, shortcuts and classifier at 8 bits "
        "(create_model(..., real_bits=8)); their MACs then count as 8-bit MACs",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the totals as one line of JSON")
    output.add_argument(
        "--markdown-table",
        action="store_true",
        help="print a markdown table row per model (all models, or only NAME when given)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad arguments, via argparse)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.name is None and not args.markdown_table:
        parser.error("NAME is required unless --markdown-table is given")
    names = [args.name] if args.name is not None else list(MODEL_NAMES)
    options = {
        "num_classes": args.num_classes,
        "stem": args.stem,
        "width_mult": args.width_mult,
        "real_bits": 8 if args.quant else 32,
    }
    models_by_name = {}
    for name in names:
        try:
            models_by_name[name] = build_on_meta(name, **options)
        except (ValueError, TypeError) as error:
            # The factory's message lists the valid names; argparse prints it and exits with status 2.
            parser.error(str(error))

    summaries = [summarize(model, img_size=args.img_size, name=name) for name, model in models_by_name.items()]
    if args.markdown_table:
        print("\n".join([MARKDOWN_HEADER, *(markdown_row(summary) for summary in summaries)]))
    elif args.json:
        print(json.dumps(summaries[0].to_dict()))
    else:
        print(summaries[0].table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
