"""The training step and the evaluation pass, in process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import models
from ImageNet.engine import NonFiniteLossError, Trainer, accuracy_counts, evaluate
from ImageNet.losses import Batch, ClassificationLoss
from ImageNet.optim import build_optimizer


def _trainer(**kwargs) -> Trainer:
    torch.manual_seed(0)
    model = models.create_model("bnext_tiny", num_classes=4, stem="cifar", stage_channels=[8, 16, 16])
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=1e-3, binary_weight_decay=1e-8)
    return Trainer(model=model, optimizer=optimizer, loss_fn=ClassificationLoss(), device=torch.device("cpu"), **kwargs)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1])


def test_step_updates_weights_and_applies_constraints() -> None:
    trainer = _trainer()
    conv = trainer.model.feature[1].Attention.binary_conv
    with torch.no_grad():
        conv.weight[0].fill_(1.49)
    before = conv.weight.detach().clone()
    trainer.optimizer.param_groups[0]["lr"] = 1.0  # a big step pushes latent weights past the clip
    trainer.step(*_batch(), epoch=0)
    assert not torch.equal(conv.weight, before)
    assert conv.weight.abs().max().item() <= 1.5
    assert trainer.global_step == 1


def test_bf16_autocast_reaches_the_student() -> None:
    trainer = _trainer(amp_dtype=torch.bfloat16)
    seen = []
    # The classifier follows autocast on every device (on the CPU the binary layers hand on float32:
    # models.fused_ops.autocast_allows_float32).
    trainer.model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.step(*_batch(), epoch=0)
    assert seen == [torch.bfloat16]
    assert trainer.model.fc.weight.dtype == torch.float32  # master weights stay float32


def test_non_finite_loss_raises_before_the_update() -> None:
    trainer = _trainer(nan_at_step=0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    with pytest.raises(NonFiniteLossError, match="global step 0"):
        trainer.step(*_batch(), epoch=3)
    after = trainer.model.state_dict()
    changed = [
        k for k, v in before.items() if not k.endswith(("running_mean", "running_var")) and not torch.equal(v, after[k])
    ]
    assert changed == []


def test_skip_nonfinite_skips_the_update_and_counts_it() -> None:
    trainer = _trainer(nan_at_step=1, skip_nonfinite=True)
    trainer.step(*_batch(), epoch=0)
    assert not trainer.skipped
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss, _ = trainer.step(*_batch(), epoch=0)
    assert trainer.skipped and trainer.skipped_steps == 1 and not loss.isfinite()
    assert trainer.global_step == 2  # the batch is consumed
    after = trainer.model.state_dict()
    # nothing changes, not even the batch-norm statistics that the forward pass updated
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert all(p.grad is None for p in trainer.model.parameters())  # gradients zeroed
    assert {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {1.0}
    trainer.step(*_batch(), epoch=0)
    assert not trainer.skipped and trainer.skipped_steps == 1


def test_soft_targets_and_label_smoothing() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    hard = Batch(torch.zeros(1), torch.tensor([0]))
    soft = Batch(torch.zeros(1), torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]]))  # what mixup makes
    log_p = torch.log_softmax(logits, dim=1)[0]
    assert ClassificationLoss()(logits, hard, 0).item() == pytest.approx(-log_p[0].item())
    smoothed = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    assert ClassificationLoss(0.1)(logits, hard, 0).item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert ClassificationLoss()(logits, soft, 0).item() == pytest.approx(smoothed.item(), rel=1e-6)


def test_accuracy_counts_and_evaluate_totals() -> None:
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0]])
    top1, top5 = accuracy_counts(logits, torch.tensor([0, 2, 0]))
    assert (top1.item(), top5.item()) == (1, 2)

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    loader = DataLoader(TensorDataset(logits, torch.tensor([0, 2, 0])), batch_size=2)
    result = evaluate(Fixed(), loader, torch.device("cpu"))
    assert result["count"] == 3
    assert result["top1"] == pytest.approx(100 / 3) and result["top5"] == pytest.approx(200 / 3)


def test_train_one_epoch_reports_whole_epoch_metrics() -> None:
    from ImageNet.engine import train_one_epoch

    trainer = _trainer()
    images, targets = _batch()
    loader = DataLoader(TensorDataset(images, targets), batch_size=3)
    steps = []
    stats = train_one_epoch(trainer, loader, epoch=0, on_step=steps.append)
    assert steps == [1, 2] and trainer.global_step == 2
    assert stats["images"] == 6
    assert 0 <= stats["top1"] <= stats["top5"] <= 100
    assert stats["loss"] > 0
