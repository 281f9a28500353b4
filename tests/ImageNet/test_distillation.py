"""Distillation loss, per-sample teacher weighting and the consecutive rounds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ImageNet.distillation import DistillationLoss, RoundSchedule, combine, distribution_loss, teacher_weights
from ImageNet.losses import Batch


def test_distribution_loss_against_a_hand_computed_example() -> None:
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    teacher = torch.tensor([[math.log(2.0), math.log(2.0)]])  # softmax (1/2, 1/2)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert distribution_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # temperature 2: softmax of halved logits, times 4
    s2 = torch.softmax(student / 2, dim=1)[0]
    expected2 = -(0.5 * math.log(s2[0]) + 0.5 * math.log(s2[1])) * 4
    assert distribution_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected2, rel=1e-6)


def test_the_teacher_is_detached() -> None:
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    distribution_loss(student, teacher).sum().backward()
    assert student.grad is not None and teacher.grad is None


PER_SAMPLE = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 1.0]])  # (batch 3, teachers 2)


def test_hard_weights_favour_the_teacher_matched_worse() -> None:
    weights = teacher_weights(PER_SAMPLE, "sample", "hard")
    assert weights[0, 1] > weights[0, 0] and weights[2, 0] > weights[2, 1]
    assert weights[1].tolist() == [0.5, 0.5]
    assert weights[0, 1].item() == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3)))
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))


def test_easy_weights_favour_the_closer_teacher() -> None:
    weights = teacher_weights(PER_SAMPLE, "sample", "easy")
    assert weights[0, 0].item() == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-3)))
    assert torch.allclose(weights, teacher_weights(PER_SAMPLE, "sample", "hard").flip(1))


def test_uniform_weights() -> None:
    assert teacher_weights(PER_SAMPLE, "uniform", "hard").tolist() == [[0.5, 0.5]] * 3


def test_sample_mode_weights_each_samples_own_loss() -> None:
    weights = teacher_weights(PER_SAMPLE, "sample", "hard")
    expected = sum((weights[n] * PER_SAMPLE[n]).sum() for n in range(3)) / 3 / 2
    assert combine(PER_SAMPLE, weights, "sample").item() == pytest.approx(expected.item())


def _official_reduction(student: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    """The official train_assistant_group_amp.py computation, written out step by step.

    DistributionLoss(reduce=False because "instance" != "Instance") returns the batch
    mean; alpha is the per-sample softmax over the teachers' per-sample CE; the loss is
    mean over samples of (1/2) * sum_i alpha_ni * KD_i.
    """
    log_q = F.log_softmax(student, dim=1)
    per_sample = [-(F.softmax(t, dim=1) * log_q).sum(dim=1) for t in teachers]
    kd = [c.mean() for c in per_sample]  # batch means
    alpha = torch.softmax(torch.stack([c.detach() for c in per_sample], dim=1), dim=1)
    return torch.stack([alpha[:, i] * kd[i] for i in range(len(teachers))], dim=1).sum(dim=1).mean() / 2


def test_batch_mode_reproduces_the_official_reduction_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 10, generator=generator, requires_grad=True)
    teachers = [torch.randn(16, 10, generator=generator) * 3 for _ in range(2)]
    per_sample = torch.stack([distribution_loss(student, t) for t in teachers], dim=1)
    ours = combine(per_sample, teacher_weights(per_sample, "batch", "hard"), "batch")
    official = _official_reduction(student, teachers)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    (grad_ours,) = torch.autograd.grad(ours, student)
    (grad_official,) = torch.autograd.grad(official, student)
    assert torch.allclose(grad_ours, grad_official, rtol=1e-5, atol=1e-8)
    sample_mode = combine(per_sample, teacher_weights(per_sample, "sample", "hard"), "sample")
    assert sample_mode.item() != pytest.approx(official.item(), rel=1e-3)  # the modes really differ


def test_rounds_split_the_run_like_the_official_code() -> None:
    large = RoundSchedule("convnext_tiny", ["efficientnet_b0", "efficientnet_b4", "convnext_tiny"], epochs=512)
    assert [r.start_epoch for r in large.rounds] == [0, 171, 342]
    assert large.teachers(170) == ["efficientnet_b0", "convnext_tiny"]
    assert large.teachers(171) == ["efficientnet_b4", "convnext_tiny"]
    assert large.teachers(511) == ["convnext_tiny", "convnext_tiny"]
    middle = RoundSchedule("efficientnet_b4", ["efficientnet_b0", "efficientnet_b2"], epochs=512)
    assert middle.teachers(255)[0] == "efficientnet_b0" and middle.teachers(256)[0] == "efficientnet_b2"
    assert RoundSchedule("efficientnet_b2", ["efficientnet_b0"], epochs=512).teachers(400) == [
        "efficientnet_b0",
        "efficientnet_b2",
    ]
    assert RoundSchedule("efficientnet_b2").teachers(3) == ["efficientnet_b2"]
    explicit = RoundSchedule("m", ["a", "b"], epochs=10, starts=[0, 3])
    assert explicit.teachers(2) == ["a", "m"] and explicit.teachers(3) == ["b", "m"]
    assert explicit.all_teachers() == ["a", "b", "m"]
    with pytest.raises(ValueError, match="begin at 0"):
        RoundSchedule("m", ["a", "b"], epochs=10, starts=[1, 3])


class _Fixed(torch.nn.Module):
    """A stand-in teacher with fixed logits; counts its calls."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits


def test_distillation_loss_follows_the_rounds_and_records_weights() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = {name: torch.randn(4, 3, generator=generator) for name in ("a", "b", "m")}
    teachers = {name: _Fixed(value) for name, value in logits.items()}
    loss_fn = DistillationLoss(teachers, RoundSchedule("m", ["a", "b"], epochs=4), weighting="sample")
    student = torch.randn(4, 3, generator=generator)
    batch = Batch(torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]))
    for epoch, assistant in ((0, "a"), (1, "a"), (2, "b")):
        per_sample = torch.stack(
            [distribution_loss(student, logits[assistant]), distribution_loss(student, logits["m"])], 1
        )
        expected = combine(per_sample, teacher_weights(per_sample), "sample")
        assert loss_fn(student, batch, epoch).item() == pytest.approx(expected.item())
    assert teachers["b"].calls == 1 and teachers["m"].calls == 3
    stats = loss_fn.pop_epoch_stats()
    assert set(stats) == {"assistant:a", "assistant:b", "main:m"}
    assert loss_fn.pop_epoch_stats() == {}


def test_a_teacher_named_twice_runs_once_and_gets_equal_weights() -> None:
    teacher = _Fixed(torch.randn(4, 3))
    loss_fn = DistillationLoss({"c": teacher}, RoundSchedule("c", ["c"], epochs=1))
    loss_fn(torch.randn(4, 3), Batch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), 0)
    assert teacher.calls == 1
    assert loss_fn.pop_epoch_stats()["assistant:c"] == pytest.approx(0.5)


def test_label_term_is_added_with_its_weight() -> None:
    teacher = _Fixed(torch.zeros(2, 3))
    student = torch.randn(2, 3)
    batch = Batch(torch.zeros(2, 1), torch.tensor([2, 0]))
    plain = DistillationLoss({"t": teacher}, RoundSchedule("t"))(student, batch, 0)
    with_labels = DistillationLoss({"t": teacher}, RoundSchedule("t"), label_weight=0.5)(student, batch, 0)
    assert with_labels.item() == pytest.approx(plain.item() + 0.5 * F.cross_entropy(student, batch.targets).item())


def test_missing_teacher_and_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="no loaded teacher"):
        DistillationLoss({"m": _Fixed(torch.zeros(1, 2))}, RoundSchedule("m", ["a"], epochs=2))
    with pytest.raises(ValueError, match="weighting"):
        teacher_weights(PER_SAMPLE, "per-pixel")
    with pytest.raises(ValueError, match="sign"):
        teacher_weights(PER_SAMPLE, "sample", "medium")
