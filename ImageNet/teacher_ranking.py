"""Rank candidate teachers for a binary student by two measures of the teacher-student capacity gap.

BNext selects its teachers by "knowledge complexity" (KC), a measure of how much of a
teacher's knowledge a binary student can take in. The paper's KC formula is not
available (BNEXT_SPEC.md, section 2.1), so this module implements two measures that are
this project's reading of the idea, not the paper's formula:

* ``entropy`` — the teacher's mean predictive entropy (nats) on a fixed sample of the
  training images (evaluation transform, no augmentation). A sharper teacher (low
  entropy) hands over more confident, more complex targets. Its top-1 on the same
  sample is reported alongside.
* ``student_kd_loss`` — the distillation loss (:func:`ImageNet.distillation.distribution_loss`,
  temperature 1) that a briefly trained binary student reaches against that teacher
  alone, on a held-out part of the sample. Every teacher gets the same fresh student
  (same seed, same batches, AdamW at lr 1e-3). Lower means a smaller gap: knowledge
  the student can absorb.

Teachers are ranked by ``student_kd_loss`` ascending, ties broken by lower entropy::

    python -m ImageNet.teacher_ranking --student bnext_tiny --teachers efficientnet_b0,efficientnet_b2 \\
        --data-dir /data/imagenet [--teacher-weights efficientnet_b0=b0.safetensors] [--json]

Teachers load as in training (:func:`ImageNet.teachers.build_teacher_model`): a local
file from ``--teacher-weights NAME=PATH``, else timm's pretrained weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Subset

import models
from ImageNet.data import CheckedImageFolder, DataError, build_transform, check_image_folder
from ImageNet.distillation import distribution_loss
from ImageNet.teachers import Teacher, TeacherError, build_teacher_model, parse_weight_files

#: Fraction of the sample kept out of the student's training, to measure its distillation loss.
HELD_OUT_FRACTION = 0.25
#: Learning rate of the student's AdamW steps (the BNext recipe's peak rate).
STUDENT_LR = 1e-3


@dataclass(frozen=True)
class TeacherScore:
    """The measures of one teacher on the sample."""

    teacher: str
    top1: float  # percent of the sample the teacher classifies correctly
    entropy: float  # mean predictive entropy, nats
    student_kd_loss: float  # the student's mean distillation loss on the held-out part


@dataclass
class Sample:
    """A fixed, preprocessed sample of training images; the last ``held_out`` rows are the held-out part."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    held_out: int

    @property
    def train_count(self) -> int:
        """Rows the student trains on."""
        return len(self.labels) - self.held_out


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy ``-sum_k p_k log p_k`` (nats) of ``softmax(logits)``; shape ``(batch,)``.

    Classes of probability 0 (a ``-inf`` logit, or one that underflows) add 0, the limit
    of ``p log p``, instead of the NaN of ``0 * -inf``.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


def load_sample(
    data_dir: str | Path,
    *,
    samples: int,
    img_size: int,
    seed: int,
    crop_pct: float = 0.95,
    interpolation: str = "bicubic",
    workers: int = 0,
) -> Sample:
    """``samples`` training images of ``data_dir`` (chosen at random with ``seed``), evaluation transform.

    The images are normalised with ImageNet statistics, as the training script does for
    folder datasets, so that each :class:`~ImageNet.teachers.Teacher` renormalises them
    the way it would in training. Raises :class:`DataError` for a bad folder or a
    sample too small to train on and hold out from.
    """
    classes = check_image_folder(data_dir)
    transform = build_transform(img_size=img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation)
    dataset = CheckedImageFolder(Path(data_dir) / "train", transform)
    count = min(samples, len(dataset))
    held_out = max(1, round(count * HELD_OUT_FRACTION))
    # BatchNorm in training mode needs two rows per batch; the held-out part needs one.
    if count - held_out < 2:
        raise DataError(
            f"a sample of {count} images leaves {count - held_out} for the student to train on; "
            f"pass --samples 4 or more (the folder has {len(dataset)} training images)"
        )
    # A random subset, not the first files: ImageFolder lists the images class by class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=64, num_workers=workers)
    images, labels = zip(*loader)
    return Sample(torch.cat(images), torch.cat(labels), len(classes), held_out)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The teacher's logits for every row of ``images`` (float32, on the CPU)."""
    return torch.cat(
        [
            teacher(images[start : start + batch_size].to(device)).float().cpu()
            for start in range(0, len(images), batch_size)
        ]
    )


def top1_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose arg-max is the label."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


def student_kd_loss(
    student: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    held_out: int,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    lr: float = STUDENT_LR,
) -> float:
    """Train ``student`` against the teacher logits ``targets``; return its mean loss on the held-out rows.

    The student trains on all rows but the last ``held_out`` and is measured on those.

    ``steps`` AdamW steps on batches drawn (with ``seed``, the same for every teacher)
    from the training rows, with :func:`~ImageNet.distillation.distribution_loss` at
    temperature 1 and the binarization constraints applied after every step, as in
    training. The held-out loss is measured in eval mode, after the batch-norm
    statistics are recomputed on the training rows (:func:`recalibrate_batch_norm`).
    """
    train_count = len(images) - held_out
    student = student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_batch = min(batch_size, train_count)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < per_batch:  # a new pass over the training rows, in a new order
            order = torch.cat([order, torch.randperm(train_count, generator=generator)])
        index, order = order[:per_batch], order[per_batch:]
        loss = distribution_loss(student(images[index].to(device)), targets[index].to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        models.apply_constraints(student)
    recalibrate_batch_norm(student, images[:train_count], batch_size, device)
    student.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(train_count, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            logits = student(images[start:stop].to(device))
            total += distribution_loss(logits, targets[start:stop].to(device)).sum().item()
    return total / held_out


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Replace every BatchNorm's running statistics by their average over batches of ``images`` (current weights).

    The batches are about ``batch_size`` rows (never fewer, so no batch has a single row).

    After a few steps the running averages (momentum 0.1) still mix in the statistics of
    earlier weights, and in a binary network those change abruptly as weight signs flip;
    the eval-mode loss then measured mostly that lag (on the demo digits: 2.9 and 2.2 for
    the same teacher under two seeds, with a train-mode loss of 0.46 for both).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    for chunk in torch.tensor_split(images, max(1, len(images) // batch_size)):
        model(chunk.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def rank(scores: Sequence[TeacherScore]) -> list[TeacherScore]:
    """Scores ordered by student KD loss ascending, then entropy ascending; NaN measures go last."""

    def key(score: TeacherScore) -> tuple[float, ...]:
        return tuple(value if math.isfinite(value) else math.inf for value in (score.student_kd_loss, score.entropy))

    return sorted(scores, key=key)


def check_teachers(names: Sequence[str], weight_files: dict[str, str]) -> None:
    """Refuse unknown timm names, missing weight files and weights for non-teachers before any work."""
    unknown = sorted(set(weight_files) - set(names))
    if unknown:
        raise TeacherError(f"--teacher-weights names {unknown}, which are not among --teachers ({list(names)})")
    for name in names:
        if not timm.is_model(name):
            raise TeacherError(f"teacher {name!r} is not a timm model name (see timm.list_models())")
        path = weight_files.get(name)
        if path is not None and not Path(path).is_file():
            raise TeacherError(f"teacher {name!r}: weights file {path!r} does not exist")


def score_teachers(args: argparse.Namespace) -> list[TeacherScore]:
    """Measure every teacher of ``args`` on one shared sample, one teacher in memory at a time."""
    names = list(dict.fromkeys(name.strip() for name in args.teachers.split(",") if name.strip()))
    if not names:
        raise TeacherError("--teachers names no teacher; pass e.g. --teachers efficientnet_b0,efficientnet_b2")
    weight_files = parse_weight_files(args.teacher_weights)
    check_teachers(names, weight_files)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch's message for an unknown device string
        raise ValueError(f"--device {args.device!r}: {error}") from error
    sample = load_sample(
        args.data_dir,
        samples=args.samples,
        img_size=args.img_size,
        seed=args.seed,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        workers=args.workers,
    )
    _progress(f"sample: {len(sample.labels)} images, {sample.num_classes} classes, {sample.held_out} held out")
    scores = []
    for name in names:
        model = build_teacher_model(name, sample.num_classes, weight_files.get(name))
        teacher = Teacher(name, model, student_mean=IMAGENET_DEFAULT_MEAN, student_std=IMAGENET_DEFAULT_STD)
        logits = teacher_logits(teacher.to(device), sample.images, args.batch_size, device)
        del teacher, model  # the next teacher may be large
        # The same seed for every teacher: the student's initial weights and batches are shared.
        torch.manual_seed(args.seed)
        student = models.create_model(
            args.student, num_classes=sample.num_classes, stem=args.stem, width_mult=args.width_mult
        )
        kd_loss = student_kd_loss(
            student,
            sample.images,
            logits,
            held_out=sample.held_out,
            steps=args.student_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            device=device,
        )
        score = TeacherScore(
            name, top1_percent(logits, sample.labels), predictive_entropy(logits).mean().item(), kd_loss
        )
        _progress(f"{name}: top-1 {score.top1:.2f}%, entropy {score.entropy:.4f}, student KD loss {kd_loss:.4f}")
        scores.append(score)
    return rank(scores)


def _progress(message: str) -> None:
    # Progress goes to stderr, so that stdout holds only the table and the JSON line.
    print(message, file=sys.stderr, flush=True)


def format_table(scores: Sequence[TeacherScore]) -> str:
    """A plain-text table: rank, teacher, top-1 on the sample, entropy, student KD loss."""
    width = max([len("teacher"), *(len(score.teacher) for score in scores)])
    lines = [f"{'rank':>4}  {'teacher':<{width}}  {'top-1 %':>8}  {'entropy':>8}  {'student KD loss':>15}"]
    for position, score in enumerate(scores, start=1):
        lines.append(
            f"{position:>4}  {score.teacher:<{width}}  {score.top1:>8.2f}  {score.entropy:>8.4f}  "
            f"{score.student_kd_loss:>15.4f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, each documented in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m ImageNet.teacher_ranking",
        description=(
            "Rank teachers for a binary student by the teacher-student capacity gap. The paper's "
            "knowledge-complexity formula is not available: the two measures here are this project's "
            "reading of the idea, not the paper's formula. 'entropy': the teacher's mean predictive "
            "entropy (nats) on a fixed sample of training images (evaluation transform), with its top-1. "
            "'student_kd_loss': the distillation loss (temperature 1) that a fresh binary student, trained "
            "for --student-steps AdamW steps against that teacher alone, reaches on the held-out last 25% "
            "of the sample; lower = smaller gap. Ranked by student_kd_loss, ties by lower entropy. "
            "Prints a table and, as the last line, a JSON object."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--student", default="bnext_tiny", choices=models.MODEL_NAMES, help="BNext student")
    parser.add_argument("--teachers", required=True, help="comma-separated timm model names")
    parser.add_argument("--data-dir", required=True, help="dataset root with train/<class>/ (and val/<class>/)")
    parser.add_argument(
        "--teacher-weights",
        nargs="*",
        default=[],
        help="NAME=PATH local weights (safetensors or state dict) per teacher; others use timm pretrained=True",
    )
    parser.add_argument("--samples", type=int, default=512, help="training images in the sample (25%% held out)")
    parser.add_argument("--student-steps", type=int, default=100, help="AdamW steps of the student per teacher")
    parser.add_argument("--img-size", type=int, default=224, help="evaluation resolution")
    parser.add_argument("--crop-pct", type=float, default=0.95, help="evaluation center-crop fraction")
    parser.add_argument("--interpolation", default="bicubic", help="resize interpolation")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the student steps and teacher passes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample, the student and its batches")
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"], help="student stem")
    parser.add_argument("--width-mult", type=float, default=1.0, help="student width multiplier")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes for the sample")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object (no table)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure, rank, print; known failures are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    for flag, value in (("--samples", args.samples), ("--img-size", args.img_size)):
        if value < 1:
            print(f"error: {flag} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    if args.batch_size < 2:  # batch norm in training mode needs two rows
        print(f"error: --batch-size must be 2 or more, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.student_steps < 0:
        print(f"error: --student-steps must be >= 0, got {args.student_steps}", file=sys.stderr)
        return 2
    try:
        scores = score_teachers(args)
    except (TeacherError, DataError, ValueError, FileNotFoundError) as error:
        # TeacherError and DataError are ValueErrors, and so are a bad --width-mult, --stem or --device.
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_table(scores))
    print(json.dumps({"student": args.student, "ranking": [asdict(score) for score in scores]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
