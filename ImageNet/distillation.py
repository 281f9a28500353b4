"""Consecutive multi-teacher knowledge distillation (CKD) with per-sample teacher weighting.

The pieces, each in one place:

* :func:`distribution_loss` — soft-target cross-entropy of the student against one
  teacher, per sample (official ``DistributionLoss`` at temperature 1).
* :func:`teacher_weights` — the weights over teachers for every sample: a softmax of
  the per-sample losses (``hard``: more weight where the student matches worse, as
  the official code does; ``easy``: more weight on the closer teacher, as the 2022
  README describes), or uniform.
* :func:`combine` — the weighted loss, per sample (``sample``, the intended
  behaviour), or with batch-mean weights times batch-mean losses (``batch``, what the
  official code computes because of its ``"instance"``/``"Instance"`` mismatch).
* :class:`RoundSchedule` — which assistant teacher joins the main teacher in which epochs.
* :class:`DistillationLoss` — the training loss that ties them together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Batch, ClassificationLoss

WEIGHTINGS = ("sample", "batch", "uniform")
SIGNS = ("hard", "easy")


def distribution_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Per-sample ``-sum_k softmax(t/T)_k * log softmax(s/T)_k * T**2`` (teacher detached).

    At ``T = 1`` this is the official loss; the ``T**2`` factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al.).
    """
    teacher_probs = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs * log_student).sum(dim=-1) * temperature**2


def teacher_weights(per_sample: torch.Tensor, weighting: str = "sample", sign: str = "hard") -> torch.Tensor:
    """Weights over teachers, shape ``(batch, teachers)``, each row summing to 1, detached.

    ``per_sample`` holds each sample's distillation loss against each teacher, shape
    ``(batch, teachers)``. ``hard`` gives ``softmax(+loss)``, ``easy`` ``softmax(-loss)``;
    ``uniform`` weighting ignores the losses.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    if weighting == "uniform":
        return torch.full_like(per_sample, 1.0 / per_sample.shape[1])
    scores = per_sample.detach() if sign == "hard" else -per_sample.detach()
    return F.softmax(scores, dim=1)


def combine(per_sample: torch.Tensor, weights: torch.Tensor, weighting: str = "sample") -> torch.Tensor:
    """The distillation loss from per-sample losses and weights, both ``(batch, teachers)``.

    ``sample``/``uniform``: ``mean_n (1/M) sum_i w_ni * l_ni``. ``batch`` (official):
    ``(1/M) sum_i mean_n(w_ni) * mean_n(l_ni)``. The ``1/M`` is the official division
    by the number of teachers.
    """
    teachers = per_sample.shape[1]
    if weighting == "batch":
        return (weights.mean(dim=0) * per_sample.mean(dim=0)).sum() / teachers
    return (weights * per_sample).sum(dim=1).mean() / teachers


@dataclass(frozen=True)
class Round:
    """One CKD round: from ``start_epoch`` on, ``assistant`` teaches next to the main teacher."""

    start_epoch: int
    assistant: str


class RoundSchedule:
    """Which teachers are in force in which epoch.

    Official CKD: the rounds split the run into equal epoch ranges, one per assistant
    (round ``k`` while ``epoch / (epochs / A) < k + 1``), inside one run whose learning
    rate and temperature schedules are not reset. ``rounds`` may instead give explicit
    start epochs. With no assistants the main teacher teaches alone.
    """

    def __init__(self, main: str, assistants: Sequence[str] = (), epochs: int = 1, starts: Sequence[int] | None = None):
        if not main:
            raise ValueError("a main teacher is required for distillation")
        self.main = main
        assistants = list(assistants)
        if starts is None:
            starts = [self._equal_start(k, len(assistants), epochs) for k in range(len(assistants))]
        starts = list(starts)
        if len(starts) != len(assistants):
            raise ValueError(f"{len(assistants)} assistant teachers but {len(starts)} round start epochs")
        if starts and (starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:]))):
            raise ValueError(f"round start epochs must begin at 0 and increase, got {starts}")
        self.rounds = [Round(start, name) for start, name in zip(starts, assistants)]

    @staticmethod
    def _equal_start(k: int, count: int, epochs: int) -> int:
        # The first epoch e with e / (epochs / count) >= k, i.e. e >= k * epochs / count.
        return -(-k * epochs // count)

    def round_index(self, epoch: int) -> int:
        """The round in force at ``epoch`` (0 when there are no assistants)."""
        index = 0
        for k, round_ in enumerate(self.rounds):
            if epoch >= round_.start_epoch:
                index = k
        return index

    def teachers(self, epoch: int) -> list[str]:
        """Names of the teachers in force at ``epoch``: ``[assistant, main]`` or ``[main]``."""
        if not self.rounds:
            return [self.main]
        return [self.rounds[self.round_index(epoch)].assistant, self.main]

    def all_teachers(self) -> list[str]:
        """Every teacher the run will need, each once."""
        return list(dict.fromkeys([r.assistant for r in self.rounds] + [self.main]))


class DistillationLoss(nn.Module):
    """Training loss: weighted distillation from the teachers in force, plus an optional label term.

    ``teachers`` maps a name to a :class:`~ImageNet.teachers.Teacher` (a callable that
    returns logits for the student's batch). Official settings: ``temperature=1``,
    ``label_weight=0``, ``weighting="batch"``, ``sign="hard"``; the default weighting
    here is ``sample``, the per-sample weighting the official code meant.
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        schedule: RoundSchedule,
        *,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        weighting: str = "sample",
        sign: str = "hard",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        missing = [name for name in schedule.all_teachers() if name not in teachers]
        if missing:
            raise ValueError(f"no loaded teacher for {missing}")
        if not temperature > 0:
            raise ValueError(f"the distillation temperature must be positive, got {temperature}")
        teacher_weights(torch.zeros(1, 1), weighting, sign)  # validates both names
        self.teachers = dict(teachers)
        self.schedule = schedule
        self.temperature = temperature
        self.label_weight = label_weight
        self.weighting = weighting
        self.sign = sign
        self.labels = ClassificationLoss(label_smoothing)
        self._weight_sums: dict[str, torch.Tensor] = {}
        self._samples = 0

    def forward(self, logits: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor:
        names = self.schedule.teachers(epoch)
        cache: dict[str, torch.Tensor] = {}
        for name in names:  # a teacher named twice (official BNext-L round 3) runs once
            if name not in cache:
                cache[name] = self.teachers[name](batch.images)
        per_sample = torch.stack([distribution_loss(logits, cache[n], self.temperature) for n in names], dim=1)
        weights = teacher_weights(per_sample, self.weighting, self.sign)
        loss = combine(per_sample, weights, self.weighting)
        self._record(names, weights)
        if self.label_weight:
            loss = loss + self.label_weight * self.labels(logits, batch, epoch)
        return loss

    def _record(self, names: list[str], weights: torch.Tensor) -> None:
        totals = weights.detach().sum(dim=0)
        for index, name in enumerate(names):
            key = f"{'main' if index == len(names) - 1 else 'assistant'}:{name}"
            self._weight_sums[key] = self._weight_sums.get(key, 0) + totals[index]
        self._samples += weights.shape[0]

    def pop_epoch_stats(self) -> dict[str, float]:
        """Mean weight of each teacher since the last call (this process's samples), then reset."""
        stats = {key: float(value) / self._samples for key, value in self._weight_sums.items()} if self._samples else {}
        self._weight_sums, self._samples = {}, 0
        return stats
