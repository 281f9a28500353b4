"""Export a BNext model to a 1-bit inference file, and load an inference model from it.

    python -m models.export --model bnext_tiny --checkpoint model_best.pth.tar --output bnext_tiny.safetensors
    python -m models.export --model bnext_tiny --checkpoint model_best.pth.tar --output tiny_int8.safetensors --int8
    python -m models.export --sizes            # file sizes of BNext-T/S/M/L (random weights)

The file is a ``.safetensors`` file (tensors and string metadata only; nothing is
unpickled when it is read). It holds the state dict of the converted model of
:func:`models.binary_inference.convert_to_binary`:

* binary convolutions: ``<layer>.packed_weight`` int64 ``[O, K, K, ceil(C/64)]``, the
  signs at 1 bit with 64 input channels per word (:mod:`models.bitpack`),
  ``<layer>.threshold`` float32 ``[C]`` (the folded learnable bias) and
  ``<layer>.weight_zero_index`` (positions of zero weights, normally empty);
* folded batch norms: ``<bn>.scale`` and ``<bn>.shift``;
* every other real-valued tensor as float32, or with ``--int8`` the weight matrices
  of the real-valued convolutions and of the classifier as int8 with one float32
  scale per output channel (symmetric: ``w = q * scale``, ``q`` in ``[-127, 127]``),
  stored as ``<key>.q`` and ``<key>.qscale``. Per-channel vectors (thresholds, folded
  norms, PReLU slopes, biases, mixing scales) stay float32: they are a few percent of
  the file, and the thresholds decide signs.

The metadata records the format, the model name and its :func:`models.create_model`
arguments, so that :func:`load_inference_model` needs nothing but the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

import torch
from torch import nn

from .binary_inference import FOLDS, convert_to_binary
from .blocks import BasicBlock, Processor
from .bnext import BNext, BNext18
from .checkpoint import load_checkpoint
from .factory import MODEL_NAMES, create_model
from .precision import FULL_PRECISION, layer_precision, set_temperature

FORMAT = "bnext-binary"
FORMAT_VERSION = "1"
INT8_MAX = 127
_QUANT_SUFFIX, _SCALE_SUFFIX = ".q", ".qscale"
#: Temperature given to a freshly built skeleton so that its binarizers are in hard-sign mode.
_HARD_SIGN_TEMPERATURE = 1e-12


def model_config(model: nn.Module) -> dict:
    """The :func:`models.create_model` keyword arguments that rebuild ``model``'s architecture."""
    if isinstance(model, BNext):
        stem_conv = model.feature[0].conv1
        blocks = [m for m in model.feature if isinstance(m, BasicBlock)]
        processors = [m for m in model.modules() if isinstance(m, Processor)]
        return {
            "num_classes": model.num_classes,
            "stem": "imagenet" if stem_conv.stride[0] == 2 else "cifar",
            "elm_attention": bool(blocks) and blocks[0].spatial_name == "Attention",
            "info_recoupling": bool(processors) and processors[0].info_recoupling,
            "stage_channels": list(model.channels),
            "real_bits": _real_bits(model),
        }
    if isinstance(model, BNext18):
        return {
            "num_classes": model.num_classes,
            "stem": "imagenet" if model.conv1.kernel_size[0] == 7 else "cifar",
            "stage_channels": list(model.channels),
            "real_bits": _real_bits(model),
        }
    raise TypeError(f"only BNext and BNext18 models can be exported, got {type(model).__name__}")


def _real_bits(model: nn.Module) -> int:
    # The precision of the real-valued layers (create_model(real_bits=...)), read from their tags.
    for module in model.modules():
        precision = layer_precision(module)
        if precision is not None and not precision.is_binary:
            return precision.weight_bits
    return FULL_PRECISION


def _quantizable(model: nn.Module) -> list[str]:
    """State-dict keys of the real-valued weight matrices (convs and linears that are not binary)."""
    keys = []
    for name, module in model.named_modules():
        precision = layer_precision(module)
        weight = getattr(module, "weight", None)
        if precision is None or precision.weight_bits == 1 or not isinstance(weight, torch.Tensor):
            continue
        if weight.dim() >= 2:
            keys.append(f"{name}.weight" if name else "weight")
    return keys


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q, scale)`` with ``weight ~= q * scale``."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale is exact
    q = torch.round(flat / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights from :func:`quantize_int8`'s ``(q, scale)``."""
    return q.float() * scale.view(-1, *([1] * (q.dim() - 1)))


def export_inference(model: nn.Module, name: str, path: str | os.PathLike, int8: bool = False) -> dict[str, str]:
    """Write ``model`` (hard-sign mode) as a 1-bit inference file; returns the metadata written."""
    from safetensors.torch import save_file

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    config = model_config(model)
    converted = convert_to_binary(model, fold=True)
    state = {key: value.detach().cpu().contiguous() for key, value in converted.state_dict().items()}
    quantized = _quantizable(converted) if int8 else []
    for key in quantized:
        q, scale = quantize_int8(state.pop(key))
        state[key + _QUANT_SUFFIX] = q
        state[key + _SCALE_SUFFIX] = scale
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "config": json.dumps(config),
        "int8": json.dumps(quantized),
        "folds": json.dumps(list(FOLDS)),
        "bit_order": "bit c%64 of word c//64 is 1 for -1; words are int64 [O, K, K, ceil(C/64)]",
    }
    save_file(state, os.fspath(path), metadata=metadata)
    return metadata


def read_inference_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an inference file (checked to be this format)."""
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a BNext binary inference file (format {metadata.get('format')!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {metadata.get('format_version')}, expected {FORMAT_VERSION}")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def load_inference_model(path: str | os.PathLike) -> nn.Module:
    """Build the binary inference model stored in ``path`` (no checkpoint or config needed)."""
    tensors, metadata = read_inference_file(path)
    config = json.loads(metadata["config"])
    for key in json.loads(metadata.get("int8", "[]")):
        tensors[key] = dequantize_int8(tensors.pop(key + _QUANT_SUFFIX), tensors.pop(key + _SCALE_SUFFIX))
    # Build the skeleton on the meta device: no memory, no random init, no packing.
    with torch.device("meta"):
        model = convert_to_binary(create_model(metadata["model"], **config), fold=True, pack=False)
    for key, value in tensors.items():
        if key.endswith("weight_zero_index"):
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            owner.weight_zero_index = torch.empty_like(value, device="meta")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.export_metadata = metadata
    return model.eval()


def _load_float_model(name: str, checkpoint: str | None, create_kwargs: dict) -> nn.Module:
    model = create_model(name, **create_kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        # No weights: random latent weights, exported in hard-sign mode (for sizes and tests).
        set_temperature(model, _HARD_SIGN_TEMPERATURE)
    return model.eval()


def report_sizes(names: Sequence[str] = ("bnext_tiny", "bnext_small", "bnext_middle", "bnext_large")) -> list[dict]:
    """File sizes (bytes) of the float checkpoint and of the fp32 and int8 inference files, random weights."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            torch.manual_seed(0)
            model = _load_float_model(name, None, {})
            row = {"model": name}
            checkpoint = os.path.join(tmp, "float.pth")
            torch.save(model.state_dict(), checkpoint)
            row["float_checkpoint"] = os.path.getsize(checkpoint)
            os.remove(checkpoint)
            for label, int8 in (("binary_fp32", False), ("binary_int8", True)):
                target = os.path.join(tmp, f"{label}.safetensors")
                export_inference(model, name, target, int8=int8)
                row[label] = os.path.getsize(target)
                os.remove(target)
            rows.append(row)
            del model
    return rows


def _format_sizes(rows: list[dict]) -> str:
    lines = [
        "| model | float checkpoint | 1-bit + fp32 real | 1-bit + int8 real | ratio (fp32 / int8) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mb = {key: row[key] / 1e6 for key in ("float_checkpoint", "binary_fp32", "binary_int8")}
        lines.append(
            f"| {row['model']} | {mb['float_checkpoint']:.1f} MB | {mb['binary_fp32']:.1f} MB | "
            f"{mb['binary_int8']:.1f} MB | {row['float_checkpoint'] / row['binary_fp32']:.1f}x / "
            f"{row['float_checkpoint'] / row['binary_int8']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: export a checkpoint, or print the file sizes of the four BNext sizes."""
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, help="architecture of the checkpoint")
    parser.add_argument("--checkpoint", help="float checkpoint (official release, state dict or safetensors)")
    parser.add_argument("--output", help="inference file to write (.safetensors)")
    parser.add_argument("--int8", action="store_true", help="store real-valued weight matrices at 8 bits")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--no-elm-attention", action="store_true", help="the no-ELM-attention ablation")
    parser.add_argument("--no-info-recoupling", action="store_true", help="the no-info-recoupling ablation")
    parser.add_argument("--real-bits", type=int, default=FULL_PRECISION, help="create_model(real_bits=...)")
    parser.add_argument("--sizes", action="store_true", help="print file sizes of BNext-T/S/M/L (random weights)")
    args = parser.parse_args(argv)
    if args.sizes:
        print(_format_sizes(report_sizes()))
        return 0
    if not (args.model and args.checkpoint and args.output):
        parser.error("--model, --checkpoint and --output are required (or --sizes)")
    kwargs = {
        "num_classes": args.num_classes,
        "stem": args.stem,
        "width_mult": args.width_mult,
        "real_bits": args.real_bits,
    }
    if args.model != "bnext18":
        kwargs.update(elm_attention=not args.no_elm_attention, info_recoupling=not args.no_info_recoupling)
    try:
        model = _load_float_model(args.model, args.checkpoint, kwargs)
        export_inference(model, args.model, args.output, int8=args.int8)
    except (ValueError, FileNotFoundError) as error:  # wrong architecture, mid-training checkpoint, no file
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {size / 1e6:.2f} MB ({'int8' if args.int8 else 'float32'} real-valued weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
