"""Teachers for distillation: timm models, loaded from local files or timm's pretrained weights.

A :class:`Teacher` is frozen, in eval mode, and runs under ``torch.inference_mode``
with the student's AMP dtype and memory format. It receives the student's batch
(normalized for the student) and renormalizes it when its own pretrained
configuration asks for another mean and standard deviation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

import models


class TeacherError(ValueError):
    """A teacher that cannot be built or loaded; the message names it and says what to do."""


class Teacher(nn.Module):
    """A frozen classifier whose logits serve as soft targets."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        # The statistics the teacher was trained with: its pretrained configuration's, or
        # (None, for a teacher trained by this project) the student's own.
        config = getattr(model, "pretrained_cfg", None) or {}
        teacher_mean = tuple(config.get("mean") or student_mean)
        teacher_std = tuple(config.get("std") or student_std)
        self.renormalize = teacher_mean != tuple(student_mean) or teacher_std != tuple(student_std)
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, as one scale and shift per channel
        scale = torch.tensor(student_std) / torch.tensor(teacher_std)
        shift = (torch.tensor(student_mean) - torch.tensor(teacher_mean)) / torch.tensor(teacher_std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode whatever the student does."""
        super().train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(images.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            if self.renormalize:
                images = images * self.scale + self.shift
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = self.model(images).float()
        # An inference-mode tensor cannot enter the student's autograd graph; a clone made
        # outside inference mode can (as a constant).
        return logits.clone()


def parse_weight_files(entries: Sequence[str]) -> dict[str, str]:
    """``["name=path", ...]`` (the ``--teacher-weights`` flag) as a mapping; bad entries raise TeacherError."""
    files = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise TeacherError(f"--teacher-weights takes NAME=PATH entries, got {entry!r}")
        files[name] = path
    return files


def build_teacher_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A timm classifier for ``name``: from a local weights file when given, else timm's pretrained weights.

    Local files are safetensors or torch files (read with ``weights_only=True``). A
    checkpoint written by ``ImageNet/train.py`` is marked as expecting the student's input
    normalization; any other file (timm's pretrained weights saved for offline use, say)
    keeps the timm configuration's. Pretrained weights must classify as many classes as
    the data has. Every failure raises :class:`TeacherError` naming the teacher.
    """
    if not timm.is_model(name):
        raise TeacherError(f"teacher {name!r} is not a timm model name (see timm.list_models())")
    if weights is not None:
        if not Path(weights).is_file():
            raise TeacherError(f"teacher {name!r}: weights file {weights!r} does not exist")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        try:
            models.load_checkpoint(model, weights)
        except (ValueError, OSError) as error:
            raise TeacherError(f"teacher {name!r}: cannot load {weights!r}: {error}") from error
        if _trained_by_this_project(weights):
            # It saw the inputs our data pipeline makes, not those of its timm pretrained config.
            model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": None, "std": None}
        return model
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as error:  # hub, network and format errors all mean "no pretrained weights here"
        raise TeacherError(
            f"teacher {name!r}: timm could not provide pretrained weights ({error.__class__.__name__}: {error}); "
            f"on a machine without internet pass a local file with --teacher-weights {name}=PATH"
        ) from error
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes", num_classes)
    if pretrained_classes != num_classes:
        # timm would silently give the teacher a fresh, random classifier.
        raise TeacherError(
            f"teacher {name!r}: its pretrained weights classify {pretrained_classes} classes, the data has "
            f"{num_classes}; fine-tune it on this data (ImageNet/train.py --model {name}) and pass the file "
            f"with --teacher-weights {name}=PATH"
        )
    return model


def _trained_by_this_project(path: str) -> bool:
    """True for a checkpoint written by ImageNet/train.py (it records its configuration)."""
    if path.endswith(".safetensors"):
        return False
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable files were already refused by load_checkpoint
        return False
    return isinstance(raw, dict) and "config" in raw and "model" in raw


def load_teachers(
    names: Sequence[str],
    *,
    num_classes: int,
    weight_files: Mapping[str, str],
    device: torch.device,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Teacher]:
    """Build every named teacher before training starts, so that a bad one stops the run early."""
    unknown = sorted(set(weight_files) - set(names))
    if unknown:
        raise TeacherError(f"--teacher-weights names {unknown}, which are not teachers of this run ({list(names)})")
    teachers = {}
    for name in names:
        model = build_teacher_model(name, num_classes, weight_files.get(name)).to(device)
        teachers[name] = Teacher(
            name,
            model,
            student_mean=student_mean,
            student_std=student_std,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        ).to(device)
    return teachers
