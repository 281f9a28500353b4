"""What survives what: kills, restarts, several nodes, bad files, NaNs, a full disk, bad configuration.

The faults land at known points through the ``BNEXT_TEST_FAULT`` hook (ImageNet/faults.py):
the process kills itself with SIGKILL, or stops itself with SIGSTOP so that the test can
act on the frozen process (a ``kill -9`` from outside, an unwritable output directory).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import REPO, common_args, free_port, make_image_folder, run_script, script_command, script_env

from ImageNet import checkpointing
from ImageNet.config import ConfigError, build_parser, load_yaml_defaults, parse_args
from ImageNet.engine import NonFiniteLossError
from ImageNet.training import _check_finite_weights, main
from models import fused_ops

# Deterministic runs: per-sample augmentation seeds, one thread per process (results depend on it).
EXACT = ["--deterministic", "--cpu-threads", "1"]
# Keys of the per-epoch history that measure time, not training.
TIMINGS = ("images_per_second", "data_time")


def _exact_args(data: Path, output: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [*common_args(data, output, epochs=epochs), *EXACT, *extra]


def _state(output: Path) -> dict:
    return torch.load(output / checkpointing.LAST, weights_only=True)


def _assert_same_training(actual: dict, expected: dict) -> None:
    """Bit-identical weights, optimizer state and metrics (timings aside)."""
    assert actual["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(actual["optimizer"]["state"][index][name], value), (index, name)
    assert actual["global_step"] == expected["global_step"]
    strip = [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in expected["history"]]
    assert [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in actual["history"]] == strip


_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """Kill what a test launched and left running (or stopped) when it failed half-way."""
    yield
    while _LAUNCHED:
        process = _LAUNCHED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def _launch(args: list[str], fault: str) -> subprocess.Popen:
    env = script_env({"BNEXT_TEST_FAULT": fault})
    command = script_command(args)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _LAUNCHED.append(process)
    return process


def _run_group(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run a torchrun command in its own session; on timeout kill the whole group, workers included.

    ``subprocess.run(timeout=...)`` kills only torchrun itself and would leave its
    training processes behind, holding memory and CPU for the rest of the suite.
    """
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... did not finish in {timeout} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _wait_until_stopped(process: subprocess.Popen) -> None:
    """Block until the child stops itself with SIGSTOP (the ``stop@`` fault); fail if it exits instead."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        process.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the run ended (status {status}) before its fault point: {process.stderr.read()[-3000:]}")


@pytest.fixture
def in_process():
    """For tests that call the training ``main()`` in this process: keep its global settings from leaking."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    log = logging.getLogger("bnext.train")
    for handler in list(log.handlers):  # the run's log file would stay open
        handler.close()
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def reference_run(image_folder: Path, tmp_path_factory) -> dict:
    """An uninterrupted deterministic single-process run of 2 epochs (4 steps each)."""
    output = tmp_path_factory.mktemp("reference")
    result = run_script(_exact_args(image_folder, output, "--checkpoint-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return _state(output)


# ---------------------------------------------------------------------------------------- kill -9


def test_kill_9_mid_epoch_then_the_same_command_ends_bit_identical(image_folder, reference_run, tmp_path) -> None:
    args = _exact_args(image_folder, tmp_path, "--checkpoint-steps", "3")
    run = _launch(args, "stop@step:7")  # frozen after global step 7: epoch 1, batch 3
    _wait_until_stopped(run)
    saved = _state(tmp_path)  # the mid-epoch checkpoint of step 6
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (1, 2, 6)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    run.stdout.close()
    run.stderr.close()

    resumed = run_script(args)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 1, batch 2" in resumed.stdout  # the right batch; step 7 is done again
    _assert_same_training(_state(tmp_path), reference_run)


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(image_folder, reference_run, tmp_path) -> None:
    # Loader workers, unlike the reference: with --deterministic each sample's augmentation is the same.
    args = _exact_args(image_folder, tmp_path, "--checkpoint-steps", "1", "--workers", "2")
    # killed inside the 3rd checkpoint write (step 3), after its temporary file is complete
    killed = run_script(args, env={"BNEXT_TEST_FAULT": "kill@save:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = list(tmp_path.glob(f"{checkpointing.TMP_PREFIX}*.tmp"))
    assert len(partial) == 1  # the write that was cut short
    previous = _state(tmp_path)  # loads: the file of step 2 is whole
    assert (previous["epoch"], previous["batch_in_epoch"], previous["global_step"]) == (0, 2, 2)

    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "partial write" in resumed.stdout and "at epoch 0, batch 2" in resumed.stdout
    assert not list(tmp_path.glob(f"{checkpointing.TMP_PREFIX}*.tmp"))
    _assert_same_training(_state(tmp_path), reference_run)  # nor do the saves or the workers change anything


# ------------------------------------------------------------------------ several processes and nodes


def _two_process_args(data: Path, output: Path, *extra: str) -> list[str]:
    return _exact_args(data, output, "--checkpoint-steps", "2", *extra, epochs=1)


@pytest.fixture(scope="module")
def one_node_two_processes(image_folder: Path, tmp_path_factory) -> dict:
    """An uninterrupted 2-process run (one node) of one epoch."""
    output = tmp_path_factory.mktemp("one_node")
    result = run_script(_two_process_args(image_folder, output), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return _state(output)


@pytest.mark.slow
def test_torchrun_restarts_the_group_when_one_process_is_killed(image_folder, one_node_two_processes, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "--max-restarts", "1", "ImageNet/train.py", *_two_process_args(image_folder, tmp_path)]
    # rank 1 dies with SIGKILL after step 3; the last checkpoint is that of step 2
    env = script_env({"BNEXT_TEST_FAULT": "kill@step:3", "BNEXT_TEST_FAULT_RANK": "1"})
    result = _run_group(command, env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sending kill to process" in result.stderr
    assert "at epoch 0, batch 2" in result.stdout  # the restarted group resumed
    _assert_same_training(_state(tmp_path), one_node_two_processes)


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_node_with_two_processes(image_folder, one_node_two_processes, tmp_path):
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)),
            *("ImageNet/train.py", *_two_process_args(image_folder, tmp_path)),  # one output: a shared disk
        ]
        nodes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=script_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:  # a hung rendezvous must not leave either node's processes behind
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    assert "2 process(es) on cpu" in outputs[0][0]
    _assert_same_training(_state(tmp_path), one_node_two_processes)


@pytest.mark.slow
def test_sync_bn_two_processes_train_like_one_process(image_folder, one_node_two_processes, tmp_path) -> None:
    # Both runs take the batch norms' and signs' unfused operators (SyncBatchNorm has no fused
    # kernel): the comparison is about the statistics, and a second rounding scheme on one side
    # only adds float32 noise that the binary network amplifies (measured 2.7e-4 instead of 4e-5).
    unfused = {fused_ops.BACKEND_ENV: "torch"}
    synced = run_script(_two_process_args(image_folder, tmp_path / "synced", "--sync-bn"), nproc=2, env=unfused)
    assert synced.returncode == 0, synced.stderr[-3000:]
    single = run_script(_two_process_args(image_folder, tmp_path / "single"), env=unfused)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = _state(tmp_path / "single")["model"]

    def distance(state: dict) -> float:
        return max((state["model"][k].double() - v.double()).abs().max().item() for k, v in expected.items())

    # The global batch is the same (interleaved shards, per-sample augmentation seeds). In float32
    # the binary network amplifies rounding noise: 1 process on 2 threads instead of 1 differs by
    # about 3e-5 after these 4 steps; the exact 1e-5 comparisons are in test_sync_batchnorm.py.
    # Without --sync-bn each process normalises by its own half: about 100 times further off.
    assert distance(_state(tmp_path / "synced")) < 2e-4
    assert distance(one_node_two_processes) > 20 * distance(_state(tmp_path / "synced"))


# ----------------------------------------------------------------------------------------- bad inputs


def test_bad_images_stop_the_run_naming_the_file_or_are_skipped_and_counted(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": 8, "val": 3})
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.JPEG")
    jpeg = (tmp_path / "whole.JPEG").read_bytes()
    # one bad file per class, so that no bad file replaces another (each is counted once)
    bad = {
        "cat/truncated.JPEG": jpeg[: len(jpeg) // 2],
        "dog/empty.png": b"",
        "emu/notes.JPEG": b"minutes of the meeting, not a picture\n",
    }
    for name, content in bad.items():
        (data / "train" / name).write_bytes(content)
    # 27 training files, global batch 9: every file is drawn once per epoch
    stopped = run_script(common_args(data, tmp_path / "stopped", epochs=1, batch=9))
    assert stopped.returncode == 2
    assert any(str(data / "train" / name) in stopped.stderr for name in bad), stopped.stderr[-3000:]
    assert "--skip-bad-images" in stopped.stderr

    skipped = run_script([*common_args(data, tmp_path / "skipped", epochs=1, batch=9), "--skip-bad-images"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "3 undecodable image(s)" in skipped.stdout
    assert _state(tmp_path / "skipped")["history"][0]["skipped_images"] == 3
    for name in bad:
        assert str(data / "train" / name) in skipped.stderr  # each one named once in the warnings


def test_a_checkpoint_that_would_execute_code_is_refused(
    image_folder, tmp_path, capsys, in_process, code_running_payload
) -> None:
    payload, marker = code_running_payload
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": payload}, evil)
    with pytest.raises(checkpointing.CheckpointReadError, match="execute code"):
        checkpointing.load(evil)
    # a run that finds such a last.pth to resume from stops with the message
    output = tmp_path / "run"
    output.mkdir()
    evil.rename(output / checkpointing.LAST)
    assert main(common_args(image_folder, output, epochs=1)) == 2
    assert "would need to execute code" in capsys.readouterr().err
    assert not marker.exists()


# ------------------------------------------------------------------------------------ non-finite loss


@pytest.mark.slow
def test_skip_nonfinite_skips_the_step_on_every_process_and_counts_it(image_folder: Path, tmp_path: Path) -> None:
    # the NaN appears on rank 0 only; both processes must skip step 2 together (or DDP would hang)
    args = [*common_args(image_folder, tmp_path, epochs=1), "--debug-nan-at-step", "2", "--skip-nonfinite"]
    result = run_script(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped step 2" in result.stdout
    state = _state(tmp_path)
    assert state["history"][0]["skipped_steps"] == 1 and state["skipped_steps"] == 1
    assert state["global_step"] == 4
    # AdamW counts its updates: 3 of the 4 steps updated the weights
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_weights_that_went_non_finite_are_never_saved() -> None:
    # a finite loss can give an infinite gradient; the next save refuses the weights it produced
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    _check_finite_weights(model, global_step=5)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="after global step 4 \\(0.weight\\)"):
        _check_finite_weights(model, global_step=5)


# ---------------------------------------------------------------------------------------- full disk


def test_an_unwritable_output_directory_stops_with_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    run = _launch(_exact_args(image_folder, tmp_path, "--checkpoint-steps", "3"), "stop@step:5")
    _wait_until_stopped(run)  # after step 5; last.pth is the end of epoch 0 (step 4)
    before = (tmp_path / checkpointing.LAST).read_bytes()
    try:
        # The disk "fills up": the directory becomes read-only (which stops any user but root) and,
        # for root too, the process may no longer write files larger than half a checkpoint.
        tmp_path.chmod(0o555)
        resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
        os.kill(run.pid, signal.SIGCONT)
        _, stderr = run.communicate(timeout=120)
    finally:
        tmp_path.chmod(0o755)
    assert run.returncode == 1, stderr[-3000:]
    assert "cannot write checkpoint" in stderr and "intact" in stderr and "Traceback" not in stderr
    assert (tmp_path / checkpointing.LAST).read_bytes() == before
    assert not list(tmp_path.glob(f"{checkpointing.TMP_PREFIX}*.tmp"))


# ------------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [("epochz: 3\n", "unknown key 'epochz'"), ("batch_size: lots\n", "config key 'batch_size'")],
)
def test_bad_yaml_stops_the_script_at_start_up(tmp_path, capsys, in_process, yaml_text, named) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit) as stop:
        main(["-c", str(config), "--output", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--teacher", "resnet10t", "--teacher-weights", "resnet10t=/nonexistent/t.pth"], "/nonexistent/t.pth"),
        (["--resume", "/nonexistent/last.pth"], "--resume /nonexistent/last.pth"),
        (["--initial-checkpoint", "/nonexistent/w.pth"], "--initial-checkpoint /nonexistent/w.pth"),
    ],
    ids=["teacher-weights", "resume", "initial-checkpoint"],
)
def test_missing_files_stop_the_run_at_start_up(image_folder, tmp_path, capsys, in_process, flags, named) -> None:
    assert main([*common_args(image_folder, tmp_path, epochs=1), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / checkpointing.LAST).exists()


def test_the_reliability_flags_work_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "deterministic: true\nskip_nonfinite: true\nskip-bad-images: true\nsync_bn: true\n"
        "checkpoint_steps: 50\ncheckpoint_minutes: 5\ncpu_threads: 2\n"
    )
    args = parse_args(["-c", str(config)])
    assert args.deterministic and args.skip_nonfinite and args.skip_bad_images and args.sync_bn
    assert (args.checkpoint_steps, args.checkpoint_minutes, args.cpu_threads) == (50, 5.0, 2)
    config.write_text("checkpoint_steps: -1\n")
    with pytest.raises(ConfigError, match="checkpoint_steps"):
        load_yaml_defaults(config, build_parser())
