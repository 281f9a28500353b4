"""The step profile's groups add up to the profiled time and find the convolutions and the kernels."""

from __future__ import annotations

import pytest
import torch

import models
from benchmarks import step_profile


def test_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert step_profile.group_of("aten::convolution_backward", [8, 3, 16, 16], 8, set()) == "convolution"
    assert step_profile.group_of("aten::div", [16, 8, 3, 3], 8, {(16, 8, 3, 3)}) == "weight"
    assert step_profile.group_of("aten::mul", [8, 16, 4, 4], 8, set()) == "activation"
    assert step_profile.group_of("aten::add_", [], 8, set()) == "other"
    assert step_profile.group_of("## Call CompiledFxGraph fabc123 ##", [], 8, set()) == "compiled"


def _small_config(compile: bool = False) -> step_profile.argparse.Namespace:
    return step_profile.argparse.Namespace(
        model="bnext_tiny", width_mult=0.125, img_size=16, batch=4, warmup=1, steps=1, unfused=False, compile=compile
    )


def test_profile_of_a_small_model_names_the_work() -> None:
    args = _small_config()
    groups, ranked = step_profile.profile_step(args)
    assert groups["convolution"] > 0 and groups["activation"] > 0
    assert abs(sum(groups.values()) - sum(ms for ops in ranked.values() for _, ms in ops)) < 1e-6 * sum(groups.values())
    names = {name for name, _ in ranked["activation"]}
    assert "_BatchNormPReLU" in names or "aten::native_batch_norm" in names


def test_compile_flag_profiles_the_compiled_forward(monkeypatch) -> None:
    # The wiring only: compiling BNext-T's training step takes minutes on 2 cores
    # (benchmarks/RESULTS.md has a real run). The grouping of inductor's code is tested above.
    compiled: list[tuple[torch.nn.Module, dict]] = []

    def fake_compile(model, options=None):
        compiled.append((model, options))
        return model

    monkeypatch.setattr(step_profile.torch, "compile", fake_compile)
    groups, _ = step_profile.profile_step(_small_config(compile=True))
    assert len(compiled) == 1 and isinstance(compiled[0][0], torch.nn.Module)
    assert compiled[0][1] == models.compile_options("cpu")  # the kernels' NCHW layout is kept
    assert groups["convolution"] > 0


def test_tap_products_count_as_convolution() -> None:
    # BNext-T at 16 px ends on 2x2 planes, where the binary convolutions train by tap products.
    groups, ranked = step_profile.profile_step(_small_config())
    convolution = dict(ranked["convolution"])
    assert convolution.get("Eager_tap_conv2d", 0) > 0 and convolution.get("Eager_tap_conv2dBackward", 0) > 0
    assert any(name.startswith("tap conv: aten::") for name in convolution)  # their matrix products and copies
    assert not any(
        name.startswith("tap conv") for ops in ranked.values() for name, _ in ops if ops is not ranked["convolution"]
    )


class _Event:
    def __init__(self, name: str, parent: _Event | None = None) -> None:
        self.name, self.cpu_parent = name, parent


def test_inside_tap_conv_follows_the_parents() -> None:
    backward = _Event(
        "Eager_tap_conv2dBackward", _Event("autograd::engine::evaluate_function: Eager_tap_conv2dBackward")
    )
    assert step_profile.inside_tap_conv(_Event("aten::mm", _Event("aten::matmul", backward)))
    assert step_profile.inside_tap_conv(_Event("bnext::tap_conv2d_backward"))
    assert not step_profile.inside_tap_conv(_Event("aten::mm", _Event("Eager_batch_norm_prelu")))
