"""ONNX export of the evaluation-mode BNext model, checked against PyTorch with ONNX Runtime.

    python -m models.export_onnx --model bnext_tiny --checkpoint model_best.pth.tar --output bnext_tiny.onnx

The graph is the float simulation (``Sign`` activations, ``±1`` weights computed by
``Sign`` from the latent weights in hard-sign mode, batch norms, PReLU, the SE
gates): ONNX has no 1-bit convolution, so a runtime executes the binary convs in
float. It is exported with the TorchScript-based exporter (``dynamo=False``), which
needs only the ``onnx`` package; the check needs ``onnxruntime``.

Comparing a binary network across runtimes: a different order of float additions
changes values by float32 rounding, and a value that sits within rounding of its sign
threshold then flips its sign, which changes later layers by much more than rounding.
Trained (or batch-norm calibrated) models rarely have such values; the check reports
the largest absolute difference of the logits and the share of matching top-1
classes so that a flip is visible rather than hidden by a loose tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .factory import MODEL_NAMES, create_model
from .precision import FULL_PRECISION, get_temperature

DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: int = 224,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> None:
    """Write the evaluation-mode ``model`` (input ``[N, 3, input_size, input_size]``) as an ONNX file."""
    model = model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation; it is chosen on purpose (module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        # Shape checks in the model become constants of the trace; the input size is fixed anyway.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            os.fspath(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
        )


def check_onnx(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor) -> dict[str, float]:
    """Run ``inputs`` through ONNX Runtime and the PyTorch ``model``; return the differences.

    Keys: ``max_abs_diff``, ``max_abs_logit`` (scale of the reference), ``top1_agreement``.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"input": inputs.detach().cpu().numpy()})
    with torch.no_grad():
        reference = model.eval()(inputs)
    onnx_logits = torch.from_numpy(onnx_logits)
    return {
        "max_abs_diff": float((onnx_logits - reference).abs().max()),
        "max_abs_logit": float(reference.abs().max()),
        "top1_agreement": float((onnx_logits.argmax(1) == reference.argmax(1)).float().mean()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: export a checkpoint to ONNX and check it on random inputs."""
    parser = argparse.ArgumentParser(prog="python -m models.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, required=True)
    parser.add_argument("--checkpoint", required=True, help="float checkpoint (official release, state dict, ...)")
    parser.add_argument("--output", required=True, help="ONNX file to write")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--real-bits", type=int, default=FULL_PRECISION)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    args = parser.parse_args(argv)
    model = create_model(
        args.model, num_classes=args.num_classes, stem=args.stem, width_mult=args.width_mult, real_bits=args.real_bits
    )
    load_checkpoint(model, args.checkpoint)
    model.eval()
    temperature = get_temperature(model)
    if temperature >= 1e-5:
        print(f"note: temperature {temperature:g}: the weights are not yet exact signs (mid-training checkpoint)")
    export_onnx(model, args.output, args.input_size, args.opset)
    print(f"wrote {args.output}")
    if not args.no_check:
        torch.manual_seed(0)
        result = check_onnx(model, args.output, torch.randn(2, 3, args.input_size, args.input_size))
        print(
            f"ONNX Runtime vs PyTorch on 2 random inputs: max |diff| {result['max_abs_diff']:.3g} "
            f"(logits up to {result['max_abs_logit']:.3g}), top-1 agreement {result['top1_agreement']:.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
