"""Teachers: local weight files in real torchrun runs, clear errors, renormalisation, and the ranking command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from run_helpers import CLASSES
from run_helpers import common_args as _common
from run_helpers import run_script as run_module
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ImageNet import teacher_ranking
from ImageNet.distillation import distribution_loss
from ImageNet.teacher_ranking import TeacherScore, predictive_entropy, rank, recalibrate_batch_norm, student_kd_loss
from ImageNet.teachers import Teacher

# timm's test_* architectures: real timm classifiers of a few hundred thousand parameters.
MAIN, ASSISTANT = "test_resnet", "test_efficientnet"


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    """Untrained 3-class timm teachers: MAIN as a torch state dict, ASSISTANT as safetensors."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    main_path, assistant_path = folder / "main.pth", folder / "assistant.safetensors"
    torch.save(timm.create_model(MAIN, num_classes=len(CLASSES)).state_dict(), main_path)
    # safetensors refuses tensors that share memory; timm models have none, but make each one its own.
    state = {
        k: v.contiguous().clone()
        for k, v in timm.create_model(ASSISTANT, num_classes=len(CLASSES)).state_dict().items()
    }
    save_file(state, str(assistant_path))
    return {MAIN: main_path, ASSISTANT: assistant_path}


def _history(output: Path) -> dict[str, float]:
    return torch.load(output / "last.pth", weights_only=True)["history"][-1]


# --------------------------------------------------------------------------- real training runs


@pytest.mark.slow
def test_two_process_run_distils_from_one_local_teacher(image_folder, teacher_files, tmp_path) -> None:
    result = run_module(
        [*_common(image_folder, tmp_path), "--teacher", MAIN, "--teacher-weights", f"{MAIN}={teacher_files[MAIN]}"],
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"distillation: main teacher {MAIN}, rounds none" in result.stdout
    assert "2 process(es) on cpu" in result.stdout
    last = _history(tmp_path)
    assert last["kd_weight_main_" + MAIN] == pytest.approx(1.0)
    assert not any(key.startswith("kd_weight_assistant") for key in last)
    assert math.isfinite(last["train_loss"]) and last["kd_round"] == 0.0


@pytest.mark.slow
def test_two_process_run_with_an_assistant_from_safetensors(image_folder, teacher_files, tmp_path) -> None:
    weights = [f"{name}={path}" for name, path in teacher_files.items()]
    result = run_module(
        [
            *_common(image_folder, tmp_path),
            *("--teacher", MAIN, "--assistant-teachers", ASSISTANT, "--teacher-weights", *weights),
        ],
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"distillation: main teacher {MAIN}, rounds [(0, '{ASSISTANT}')]" in result.stdout
    assert f"teachers ['{ASSISTANT}', '{MAIN}']" in result.stdout
    last = _history(tmp_path)
    main_weight, assistant_weight = last[f"kd_weight_main_{MAIN}"], last[f"kd_weight_assistant_{ASSISTANT}"]
    assert 0 < main_weight < 1 and 0 < assistant_weight < 1
    assert main_weight + assistant_weight == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([f"--teacher={MAIN}", "--teacher-weights", f"{MAIN}=/nonexistent/teacher.pth"], [MAIN, "/nonexistent"]),
        (["--teacher", "no_such_timm_net"], ["no_such_timm_net", "not a timm model name"]),
        ([f"--teacher={MAIN}", "--teacher-weights", f"{ASSISTANT}=FILE"], [ASSISTANT, "not teachers of this run"]),
        ([f"--teacher={ASSISTANT}", "--teacher-weights", f"{ASSISTANT}=OTHER"], [ASSISTANT, "cannot load"]),
    ],
    ids=["missing-file", "unknown-name", "weights-for-a-non-teacher", "weights-of-another-architecture"],
)
def test_teacher_errors_stop_the_run_with_exit_code_2(image_folder, teacher_files, tmp_path, flags, expected) -> None:
    # FILE is a real file; OTHER is a real file of the other architecture.
    flags = [
        flag.replace("=FILE", f"={teacher_files[ASSISTANT]}").replace("=OTHER", f"={teacher_files[MAIN]}")
        for flag in flags
    ]
    result = run_module([*_common(image_folder, tmp_path), *flags])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr
    assert not (tmp_path / "last.pth").exists()  # stopped before the first step


# --------------------------------------------------------------------------- the Teacher wrapper


class Recorder(nn.Module):
    """A tiny classifier that records its input, with a timm-style pretrained_cfg."""

    def __init__(self, mean=None, std=None) -> None:
        super().__init__()
        if mean is not None:
            self.pretrained_cfg = {"mean": mean, "std": std}
        self.fc = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return self.norm(self.fc(x.mean(dim=(2, 3))))


STUDENT_STATS = {"student_mean": IMAGENET_DEFAULT_MEAN, "student_std": IMAGENET_DEFAULT_STD}


def test_teacher_renormalises_the_students_batch_to_its_own_statistics() -> None:
    mean_t, std_t = (0.5, 0.4, 0.3), (0.25, 0.5, 0.2)
    model = Recorder(mean_t, std_t)
    teacher = Teacher("recorder", model, **STUDENT_STATS)
    images = torch.randn(2, 3, 5, 5)
    teacher(images)
    view = (1, 3, 1, 1)
    mean_s, std_s = torch.tensor(IMAGENET_DEFAULT_MEAN).view(view), torch.tensor(IMAGENET_DEFAULT_STD).view(view)
    expected = (images * std_s + mean_s - torch.tensor(mean_t).view(view)) / torch.tensor(std_t).view(view)
    torch.testing.assert_close(model.seen, expected)


@pytest.mark.parametrize("cfg", ["same", "absent"])
def test_teacher_with_the_students_statistics_gets_the_batch_untouched(cfg: str) -> None:
    model = Recorder(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if cfg == "same" else Recorder()
    teacher = Teacher("recorder", model, **STUDENT_STATS)
    images = torch.randn(2, 3, 5, 5)
    teacher(images)
    assert torch.equal(model.seen, images)


def test_teacher_logits_train_a_student_and_the_teacher_stays_frozen() -> None:
    teacher = Teacher("recorder", Recorder((0.5,) * 3, (0.5,) * 3), **STUDENT_STATS)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    both = nn.ModuleDict({"student": student, "teacher": teacher})
    both.train()  # what a training loop does to the modules it holds
    assert not teacher.training and not teacher.model.training and not teacher.model.norm.training
    images = torch.randn(6, 3, 5, 5)
    running_mean = teacher.model.norm.running_mean.clone()
    loss = distribution_loss(student(images), teacher(images)).mean()
    loss.backward()  # an inference-mode teacher output would raise here
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.model.norm.running_mean, running_mean)  # eval mode: statistics untouched


# --------------------------------------------------------------------------- the ranking command


def test_entropy_of_constant_logits_is_log_of_the_class_count() -> None:
    logits = torch.full((4, 7), 3.5)
    torch.testing.assert_close(predictive_entropy(logits), torch.full((4,), math.log(7)))
    two_of_three = torch.tensor([[0.0, 0.0, -math.inf], [50.0, -50.0, -50.0]])
    entropy = predictive_entropy(two_of_three)
    assert entropy[0].item() == pytest.approx(math.log(2)) and entropy[1].item() == pytest.approx(0.0, abs=1e-6)
    probs = torch.tensor([0.2, 0.3, 0.5])
    expected = -(probs * probs.log()).sum()
    assert predictive_entropy(probs.log()[None]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_rank_orders_by_student_loss_then_entropy() -> None:
    scores = [
        TeacherScore("c", 90.0, 0.5, 1.2),
        TeacherScore("nan", 90.0, 0.1, math.nan),
        TeacherScore("b", 80.0, 0.9, 1.0),
        TeacherScore("a", 70.0, 0.3, 1.0),
    ]
    assert [s.teacher for s in rank(scores)] == ["a", "b", "c", "nan"]


def test_student_kd_loss_is_reproducible_and_learns() -> None:
    import models

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=generator)
    targets = torch.randn(12, 3, generator=generator) * 4

    def measure(steps: int) -> float:
        torch.manual_seed(0)
        student = models.create_model("bnext_tiny", num_classes=3, stem="cifar", width_mult=0.125)
        return student_kd_loss(
            student, images, targets, held_out=4, steps=steps, batch_size=8, seed=0, device=torch.device("cpu")
        )

    first = measure(2)
    assert math.isfinite(first) and first > 0
    assert measure(2) == first  # same seed: same student, same batches, same value


def test_batch_norm_recalibration_gives_the_exact_statistics_of_the_images() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten())
    model[0].running_mean.fill_(5.0)  # stale statistics, as after a few steps with momentum 0.1
    images = torch.randn(10, 3, 4, 4) * 2 + 1
    recalibrate_batch_norm(model, images, batch_size=4, device=torch.device("cpu"))  # 10 rows: batches of 5 and 5
    torch.testing.assert_close(model[0].running_mean, images.mean(dim=(0, 2, 3)))
    batch_vars = [b.transpose(0, 1).flatten(1).var(dim=1) for b in (images[:5], images[5:])]  # unbiased, as BN
    torch.testing.assert_close(model[0].running_var, (batch_vars[0] + batch_vars[1]) / 2)
    assert model[0].momentum == 0.1 and int(model[0].num_batches_tracked) == 2


RANKING_FLAGS = ["--student-steps", "3", "--samples", "12", "--img-size", "32", "--stem", "cifar"]
RANKING_FLAGS += ["--width-mult", "0.125", "--batch-size", "8"]


def test_ranking_command_ranks_both_local_teachers(image_folder, teacher_files) -> None:
    weights = [f"{name}={path}" for name, path in teacher_files.items()]
    result = run_module(
        [
            *("--student", "bnext_tiny", "--teachers", f"{MAIN},{ASSISTANT}", "--data-dir", str(image_folder)),
            *("--teacher-weights", *weights, *RANKING_FLAGS),
        ],
        script="-m ImageNet.teacher_ranking",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "teacher", "top-1"]
    report = json.loads(lines[-1])
    assert report["student"] == "bnext_tiny"
    ranking = report["ranking"]
    assert sorted(entry["teacher"] for entry in ranking) == sorted([MAIN, ASSISTANT])
    for entry in ranking:
        assert set(entry) == {"teacher", "top1", "entropy", "student_kd_loss"}
        assert all(math.isfinite(entry[key]) for key in ("top1", "entropy", "student_kd_loss"))
        assert 0 <= entry["top1"] <= 100 and 0 <= entry["entropy"] <= math.log(len(CLASSES)) + 1e-6
    assert ranking[0]["student_kd_loss"] <= ranking[1]["student_kd_loss"]
    # The table lists the teachers in the JSON's order.
    assert [line.split()[1] for line in lines[1:3]] == [entry["teacher"] for entry in ranking]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--teachers", "no_such_timm_net"], ["no_such_timm_net", "not a timm model name"]),
        (["--teachers", MAIN, "--teacher-weights", f"{MAIN}=/nonexistent/t.pth"], [MAIN, "/nonexistent/t.pth"]),
        (["--teachers", MAIN, "--teacher-weights", f"{ASSISTANT}=/x.pth"], [ASSISTANT, "not among --teachers"]),
        (["--teachers", MAIN, "--data-dir", "/nonexistent/data"], ["/nonexistent/data", "does not exist"]),
    ],
    ids=["unknown-teacher", "missing-weights", "weights-for-a-non-teacher", "bad-data-dir"],
)
def test_ranking_errors_exit_2_with_a_message(image_folder, capsys, flags, expected) -> None:
    argv = ["--data-dir", str(image_folder), *RANKING_FLAGS, *flags]  # a later --data-dir wins
    assert teacher_ranking.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for text in expected:
        assert text in captured.err


def test_a_teacher_trained_here_keeps_the_students_normalization(tmp_path: Path) -> None:
    # timm's test_resnet has 0.5/0.5 statistics in its pretrained config; a checkpoint written by
    # ImageNet/train.py (it records "config") saw the student's ImageNet-normalized inputs instead.
    from ImageNet import checkpointing
    from ImageNet.teachers import Teacher, build_teacher_model

    source = timm.create_model("test_resnet", num_classes=3)
    checkpointing.save_atomic({"model": source.state_dict(), "config": {"model": "test_resnet"}}, tmp_path / "ours.pth")
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = Teacher(
        "t", build_teacher_model("test_resnet", 3, str(tmp_path / "ours.pth")), student_mean=mean, student_std=std
    )
    plain = Teacher(
        "t", build_teacher_model("test_resnet", 3, str(tmp_path / "plain.pth")), student_mean=mean, student_std=std
    )
    assert not ours.renormalize
    assert plain.renormalize


def test_rounds_switch_at_the_configured_epoch_across_a_resume(image_folder, teacher_files, tmp_path) -> None:
    # Round 0 (epoch 0): ASSISTANT next to MAIN; round 1 (from epoch 1): MAIN as its own assistant.
    # The run stops after epoch 0 and is resumed by the same command with one more epoch.
    kd = [
        *("--teacher", MAIN, "--assistant-teachers", ASSISTANT, MAIN, "--round-starts", "0", "1"),
        *("--teacher-weights", f"{MAIN}={teacher_files[MAIN]}", f"{ASSISTANT}={teacher_files[ASSISTANT]}"),
    ]
    first = run_module([*_common(image_folder, tmp_path, epochs=1), *kd])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_module([*_common(image_folder, tmp_path, epochs=2), *kd])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at epoch 1, batch 0" in second.stdout
    epoch0, epoch1 = torch.load(tmp_path / "last.pth", weights_only=True)["history"]
    assert epoch0["kd_round"] == 0 and f"kd_weight_assistant_{ASSISTANT}" in epoch0
    assert epoch1["kd_round"] == 1 and f"kd_weight_assistant_{MAIN}" in epoch1
    assert f"kd_weight_assistant_{ASSISTANT}" not in epoch1
    # the same teacher twice: equal weights
    assert epoch1[f"kd_weight_assistant_{MAIN}"] == pytest.approx(0.5)
    assert epoch1[f"kd_weight_main_{MAIN}"] == pytest.approx(0.5)
