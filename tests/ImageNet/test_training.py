"""The training script end to end: torchrun with 2 gloo processes, resume, recipe pieces and errors."""

from __future__ import annotations

import copy
import logging
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import common_args, make_image_folder, run_script

import models
from ImageNet import checkpointing, training
from ImageNet.config import ConfigError, build_parser, load_yaml_defaults, parse_args
from ImageNet.distributed import DistInfo
from ImageNet.optim import TemperatureSchedule, build_optimizer, conform_state_to_parameters, parameter_groups


def run_train(args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ImageNet/train.py as a user would (torchrun when nproc > 1)."""
    return run_script(args, nproc=nproc)


_common = common_args


@pytest.fixture(scope="module")
def two_process_run(image_folder: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("run2p")
    # --keep-freed-memory: the option runs in a real two-process run (its effect: test_host_memory.py).
    result = run_train([*_common(image_folder, output, epochs=1), "--keep-freed-memory"], nproc=2)
    return output, result


@pytest.mark.slow
def test_two_process_torchrun_epoch_writes_checkpoints_config_and_events(two_process_run) -> None:
    output, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    if platform.libc_ver()[0] == "glibc":
        assert "host memory: freed memory kept for reuse" in result.stdout
    for name in ("last.pth", "best.pth", "config.yaml", "log.txt"):
        assert (output / name).is_file(), name
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(output / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0
    # 24 training images, global batch 6 -> 4 steps, each process sees its own 3-image shard
    assert state["global_step"] == 4
    assert state["history"][0]["temperature"] == 1.0
    config = yaml.safe_load((output / "config.yaml").read_text())
    assert config["batch_size"] == 6 and config["model"] == "bnext_tiny"


@pytest.mark.slow
def test_tensorboard_events_hold_the_scalars(two_process_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/top1", "train/top5", "val/top1", "val/top5", "val/loss", "train/lr"}
    expected |= {"train/temperature"}
    assert expected <= tags
    assert "train/images_per_second" in tags and "train/data_time" in tags


def test_resume_continues_at_the_next_epoch_with_optimizer_state(image_folder: Path, tmp_path: Path) -> None:
    first = run_train(_common(image_folder, tmp_path, epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    after_one = torch.load(tmp_path / "last.pth", weights_only=True)
    second = run_train(_common(image_folder, tmp_path, epochs=2))  # the same command, one more epoch
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at epoch 1, batch 0" in second.stdout
    assert "epoch 1/2" not in second.stdout and "epoch 2/2" in second.stdout
    after_two = torch.load(tmp_path / "last.pth", weights_only=True)
    assert after_two["epoch"] == 2 and len(after_two["history"]) == 2
    # AdamW's per-parameter step counter carried over: 4 steps per epoch, 8 in all.
    steps = {float(s["step"]) for s in after_two["optimizer"]["state"].values()}
    assert steps == {8.0}
    assert after_two["history"][0] == after_one["history"][0]
    assert after_two["history"][1]["temperature"] == pytest.approx(0.9)
    # A finished run re-run with the same command does no more work.
    third = run_train(_common(image_folder, tmp_path, epochs=2))
    assert third.returncode == 0 and "already complete" in third.stdout


@pytest.mark.parametrize("saved_channels_last", [False, True], ids=["saved-plain", "saved-channels-last"])
def test_resumed_adamw_state_takes_its_parameters_layout(saved_channels_last: bool) -> None:
    """A checkpoint's moments in the other memory layout (``--channels-last`` switched on resume) are
    copied into the parameters' layout, so the fused AdamW pairs each weight with its own moments."""
    torch.manual_seed(0)
    saved = torch.channels_last if saved_channels_last else torch.contiguous_format
    resumed = torch.contiguous_format if saved_channels_last else torch.channels_last
    grads = [torch.randn(6, 5, 3, 3) for _ in range(3)]

    def steps(param, optimizer, layout, grads) -> None:
        for grad in grads:
            param.grad = grad.contiguous(memory_format=layout)
            optimizer.step()

    param = torch.nn.Parameter(torch.randn(6, 5, 3, 3).contiguous(memory_format=saved))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    steps(param, optimizer, saved, grads[:1])
    checkpoint = copy.deepcopy((param.detach(), optimizer.state_dict()))  # as torch.save keeps strides
    steps(param, optimizer, saved, grads[1:])

    resumed_param = torch.nn.Parameter(checkpoint[0].contiguous(memory_format=resumed))
    resumed_optimizer = torch.optim.AdamW([resumed_param], lr=0.1, fused=True)
    resumed_optimizer.load_state_dict(checkpoint[1])
    moments = resumed_optimizer.state[resumed_param]
    assert moments["exp_avg"].is_contiguous(memory_format=saved)  # load_state_dict kept the saved layout
    assert conform_state_to_parameters(resumed_optimizer) == 2  # exp_avg and exp_avg_sq
    assert conform_state_to_parameters(resumed_optimizer) == 0
    assert resumed_optimizer.state[resumed_param]["exp_avg"].is_contiguous(memory_format=resumed)
    steps(resumed_param, resumed_optimizer, resumed, grads[1:])
    # To float32 rounding: the fused kernel's vector loop and its scalar tail take other elements in
    # the other layout. Moments paired with the wrong weights would be off by about the learning rate.
    torch.testing.assert_close(resumed_param.detach(), param.detach(), rtol=1e-6, atol=1e-6)


def test_parameter_groups_follow_precision_tags() -> None:
    model = models.create_model("bnext_tiny", num_classes=3, stem="cifar", width_mult=0.25)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=1e-3, binary_weight_decay=1e-8)
    binary, real = optimizer.param_groups
    assert (binary["group"], binary["weight_decay"]) == ("binary", 1e-8)
    assert (real["group"], real["weight_decay"]) == ("real", 1e-3)
    latent = {id(p) for _, p in models.latent_binary_parameters(model)}
    assert {id(p) for p in binary["params"]} == latent
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in real["params"]} == trainable - latent
    # the stem conv and the SE convs are real-valued even though they are 4-D
    assert id(model.feature[0].conv1.weight) in {id(p) for p in real["params"]}
    groups = parameter_groups(model, 0.5, 0.25)
    assert [g["weight_decay"] for g in groups] == [0.25, 0.5]


def test_temperature_schedule_official_values() -> None:
    schedule = TemperatureSchedule()
    assert schedule(0) == 1.0
    assert schedule(1) == pytest.approx(0.9)
    assert schedule(10) == pytest.approx(0.9**10)
    assert schedule(152) >= 1e-7 > schedule(153)  # exact sign weights from epoch 153 on
    with pytest.raises(ValueError):
        TemperatureSchedule(start=1.0, decay=1.5)


def test_yaml_sets_defaults_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 7\nlr: 0.01\nelm_attention: false\nstage-channels: [8, 16]\nmodel: bnext18\n")
    args = parse_args(["-c", str(config), "--lr", "0.5"])
    assert args.epochs == 7 and args.lr == 0.5 and args.elm_attention is False
    assert args.stage_channels == [8, 16] and args.model == "bnext18"
    args = parse_args(["-c", str(config), "--elm-attention"])
    assert args.elm_attention is True
    assert parse_args([]).epochs == 512


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown key 'epoch'.*did you mean epochs"),
        ("lr: fast\n", "config key 'lr'"),
        ("channels_last: 'yes'\n", "must be true or false"),
        ("amp: fp8\n", "must be one of"),
        ("stage_channels: 8\n", "must be a list"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml_defaults(config, build_parser())


@pytest.mark.parametrize(
    ("amp", "bf16_instructions", "warned"),
    [
        ("none", False, None),
        ("bf16", True, None),
        ("bf16", False, "without bf16 instructions"),
        ("fp16", True, "is slow"),
    ],
)
def test_mixed_precision_on_the_cpu_warns_where_it_costs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: str, bf16_instructions: bool, warned: str | None
) -> None:
    monkeypatch.setattr(training, "cpu_has_bf16_instructions", lambda: bf16_instructions)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    training.LOG.addHandler(handler)
    try:
        args = parse_args(["--data-dir", str(tmp_path), "--amp", amp])
        training._check_args(args, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    finally:
        training.LOG.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0], messages


def test_booleans_are_real_switches() -> None:
    args = parse_args(["--no-elm-attention", "--no-info-recoupling", "--channels-last"])
    assert args.elm_attention is False and args.info_recoupling is False and args.channels_last is True
    with pytest.raises(SystemExit):  # the official `type=bool` accepted "False" as True
        parse_args(["--elm-attention", "False"])


def _error_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


def test_errors_stop_before_training_with_a_fix(image_folder: Path, tmp_path: Path) -> None:
    missing = run_train(_common(tmp_path / "nowhere", tmp_path / "o1", epochs=1))
    assert "does not exist" in _error_of(missing)

    unknown = run_train([*_common(image_folder, tmp_path / "o2", epochs=1), "--model", "bnext_huge"])
    assert "unknown model 'bnext_huge': use one of bnext_tiny" in _error_of(unknown)

    odd = run_train(_common(image_folder, tmp_path / "o3", epochs=1, batch=5), nproc=2)
    assert "must be divisible by the 2 processes" in _error_of(odd)


def test_data_layout_errors(tmp_path: Path) -> None:
    empty_class = make_image_folder(tmp_path / "a", {"train": 2, "val": 1})
    for image in (empty_class / "train" / "dog").iterdir():
        image.unlink()
    assert "dog" in _error_of(run_train(_common(empty_class, tmp_path / "oa", epochs=1)))

    mismatch = make_image_folder(tmp_path / "b", {"train": 2, "val": 1})
    (mismatch / "val" / "emu").rename(mismatch / "val" / "owl")
    error = _error_of(run_train(_common(mismatch, tmp_path / "ob", epochs=1)))
    assert "emu" in error and "owl" in error

    broken = make_image_folder(tmp_path / "c", {"train": 2, "val": 1})
    (broken / "train" / "cat" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    error = _error_of(run_train(_common(broken, tmp_path / "oc", epochs=1, batch=7)))  # one batch: every file
    assert "bad.JPEG" in error


def test_checkpoint_of_another_architecture_or_class_count(image_folder: Path, tmp_path: Path) -> None:
    other = models.create_model("bnext_tiny", num_classes=10, stem="cifar", stage_channels=[8, 16, 16, 32])
    checkpointing.save_atomic({"model": other.state_dict()}, tmp_path / "ten_classes.pth")
    result = run_train(
        [*_common(image_folder, tmp_path / "o", epochs=1), "--initial-checkpoint", str(tmp_path / "ten_classes.pth")]
    )
    error = _error_of(result)
    assert "fc.weight: checkpoint (10, 32) vs model (3, 32)" in error


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    assert run_train(_common(image_folder, tmp_path, epochs=1)).returncode == 0
    good = (tmp_path / "last.pth").read_bytes()
    result = run_train([*_common(image_folder, tmp_path, epochs=2), "--debug-nan-at-step", "6"])
    error = _error_of(result)
    assert result.returncode == 1
    assert "global step 6" in error and "last good one" in error
    assert (tmp_path / "last.pth").read_bytes() == good


def run_validate(args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ImageNet/validate.py (torchrun when nproc > 1)."""
    return run_script(args, nproc=nproc, script="ImageNet/validate.py")


@pytest.mark.slow
def test_validate_reproduces_the_run_and_reduces_exactly_over_processes(two_process_run, image_folder) -> None:
    import json

    output, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    best = torch.load(output / "best.pth", weights_only=True)
    args = ["--checkpoint", str(output / "best.pth"), "--data-dir", str(image_folder), "--img-size", "32"]
    args += ["--workers", "0", "--batch-size", "4"]
    single = run_validate(args)
    assert single.returncode == 0, single.stderr[-3000:]
    single_result = json.loads(single.stdout.strip().splitlines()[-1])
    assert single_result["count"] == 9  # 3 classes x 3 val images: every image once
    assert single_result["top1"] == pytest.approx(best["history"][-1]["val_top1"])
    double = run_validate(args, nproc=2)  # 9 images over 2 processes: 5 + 4, no padding
    assert double.returncode == 0, double.stderr[-3000:]
    double_result = json.loads(double.stdout.strip().splitlines()[-1])
    assert double_result["count"] == 9
    assert double_result["top1"] == pytest.approx(single_result["top1"])
    assert double_result["top5"] == pytest.approx(single_result["top5"])


def test_mid_epoch_checkpoint_resumes_at_the_batch(image_folder: Path, tmp_path: Path) -> None:
    # --checkpoint-minutes 0 saves after every step; the NaN at global step 2 stops the run
    # after two good steps, whose checkpoint records batch 2 of epoch 0.
    stopped = run_train(
        [*_common(image_folder, tmp_path, epochs=1), "--checkpoint-minutes", "0", "--debug-nan-at-step", "2"]
    )
    assert stopped.returncode == 1
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, 2, 2)
    resumed = run_train(_common(image_folder, tmp_path, epochs=1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 0, batch 2" in resumed.stdout
    final = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (final["epoch"], final["batch_in_epoch"], final["global_step"]) == (1, 0, 4)


def test_amp_channels_last_and_ema_options_run(image_folder: Path, tmp_path: Path) -> None:
    result = run_train([*_common(image_folder, tmp_path, epochs=1), "--amp", "bf16", "--channels-last", "--model-ema"])
    assert result.returncode == 0, result.stderr[-3000:]
    # A CPU without bf16 instructions says why the run may be slow.
    assert ("--amp bf16 on a CPU without bf16 instructions" in result.stdout) != training.cpu_has_bf16_instructions()
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["ema"] is not None and "val_ema_top1" in state["history"][0]


@pytest.mark.slow
def test_compiled_training_runs_with_the_kernels_layout(image_folder: Path, tmp_path: Path) -> None:
    # Batch 3 divides the 9 validation images: no recompilation for a smaller last batch.
    result = run_train([*_common(image_folder, tmp_path, epochs=1, batch=3), "--compile"])
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    options = models.compile_options("cpu") or "(defaults)"  # without a C++ compiler, no kernels: no options
    assert f"torch.compile with inductor options {options}" in log
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert torch.isfinite(torch.tensor(state["history"][0]["train_loss"]))


@pytest.mark.slow
def test_compiled_training_runs_in_two_processes(image_folder: Path, tmp_path: Path) -> None:
    """torchrun with --compile: the trainer finds the network inside DistributedDataParallel around
    the compiled model (for the temperature schedule and the checkpoints)."""
    result = run_train([*_common(image_folder, tmp_path, epochs=1, batch=4), "--compile"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["model"] and not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])
    assert torch.isfinite(torch.tensor(state["history"][0]["train_loss"]))


def test_the_8_bit_variant_trains_and_validates_from_its_recorded_config(image_folder: Path, tmp_path: Path) -> None:
    import json

    result = run_train([*_common(image_folder, tmp_path, epochs=1), "--real-bits", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["config"]["real_bits"] == 8
    args = ["--checkpoint", str(tmp_path / "best.pth"), "--data-dir", str(image_folder), "--img-size", "32"]
    validated = run_validate([*args, "--workers", "0", "--batch-size", "4"])
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert json.loads(validated.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(
        best["history"][-1]["val_top1"]
    )


def test_real_bits_accepts_32_or_2_to_16(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--real-bits", "8"]).real_bits == 8 and parse_args([]).real_bits == 32
    with pytest.raises(SystemExit):
        parse_args(["--real-bits", "1"])
    assert "32 (float) or 2 to 16 bits" in capsys.readouterr().err
