"""benchmarks/gpu_check.sh: every command it runs parses, and it covers what the speed issue asks of a GPU.

A GPU is lent for minutes and rarely: a mistyped flag there costs a session's only run.
These tests read the script's Python commands and parse each with its program's parser.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import data_loading, synthetic_imagefolder, train_step
from ImageNet import config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"

#: The parser of every program the script runs (None: it takes no flags).
PARSERS: dict[str, Callable[[], argparse.ArgumentParser] | None] = {
    "benchmarks/cuda_sanity.py": None,
    "benchmarks/synthetic_imagefolder.py": synthetic_imagefolder.build_parser,
    "ImageNet/train.py": config.build_parser,
    "benchmarks/train_step.py": train_step.build_parser,
    "benchmarks/data_loading.py": data_loading.build_parser,
}


def python_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(program, arguments)`` of every ``"$python" program ...`` line, continuations joined and
    shell expansions (``"$data"``, ``"$(mktemp -d)/run"``) replaced by a plain path."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        match = re.search(r'"\$python" (\S+\.py)(.*)$', line)
        if match:
            arguments = re.sub(r'"\$\([^)]*\)([^"]*)"|"\$\w+"', "/tmp/expanded", match.group(2))
            commands.append((match.group(1), shlex.split(arguments)))
    return commands


def test_every_command_parses_with_its_programs_parser() -> None:
    commands = python_commands(SCRIPT.read_text())
    assert {program for program, _ in commands} == set(PARSERS)
    for program, arguments in commands:
        parser = PARSERS[program]
        if parser is None:
            assert arguments == [], f"{program} takes no flags: {arguments}"
            continue
        try:
            parser().parse_args(arguments)
        except SystemExit as error:  # argparse's way of refusing
            pytest.fail(f"{program} {' '.join(arguments)}: refused ({error})")


def test_it_times_both_models_at_224_in_the_modes_the_issue_asks_for() -> None:
    timed = set()
    for program, arguments in python_commands(SCRIPT.read_text()):
        if program == "benchmarks/train_step.py":
            args = train_step.build_parser().parse_args(arguments)
            if args.img_size == 224:
                timed |= {(args.model, mode) for mode in train_step.expand_modes(args.mode)}
    for model in ("bnext_tiny", "bnext_large"):
        assert {(model, "eager"), (model, "bf16"), (model, "bf16_compile_cl")} <= timed


def test_the_training_run_uses_one_gpu_with_bf16_on_a_synthetic_folder() -> None:
    commands = python_commands(SCRIPT.read_text())
    (train,) = [arguments for program, arguments in commands if program == "ImageNet/train.py"]
    args = config.build_parser().parse_args(train)
    assert args.amp == "bf16" and args.epochs >= 1
    assert any(program == "benchmarks/synthetic_imagefolder.py" for program, _ in commands)


def test_the_reader_finds_continued_and_expanded_commands() -> None:
    text = 'x\n"$python" a.py --one 1 \\\n    --two "$data" --three "$(mktemp -d)/run"\nbudget 9 "$python" b.py\n'
    assert python_commands(text) == [
        ("a.py", ["--one", "1", "--two", "/tmp/expanded", "--three", "/tmp/expanded"]),
        ("b.py", []),
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
