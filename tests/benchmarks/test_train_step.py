"""The training-step benchmark: conv-shape collection, the floor, the step, the timing loop and the CLI.

Behaviour only: no test here depends on how fast anything runs.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import models
from benchmarks import train_step
from models.bnext import block_layout

IMAGE = (2, 3, 16, 16)


def small_model(name: str = "bnext_tiny") -> nn.Module:
    torch.manual_seed(0)
    return models.create_model(name, num_classes=10, stem="cifar", width_mult=0.125)


class RecordCalls(TorchFunctionMode):
    """Every ``F.conv2d``/``F.linear`` call seen at the function level, independently of module hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d or func is F.linear:
            kind = "conv2d" if func is F.conv2d else "linear"
            self.calls.append((kind, tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def test_collect_finds_every_conv_of_bnext_tiny_with_its_shapes() -> None:
    model = small_model()
    shapes = train_step.collect_conv_shapes(model, torch.randn(IMAGE))

    # Independent count from the architecture: each processor (3x3 module, one or two
    # 1x1 FFNs per block) has one binary conv and two SE convs; plus the stem and fc.
    layout = block_layout(model.channels)
    processors = sum(1 + (2 if c_out != c_in else 1) for c_in, c_out, _, _ in layout)
    assert len(shapes) == 2 + 3 * processors
    assert sum(s.binary for s in shapes) == processors
    assert sum(s.kind == "linear" for s in shapes) == 1

    stem, fc = shapes[0], shapes[-1]
    assert (stem.kind, stem.input_shape, stem.weight_shape) == ("conv2d", IMAGE, (8, 3, 3, 3))
    assert not stem.input_requires_grad, "the image batch needs no gradient"
    assert all(s.input_requires_grad for s in shapes[1:])
    assert (fc.kind, fc.input_shape, fc.weight_shape, fc.bias) == ("linear", (2, 256), (10, 256), True)

    binary = {name: m for name, m in model.named_modules() if isinstance(m, models.BinaryConv2d)}
    for s in shapes:
        if s.binary:
            module = binary[s.name]
            assert s.weight_shape == tuple(module.weight.shape)
            assert s.stride == (module.stride, module.stride)
            assert s.padding == (module.padding, module.padding)
            assert not s.bias
    assert sorted(s.name for s in shapes if s.binary) == sorted(binary)
    assert sum(s.stride == (2, 2) for s in shapes if s.binary) == sum(stride == 2 for _, _, stride, _ in layout)


@pytest.mark.parametrize("name", ["bnext_tiny", "bnext18"])
def test_collect_matches_the_function_level_calls(name: str) -> None:
    model = small_model(name)
    x = torch.randn(IMAGE)
    shapes = train_step.collect_conv_shapes(model, x)
    recorder = RecordCalls()
    with recorder, torch.no_grad():
        model.eval()(x)
    assert [(s.kind, s.input_shape, s.weight_shape) for s in shapes] == recorder.calls
    weight_layers = sum(isinstance(m, train_step.FLOOR_MODULES) for m in model.modules())
    assert len(shapes) == weight_layers  # each layer is called once per forward in these networks

    # The recorded stride/padding/groups reproduce the recorded output shape.
    for s in shapes:
        x_meta = torch.empty(s.input_shape, device="meta")
        w_meta = torch.empty(s.weight_shape, device="meta")
        if s.kind == "linear":
            out = F.linear(x_meta, w_meta)
        else:
            out = F.conv2d(x_meta, w_meta, None, s.stride, s.padding, s.dilation, s.groups)
        assert tuple(out.shape) == s.output_shape, s.name


def test_collect_leaves_the_model_as_it_was() -> None:
    model = small_model().train()
    stats = {name: buf.clone() for name, buf in model.named_buffers()}
    train_step.collect_conv_shapes(model, torch.randn(IMAGE))
    assert model.training
    for name, buf in model.named_buffers():
        assert torch.equal(buf, stats[name]), name
    assert not any(module._forward_hooks for module in model.modules())


def test_collect_refuses_layers_the_floor_does_not_cover() -> None:
    with pytest.raises(NotImplementedError, match="Conv1d"):
        train_step.collect_conv_shapes(nn.Sequential(nn.Conv1d(3, 4, 3)), torch.randn(1, 3, 8))


@pytest.mark.parametrize(
    ("dtype", "channels_last"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
    ids=["fp32", "fp32-channels_last", "bf16"],
)
def test_floor_gives_gradients_of_the_recorded_shapes(dtype: torch.dtype, channels_last: bool) -> None:
    shapes = train_step.collect_conv_shapes(small_model(), torch.randn(IMAGE))
    floor = train_step.make_floor(shapes, "cpu", dtype, channels_last)
    assert len(floor) == len(shapes)
    for index, s in enumerate(shapes):
        grads = floor.run_one(index)
        expected = (s.input_shape, s.weight_shape) if s.input_requires_grad else (s.weight_shape,)
        assert tuple(tuple(g.shape) for g in grads) == expected, s.name
        assert all(g.dtype == floor.step_dtype(s) and torch.isfinite(g.float()).all() for g in grads)
    assert floor() is None
    assert floor.resident_bytes() > 0


def _spy_on_tap_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes of the tap products' calls from now on, in order."""
    from models import tap_conv

    calls: list[tuple[int, ...]] = []
    original = tap_conv.conv2d

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return original(x, *args)

    monkeypatch.setattr(tap_conv, "conv2d", spy)
    return calls


def test_the_floor_of_a_cpu_autocast_step_keeps_float32_where_the_step_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16: float32 tensors for the calls that the step's tap products take (which the floor runs
    by them too) and for the gates' 1x1 products, bf16 for the other calls; compiled or channels-last,
    bf16 for all."""
    model, image = small_model(), torch.randn(IMAGE)
    shapes = train_step.collect_conv_shapes(model, image)
    taken = _spy_on_tap_calls(monkeypatch)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(image)  # a training forward (gradients recorded): the step's choice of tap products
    step_taps, taken[:] = list(taken), []
    floor = train_step.make_floor(shapes, "cpu", torch.bfloat16)
    float32_binary = [s.input_shape for s in shapes if s.binary and floor.step_dtype(s) == torch.float32]
    assert step_taps and float32_binary == step_taps
    for s in shapes:
        gate = not s.binary and s.kind == "conv2d" and s.input_shape[-2:] == (1, 1)
        if not s.binary:
            assert floor.step_dtype(s) == (torch.float32 if gate else torch.bfloat16), s.name
    floor()
    assert taken == step_taps  # the floor runs those calls as tap products too
    for compiled, channels_last in ((True, False), (False, True)):
        other = train_step.make_floor(shapes, "cpu", torch.bfloat16, channels_last, compiled=compiled)
        assert all(other.step_dtype(s) == torch.bfloat16 for s in shapes)


def test_floor_runs_the_binary_convolutions_as_the_training_step_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small planes: tap products in the step, so in the floor too (and neither inside fused_ops.disabled())."""
    from models import fused_ops, tap_conv

    shapes = train_step.collect_conv_shapes(small_model(), torch.randn(IMAGE))
    floor = train_step.make_floor(shapes, "cpu")
    taken = [
        s
        for s in shapes
        if s.binary
        and tap_conv.applies(torch.empty(s.input_shape), torch.empty(s.weight_shape), *s.stride[:1], *s.padding[:1], 1)
    ]
    assert taken and len(taken) < sum(s.binary for s in shapes)  # 16 px: the last stages' planes only
    calls = _spy_on_tap_calls(monkeypatch)
    floor()
    assert calls == [s.input_shape for s in taken]
    with fused_ops.disabled():
        floor()
    assert len(calls) == len(taken)


def test_floor_hands_the_taps_their_weights_in_the_layout_the_step_binarizes_into(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models import fused_ops, tap_conv

    binarized_tap_major = fused_ops.backend() == "cpp"  # without the C++ kernels the step binarizes plainly
    shapes = train_step.collect_conv_shapes(small_model(), torch.randn(IMAGE))
    layouts: list[tuple[int, bool]] = []  # (kernel, tap-major) per tap call
    original = tap_conv.conv2d

    def spy(x, weight, *args):
        layouts.append((weight.shape[-1], tap_conv.is_tap_major(weight)))
        return original(x, weight, *args)

    monkeypatch.setattr(tap_conv, "conv2d", spy)
    train_step.make_floor(shapes, "cpu")()
    assert (3, binarized_tap_major) in layouts
    assert all(tap_major == binarized_tap_major for kernel, tap_major in layouts if kernel > 1)


def test_step_updates_the_model_and_applies_the_constraints() -> None:
    model = small_model()
    images, targets = torch.randn(IMAGE), torch.tensor([1, 7])
    # A huge learning rate pushes latent weights far past ±1.5 in one Adam step, so
    # the bound below holds only because the step applies the constraints.
    optimizer = torch.optim.AdamW(train_step.trainable_parameters(model), lr=5.0)
    step = train_step.make_step(model, (images, targets), optimizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step()

    latent = dict(models.latent_binary_parameters(model))
    assert latent
    for name, p in latent.items():
        assert not torch.equal(p, before[name]), name
        assert p.abs().max().item() <= 1.5
    assert max(p.abs().max().item() for p in latent.values()) == pytest.approx(1.5)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            assert 0.0 <= p.min().item() and p.max().item() <= 1.0, name
        if not p.requires_grad:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert model.training


def test_step_under_bf16_autocast_keeps_fp32_parameters() -> None:
    model = small_model()
    step = train_step.make_step(model, (torch.randn(IMAGE), torch.tensor([0, 3])), amp_dtype=torch.bfloat16)
    step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_measure_alternates_and_takes_medians() -> None:
    log: list[str] = []
    result = train_step.measure(lambda: log.append("step"), lambda: log.append("floor"), warmup=2, iters=3)
    assert log == ["step", "floor"] * 5
    assert len(result["step_ms"]) == len(result["floor_ms"]) == 3
    assert result["step_ms_median"] == statistics.median(result["step_ms"])
    assert result["floor_ms_median"] == statistics.median(result["floor_ms"])
    assert result["ratio"] == pytest.approx(result["step_ms_median"] / result["floor_ms_median"])
    low, high = result["pair_ratio_quartiles"]
    pair_ratios = sorted(step / floor for step, floor in zip(result["step_ms"], result["floor_ms"], strict=True))
    assert pair_ratios[0] <= low <= pair_ratios[1] <= high <= pair_ratios[2]
    assert result["step_peak_bytes"] is None
    with pytest.raises(ValueError, match="iters"):
        train_step.measure(lambda: None, lambda: None, warmup=0, iters=0)


def test_interleaved_runs_alternate_their_order_round_by_round() -> None:
    log: list[str] = []

    def run(name: str):
        @contextlib.contextmanager
        def context():
            log.append(f"enter {name}")
            yield
            log.append(f"exit {name}")

        return (lambda: log.append(f"step {name}"), lambda: log.append(f"floor {name}"), context)

    round_trips = iter([60.0, 300.0, 70.0])
    results = train_step.measure_interleaved([run("a"), run("b")], warmup=1, iters=3, probe=lambda: next(round_trips))
    pair = ["enter {0}", "step {0}", "floor {0}", "exit {0}"]
    a, b = ([entry.format(name) for entry in pair] for name in "ab")
    # The warm-up in order, then rounds in order, reversed, in order: each pair in its own context.
    assert log == a + b + a + b + b + a + a + b
    for result in results:
        assert len(result["step_ms"]) == len(result["floor_ms"]) == 3
        assert result["step_ms_median"] == statistics.median(result["step_ms"])
        assert result["round_trip_ns"] == [60.0, 300.0, 70.0]  # one probe per round, for every run
    with pytest.raises(ValueError, match="at least one run"):
        train_step.measure_interleaved([], warmup=0, iters=1)
    with pytest.raises(ValueError, match="iters"):
        train_step.measure_interleaved([run("a")], warmup=0, iters=0)


def test_interleaved_lines_compare_each_mode_with_the_first_round_by_round() -> None:
    eager = {"mode": "eager", "step_ms": [100.0, 200.0, 100.0, 200.0], "round_trip_ns": [60, 300, 70, 310]}
    compiled = {"mode": "compile", "step_ms": [50.0, 300.0, 75.0, 250.0], "round_trip_ns": [60, 300, 70, 310]}
    lines = train_step.interleaved_lines([eager, compiled])
    # Per round 0.5, 1.5, 0.75 and 1.25: the median of the ratios (1.0), not the ratio of the medians (162.5 / 150).
    assert lines[0] == "interleaved: compile step / eager step per round: 1.000, quartiles 0.688 to 1.312, 4 rounds"
    assert lines[1] == "  threads' round trip 60 to 70 ns: 0.625, quartiles 0.562 to 0.688, 2 rounds"
    assert lines[2] == "  threads' round trip 300 to 310 ns: 1.375, quartiles 1.312 to 1.438, 2 rounds"
    assert train_step.interleaved_lines([eager]) == []


def test_main_interleaves_the_modes_and_needs_two(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--device", "cpu", "--iters", "2", "--warmup", "0", "--batch", "2", "--img-size", "16"]
    argv += ["--width-mult", "0.125", "--interleave"]
    assert train_step.main([*argv, "--mode", "eager", "--mode", "eager_unfused"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("eager ") for line in printed)
    assert any(line.startswith("eager_unfused ") for line in printed)
    assert any(line.startswith("interleaved: eager_unfused step / eager step per round: ") for line in printed)
    with pytest.raises(SystemExit) as refused:  # fp16 needs CUDA: one runnable mode left
        train_step.main([*argv, "--mode", "eager", "--mode", "fp16"])
    assert refused.value.code == 2
    assert "--interleave needs two runnable modes" in capsys.readouterr().err


def _write_a_fresh_mapping() -> None:
    # 64 MiB in an anonymous mapping of its own, unmapped when it goes: every page faults in
    # every call. (A tensor of that size could come from free memory that earlier tests
    # left at the top of malloc's heap, and then fault not at all.)
    mapping = mmap.mmap(-1, 2**26)
    torch.frombuffer(mapping, dtype=torch.uint8).fill_(1)


def test_page_faults_are_counted_per_call_of_the_step_and_the_floor() -> None:
    result = train_step.measure(_write_a_fresh_mapping, lambda: None, warmup=1, iters=3)
    if train_step.minor_page_faults() is None:
        pytest.skip("getrusage is not available on this platform")
    assert result["step_page_faults_median"] >= 2**26 // 2**21  # at least its pages, even if they are 2 MiB
    assert result["floor_page_faults_median"] < result["step_page_faults_median"]


def test_pair_ratio_quartiles_show_the_noise_of_side_by_side_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    # Step and floor times per pair (ms): the pairs' ratios are 1.0, 1.2, 1.4, 1.6 and 3.0.
    clock = iter(t / 1e3 for t in (0, 10, 10, 20, 0, 12, 0, 10, 0, 14, 0, 10, 0, 16, 0, 10, 0, 30, 0, 10))
    monkeypatch.setattr(train_step.time, "perf_counter", lambda: next(clock))
    result = train_step.measure(lambda: None, lambda: None, warmup=0, iters=5)
    assert result["step_ms"] == pytest.approx([10, 12, 14, 16, 30])
    assert result["pair_ratio_quartiles"] == pytest.approx((1.2, 1.6))
    assert result["ratio"] == pytest.approx(1.4)
    row = {**result, "mode": "eager", "images_per_second": 1.0, "peak_mem_mb": None}
    row.update(step_page_faults_median=9217, floor_page_faults_median=0)
    last_line = train_step.format_table([row]).splitlines()[-1]
    assert "1.20-1.60" in last_line and last_line.endswith("9217/0")


def test_modes_expand_and_unsupported_ones_say_why() -> None:
    assert train_step.expand_modes(None) == ["eager"]
    assert train_step.expand_modes(["all"]) == list(train_step.MODES)
    assert train_step.expand_modes(["bf16", "eager", "bf16"]) == ["bf16", "eager"]
    with pytest.raises(ValueError, match="unknown mode"):
        train_step.expand_modes(["int8"])
    cpu = torch.device("cpu")
    assert train_step.unsupported_reason(train_step.MODES["eager"], cpu) is None
    assert "CUDA" in train_step.unsupported_reason(train_step.MODES["fp16"], cpu)


def test_cpu_autocast_modes_note_what_stays_float32_and_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import fused_ops

    cpu = torch.device("cpu")
    assert any("stay float32" in note for note in train_step.mode_notes(train_step.MODES["bf16"], cpu))
    assert not any("stay float32" in note for note in train_step.mode_notes(train_step.MODES["eager"], cpu))
    for native in (True, False):
        monkeypatch.setattr(fused_ops, "cpu_has_bf16_instructions", lambda native=native: native)
        notes = train_step.mode_notes(train_step.MODES["bf16"], cpu)
        assert any("bf16 is emulated" in note for note in notes) is not native


def test_main_writes_json_and_reports_skipped_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    argv = ["--device", "cpu", "--iters", "1", "--warmup", "1", "--batch", "2", "--img-size", "16"]
    argv += ["--width-mult", "0.125", "--mode", "eager", "--mode", "fp16", "--json", str(out)]
    assert train_step.main(argv) == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("machine: CPU ")
    assert printed[1] == "host memory: malloc's defaults (no --keep-freed-memory)"
    assert any(line.startswith("eager ") for line in printed)
    assert any(line.startswith("skipped fp16: ") for line in printed)

    data = json.loads(out.read_text())
    assert set(data) == {"machine", "config", "results", "skipped", "failed"}
    assert data["machine"]["host_memory"] == printed[1] and data["config"]["keep_freed_memory"] is False
    assert data["failed"] == []
    assert [entry["mode"] for entry in data["skipped"]] == ["fp16"]
    (result,) = data["results"]
    expected_keys = {"mode", "step_ms_median", "floor_ms_median", "ratio", "images_per_second", "peak_mem_mb"}
    assert expected_keys <= set(result)
    assert result["mode"] == "eager"
    assert result["ratio"] > 0 and result["images_per_second"] > 0 and result["peak_mem_mb"] > 0
    assert len(result["step_ms"]) == len(result["floor_ms"]) == 1
    # The CLI built the same network as small_model() (cifar stem, 10 classes by default).
    assert result["conv_calls"] == len(train_step.collect_conv_shapes(small_model(), torch.randn(IMAGE)))


def test_eager_unfused_mode_runs_the_modules_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The side-by-side mode really turns the fused kernels off, and only while it is measured."""
    from models import fused_ops

    seen: list[bool] = []
    real_measure = train_step.measure

    def spy(step, *args, **kwargs):
        seen.append(fused_ops._enabled)
        return real_measure(step, *args, **kwargs)

    monkeypatch.setattr(train_step, "measure", spy)
    argv = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--batch", "2", "--img-size", "16"]
    assert train_step.main([*argv, "--width-mult", "0.125", "--mode", "eager", "--mode", "eager_unfused"]) == 0
    assert seen == [True, False]
    assert fused_ops._enabled


def test_the_floor_gives_binary_convolutions_signs_as_the_step_does() -> None:
    model = small_model()
    shapes = train_step.collect_conv_shapes(model, torch.randn(IMAGE))
    assert not train_step.binary_weights_are_signs(model)
    models.set_temperature(model, 1e-8)  # below the binary layers' sign threshold
    assert train_step.binary_weights_are_signs(model)
    for sign_weights in (False, True):
        floor = train_step.make_floor(shapes, "cpu", sign_weights=sign_weights)
        for shape, (x, weight, _, _) in zip(floor.shapes, floor._tensors, strict=True):
            ternary = {-1.0, 1.0}
            assert (set(x.unique().tolist()) <= ternary) == shape.binary
            assert (set(weight.unique().tolist()) <= ternary) == (shape.binary and sign_weights)


def test_a_step_returns_its_loss() -> None:
    model = small_model()
    step = train_step.make_step(model, (torch.randn(IMAGE), torch.tensor([0, 3])))
    loss = step()
    assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss)


def test_the_torch_adamw_mode_steps_with_torchs_optimizer_and_the_eager_one_with_the_layers(monkeypatch) -> None:
    built: list[str] = []
    real = train_step.make_step

    def spy(model, batch, optimizer=None, **kwargs):
        built.append(type(optimizer).__name__)
        return real(model, batch, optimizer, **kwargs)

    monkeypatch.setattr(train_step, "make_step", spy)
    args = train_step.build_parser().parse_args(["--width-mult", "0.125", "--img-size", "16", "--batch", "2"])
    cpu = torch.device("cpu")
    for name in ("eager", "eager_torch_adamw"):
        train_step.prepare_mode(train_step.MODES[name], args, cpu)
    assert built == ["LayerConstrainedAdamW", "AdamW"]
    assert "CPU-only" in train_step.unsupported_reason(train_step.MODES["eager_torch_adamw"], torch.device("cuda"))
