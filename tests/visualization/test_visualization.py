"""Tests of the analysis figures: loss landscape, training curves, binary feature maps, accuracy vs OPs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import models
from ImageNet import checkpointing
from models.summary import summarize_by_name
from visualization import binary_features, loss_landscape, sota, training_curves
from visualization.loss_landscape import (
    Landscape,
    direction_parameter_names,
    evaluate_grid,
    filter_normalized_direction,
    scan,
)

NUM_CLASSES = 3
TINY = ["--stem", "cifar", "--stage-channels", "8", "16"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these models are tiny, and on a busy 2-core machine
    the intra-op thread synchronisation made a forward ~50x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**kwargs: Any) -> nn.Module:
    """A one-block BNext-T with every kind of parameter (binary convs, SE, BN, PReLU, thresholds, mixes)."""
    torch.manual_seed(0)
    return models.create_model("bnext_tiny", num_classes=NUM_CLASSES, stem="cifar", stage_channels=[8, 16], **kwargs)


@pytest.fixture
def model() -> nn.Module:
    net = tiny_model()
    # Move the BN statistics and the latent weights away from their initial values,
    # so that a test cannot pass because everything is still at its default.
    with torch.no_grad():
        for _, param in models.latent_binary_parameters(net):
            param.normal_(0.0, 0.5)
        net.train()
        net(torch.randn(8, 3, 12, 12))
    models.set_temperature(net, 0.3)
    return net.eval()


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 3, 12, 12, generator=generator), torch.randint(0, NUM_CLASSES, (5,), generator=generator))
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class ImageNet-layout folder of tiny random PNGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 4)):
        for label in range(NUM_CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# Loss landscape


def test_centre_of_the_grid_is_the_model_loss(model: nn.Module, batches: list) -> None:
    images = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    with torch.no_grad():
        expected = F.cross_entropy(model(images), targets).item()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    directions = [filter_normalized_direction(model, generator) for _ in range(2)]

    losses = evaluate_grid(model, directions, [-0.5, 0.0, 0.5], [-0.5, 0.0, 0.5], batches)
    line = evaluate_grid(model, directions[:1], [-0.5, 0.0, 0.5], None, batches)

    assert losses.shape == (3, 3) and line.shape == (3,)
    assert losses[1, 1] == pytest.approx(expected, rel=1e-5)
    assert line[1] == pytest.approx(expected, rel=1e-5)
    assert not np.allclose(losses, expected), "moving off the centre must change the loss"
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not restored"
    assert scan(model, batches, label="m", grid=3).centre_loss == pytest.approx(expected, rel=1e-5)


def test_filter_normalization_and_zero_directions(model: nn.Module) -> None:
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    params = dict(model.named_parameters())
    filtered = direction_parameter_names(model)
    assert direction.keys() == params.keys()
    for name, param in params.items():
        d = direction[name]
        assert d.shape == param.shape
        if name in filtered:
            weight_norms = param.detach().reshape(param.shape[0], -1).norm(dim=1)
            direction_norms = d.reshape(d.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(direction_norms, weight_norms, rtol=1e-5, atol=1e-7)
            assert d.abs().sum() > 0
        else:
            assert not d.any(), f"{name} {tuple(param.shape)} should not be perturbed"
    one_d = [name for name, p in params.items() if p.dim() == 1]
    assert one_d and not filtered & set(one_d)
    # The (1, C, 1, 1) thresholds and mixes are per-channel vectors, not filters.
    assert {"feature.1.Attention.move.bias", "feature.1.Attention.scale"}.isdisjoint(filtered)
    assert {"feature.0.conv1.weight", "fc.weight", "feature.1.Attention.se.se.1.weight"} <= filtered
    # Another draw from the same seed gives the same direction; another seed does not.
    again = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    other = filter_normalized_direction(model, torch.Generator().manual_seed(4))
    assert all(torch.equal(direction[n], again[n]) for n in params)
    assert not torch.equal(direction["fc.weight"], other["fc.weight"])


def test_latent_binary_weights_are_perturbed(model: nn.Module, batches: list) -> None:
    latent = dict(models.latent_binary_parameters(model))
    assert latent and set(latent) <= direction_parameter_names(model)
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    conv = model.feature[1].Attention.binary_conv
    name = "feature.1.Attention.binary_conv.weight"
    assert latent[name] is conv.weight
    original = conv.weight.detach().clone()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple) -> None:
        seen.append((module.weight.detach().clone(), module.binary_weight().detach().clone()))

    handle = conv.register_forward_pre_hook(record)
    try:
        evaluate_grid(model, [direction], [0.7], None, batches[:1])
    finally:
        handle.remove()
    latent_seen, binarized_seen = seen[0]
    torch.testing.assert_close(latent_seen, original + 0.7 * direction[name])
    # The forward binarizes the perturbed latent weights at the model's temperature (0.3).
    torch.testing.assert_close(binarized_seen, (latent_seen / 0.3).clamp(-1, 1))
    assert torch.equal(conv.weight, original)


def test_scan_fixes_and_restores_the_temperature(model: nn.Module, batches: list) -> None:
    seen: list[float] = []
    conv = model.feature[1].FFN_1.binary_conv
    handle = conv.register_forward_pre_hook(lambda module, args: seen.append(module.temperature.item()))
    try:
        result = scan(model, batches[:1], label="m", dim=1, grid=3, temperature=1e-9)
    finally:
        handle.remove()
    assert seen and all(t == pytest.approx(1e-9) for t in seen)
    assert result.settings["temperature"] == pytest.approx(1e-9)
    assert models.get_temperature(model) == pytest.approx(0.3)


def test_recompute_bn_reestimates_and_restores(model: nn.Module, batches: list) -> None:
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    loss = evaluate_grid(model, [direction], [0.0], None, batches, recompute_bn=True)[0]
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"buffer {name} was not restored"
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    reference = tiny_model()
    reference.load_state_dict(model.state_dict())
    loss_landscape.recompute_batch_norm(reference, batches)
    assert loss == pytest.approx(loss_landscape.mean_loss(reference, batches), rel=1e-5)
    assert loss != pytest.approx(loss_landscape.mean_loss(model, batches), rel=1e-3)
    assert all(m.momentum == momenta[m] for m in momenta)


def test_landscape_cli_writes_npz_and_figures(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ll"
    common = ["--data-dir", str(image_folder), "--img-size", "16", "--crop-pct", "1.0", "--out", str(out)]
    args = ["--model", "bnext_tiny", *TINY, *common, "--grid", "3", "--batches", "2", "--batch-size", "4"]
    assert loss_landscape.main([*args, "--no-progress"]) == 0
    for name in ("contour_bnext_tiny.png", "surface_bnext_tiny.png", "landscape_bnext_tiny.npz"):
        assert _non_empty(out / name), name
    data = np.load(out / "landscape_bnext_tiny.npz")
    assert data["losses"].shape == (3, 3) and data["alphas"].tolist() == [-1.0, 0.0, 1.0]
    assert float(data["centre_loss"]) == pytest.approx(data["losses"][1, 1], rel=1e-6)
    loaded = Landscape.load(out / "landscape_bnext_tiny.npz")
    assert loaded.settings["images"] == 8 and loaded.settings["dim"] == 2

    assert loss_landscape.main([*args, "--dim", "1", "--recompute-bn", "--no-progress"]) == 0
    assert _non_empty(out / "line_bnext_tiny.png")
    assert Landscape.load(out / "landscape_bnext_tiny.npz").betas is None


def test_landscape_cli_compare_writes_one_figure(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["--model", "bnext_tiny", *TINY, "--data-dir", str(image_folder), "--img-size", "16", "--out", str(out)]
    compare = ["--compare", "bnext_tiny:elm_attention=false,info_recoupling=false,label=ablation"]
    scan_args = ["--grid", "3", "--batches", "1", "--batch-size", "6", "--no-progress"]
    assert loss_landscape.main([*args, *compare, *scan_args]) == 0
    assert _non_empty(out / "compare_contour.png")
    assert _non_empty(out / "landscape_ablation.npz") and _non_empty(out / "landscape_bnext_tiny.npz")
    assert loss_landscape.main([*args, *compare, *scan_args, "--dim", "1"]) == 0
    assert _non_empty(out / "compare_line.png")


def test_landscape_cli_rejects_unknown_model(image_folder: Path, tmp_path: Path) -> None:
    argv = ["--model", "nope", "--data-dir", str(image_folder), "--out", str(tmp_path), "--grid", "3"]
    assert loss_landscape.main(argv) == 2


def test_block_design_networks_when_available() -> None:
    designs = loss_landscape.block_designs()
    if not designs:
        pytest.skip("visualization.block_designs is not there")
    name = next(iter(designs))
    net = loss_landscape.build_model(name, NUM_CLASSES, {"stem": "cifar", "stage_channels": [8, 16]})
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, NUM_CLASSES)


def test_spread_batches_cover_every_class(image_folder: Path) -> None:
    batches, classes = loss_landscape.load_batches("folder", image_folder, 16, 2, 6, crop_pct=1.0)
    assert classes == ["class0", "class1", "class2"]
    assert [len(y) for _, y in batches] == [6, 6]
    for _, targets in batches:
        assert set(targets.tolist()) == {0, 1, 2}
    first, _ = loss_landscape.load_batches("folder", image_folder, 16, 1, 4, crop_pct=1.0, subset="first")
    assert first[0][1].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Training curves

TAGS = ("train/loss", "train/top1", "train/top5", "val/top1", "val/top5", "val/loss", "train/lr", "train/temperature")


def test_curves_from_tensorboard(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run_a"
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for epoch in range(3):
        for index, tag in enumerate(TAGS):
            writer.add_scalar(tag, 0.9**epoch * (index + 1), epoch)
        writer.add_scalar("kd/weight_resnet18", 0.4 + 0.1 * epoch, epoch)
    writer.close()

    series = training_curves.load_run(run)
    assert set(TAGS) <= series.keys() and "kd/weight_resnet18" in series
    steps, values = series["val/top1"]
    assert steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(values, [4 * 0.9**e for e in range(3)], rtol=1e-6)
    out = tmp_path / "curves.png"
    assert training_curves.main([str(run), str(run), "--out", str(out)]) == 0
    assert _non_empty(out)


def test_curves_fall_back_to_history(tmp_path: Path) -> None:
    run = tmp_path / "run_b"
    run.mkdir()
    history = [
        {"epoch": float(e), "train_loss": 2.0 - e, "val_top1": 10.0 * e, "lr": 1e-3, "temperature": 0.1**e}
        for e in range(3)
    ]
    torch.save({"history": history, "model": {}}, run / "last.pth")
    series = training_curves.load_run(run)
    assert series["val/top1"][1].tolist() == [0.0, 10.0, 20.0]
    assert {"train/loss", "train/lr", "train/temperature"} <= series.keys()
    assert training_curves.history_tag("kd_weight_a") == "kd/weight_a"
    assert training_curves.history_tag("images_per_second") == "train/images_per_second"
    out = tmp_path / "history.png"
    assert training_curves.main([str(run), "--out", str(out)]) == 0
    assert _non_empty(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert training_curves.main([str(empty), "--out", str(tmp_path / "x.png")]) == 2


def test_analysis_tools_refuse_a_checkpoint_that_would_execute_code(tmp_path: Path, code_running_payload) -> None:
    # The curves' history fallback and the landscape's config reader go through the trainer's reader.
    payload, marker = code_running_payload
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"history": [], "config": {}, "payload": payload}, run / "last.pth")
    with pytest.raises(checkpointing.CheckpointReadError, match="execute code"):
        training_curves.read_history(run / "last.pth")
    with pytest.raises(checkpointing.CheckpointReadError, match="execute code"):
        loss_landscape.checkpoint_config(run / "last.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Binary feature maps


def test_binary_maps_are_signs(model: nn.Module) -> None:
    layers = binary_features.hardsign_layers(model)
    assert layers == [name for name, m in model.named_modules() if isinstance(m, models.HardSign)]
    first = dict(model.named_modules())[layers[0]]
    inputs: dict[str, torch.Tensor] = {}

    def zero_a_patch(module: nn.Module, args: tuple) -> tuple:
        # Make exact zeros in the binarizer's input: sign(0) == 0 must show up only there.
        x = args[0].clone()
        x[:, :, :2, :2] = 0.0
        inputs[layers[0]] = x
        return (x,)

    handle = first.register_forward_pre_hook(zero_a_patch)
    try:
        maps = binary_features.capture_binary_maps(model, torch.randn(1, 3, 12, 12), layers)
    finally:
        handle.remove()
    assert list(maps) == layers
    for name, tensor in maps.items():
        assert set(tensor.unique().tolist()) <= {-1.0, 0.0, 1.0}, name
    zeros = maps[layers[0]] == 0
    assert zeros.any() and torch.equal(zeros, inputs[layers[0]] == 0)
    assert not model.training
    with pytest.raises(ValueError, match="list-layers"):
        binary_features.capture_binary_maps(model, torch.randn(1, 3, 12, 12), ["no.such.layer"])


def test_binary_features_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image)
    model_args = ["--model", "bnext_tiny", "--num-classes", "3", *TINY]
    assert binary_features.main([*model_args, "--list-layers"]) == 0
    listed = capsys.readouterr().out.split()
    assert "feature.1.Attention.binary_activation" in listed
    out = tmp_path / "maps.png"
    argv = [*model_args, "--image", str(image), "--img-size", "16", "--out", str(out), "--channels", "4"]
    assert binary_features.main(argv) == 0
    assert _non_empty(out)
    assert binary_features.main([*argv, "--layers", "feature.1.prelu"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Accuracy vs OPs


def test_sota_markdown_lists_bnext_with_computed_ops() -> None:
    table = sota.markdown_table()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    for label, name in (
        ("BNext-T", "bnext_tiny"),
        ("BNext-S", "bnext_small"),
        ("BNext-M", "bnext_middle"),
        ("BNext-L", "bnext_large"),
    ):
        summary = summarize_by_name(name)
        assert f"| {summary.ops / 1e9:.4f} / {summary.ops_readme / 1e9:.4f} |" in rows[label]
        assert "computed by this project" in rows[label]
    assert "| 80.57 |" in rows["BNext-L"]
    # Numbers that are not in the project's sources stay "not found", never invented.
    assert "not found" in rows["ReActNet-B (Liu et al., ECCV 2020)"]
    for peer in sota.PEERS:
        assert (peer.top1 is None) == (peer.top1_source == sota.NOT_FOUND)
        assert (peer.ops_g is None) == (peer.ops_source == sota.NOT_FOUND)


def test_sota_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sota.png"
    assert sota.main(["--out", str(out), "--markdown"]) == 0
    assert _non_empty(out)
    assert capsys.readouterr().out.startswith("| model | top-1 (%) | OPs (G) | OPs source | accuracy source |")
