"""Check the models on a CUDA device against the CPU: same logits and gradients, compile, bf16.

Prints one line per check with the measured relative error; exits non-zero when a
float32 check is off by more than the fixture tolerances (1e-4 logits, 1e-3 gradients).
Binary networks can flip a sign on rounding (see tests/models/test_reference_numerics.py),
so the comparison uses small random models at temperatures where that is rare, and
reports rather than asserts the bf16 error.

``python benchmarks/cuda_sanity.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])


def check(name: str, **kwargs) -> bool:
    """CPU vs CUDA for one model: eval logits, train logits and gradients, compiled eval, bf16 eval."""
    torch.manual_seed(0)
    cpu = models.create_model(name, num_classes=10, stem="cifar", **kwargs)
    with torch.no_grad():
        for module in cpu.modules():
            if isinstance(module, models.BinaryConv2d):
                module.weight.uniform_(-1.4, 1.4)
    gpu = models.create_model(name, num_classes=10, stem="cifar", **kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(8, 3, 32, 32)
    target = torch.randint(0, 10, (8,))
    ok = True
    for temperature in (1.0, 0.3):
        models.set_temperature(cpu, temperature)
        models.set_temperature(gpu, temperature)
        cpu.train()
        gpu.train()
        cpu.zero_grad()
        gpu.zero_grad()
        out_cpu, out_gpu = cpu(x), gpu(x.cuda())
        F.cross_entropy(out_cpu, target).backward()
        F.cross_entropy(out_gpu, target.cuda()).backward()
        train_err, grad_err = _relative(out_gpu, out_cpu), _relative(_grads(gpu), _grads(cpu))
        cpu.eval()
        gpu.eval()
        with torch.no_grad():
            eval_err = _relative(gpu(x.cuda()), cpu(x))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16_err = _relative(gpu(x.cuda()).float(), cpu(x))
        passed = train_err <= 1e-4 and grad_err <= 1e-3 and eval_err <= 1e-4
        ok &= passed
        print(
            f"{name:12s} T={temperature:<4} train logits {train_err:.1e}  grads {grad_err:.1e}  "
            f"eval logits {eval_err:.1e}  bf16 eval logits {bf16_err:.1e}  {'ok' if passed else 'MISMATCH'}"
        )
    compiled = torch.compile(gpu)
    with torch.no_grad():
        compile_err = _relative(compiled(x.cuda()), gpu(x.cuda()))
    ok &= compile_err <= 1e-4
    print(f"{name:12s} torch.compile eval vs eager: {compile_err:.1e}  {'ok' if compile_err <= 1e-4 else 'MISMATCH'}")
    return ok


def main() -> int:
    """Run the checks for BNext-T (reduced width) and BNext-18 (reduced width)."""
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    torch.backends.cuda.matmul.allow_tf32 = False
    results = [check("bnext_tiny", width_mult=0.5), check("bnext18", width_mult=0.5)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
