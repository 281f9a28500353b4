"""Tests of the data layer: folder checks, bad images, transforms, samplers, loaders, MNIST demo data."""

from __future__ import annotations

import concurrent.futures
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler
from torchvision import transforms

from ImageNet import demo_data
from ImageNet.data import (
    CheckedImageFolder,
    DataError,
    ResumableSampler,
    ShardedEvalSampler,
    build_datasets,
    build_loaders,
    build_mixup,
    build_transform,
    check_image_folder,
)
from ImageNet.demo_data import load_mnist_5k, main, prepare_mnist_image_folder

# (width, height) of the generated images: wider, taller, and smaller than the crop sizes used below.
SIZES = [(40, 30), (25, 60), (16, 16)]


def _image_bytes(size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    """A noise image encoded as PNG or JPEG (noise, so a truncated JPEG cuts into real data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _make_split(split_dir: Path, classes: list[str], per_class: int = 3) -> None:
    """Class folders with PNG and JPEG files (one with an upper-case extension) of several sizes."""
    for c, name in enumerate(classes):
        folder = split_dir / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            fmt, ext = [("PNG", ".png"), ("JPEG", ".jpg"), ("JPEG", ".JPEG")][i % 3]
            (folder / f"img{i}{ext}").write_bytes(_image_bytes(SIZES[i % len(SIZES)], fmt, seed=10 * c + i))


def _make_dataset(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """An ImageNet-layout folder with the same classes in train and val."""
    _make_split(root / "train", list(classes))
    _make_split(root / "val", list(classes), per_class=2)
    return root


# check_image_folder


def test_check_image_folder_returns_sorted_classes(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "data", ("zebra", "ant", "moth"))
    assert check_image_folder(root) == ["ant", "moth", "zebra"]


def test_check_image_folder_missing_or_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*--data-dir"):
        check_image_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        check_image_folder(tmp_path / "file")


def test_check_image_folder_missing_val(tmp_path: Path) -> None:
    _make_split(tmp_path / "train", ["a"])
    with pytest.raises(DataError, match="no 'val' subdirectory"):
        check_image_folder(tmp_path)


def test_check_image_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.png").write_bytes(_image_bytes((8, 8), "PNG"))
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        check_image_folder(tmp_path)


def test_check_image_folder_names_the_empty_class_folder(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path, ("ant", "bee"))
    (root / "train" / "cat").mkdir()
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    _make_split(root / "val", ["cat"])
    with pytest.raises(DataError, match="train/cat") as info:
        check_image_folder(root)
    assert "val/cat" not in str(info.value)


def test_check_image_folder_lists_both_sides_of_a_class_mismatch(tmp_path: Path) -> None:
    _make_split(tmp_path / "train", ["a", "b", "c"])
    _make_split(tmp_path / "val", ["a", "b", "d"])
    with pytest.raises(DataError) as info:
        check_image_folder(tmp_path)
    assert "only in train: ['c']" in str(info.value)
    assert "only in val: ['d']" in str(info.value)


# CheckedImageFolder


def _corrupt(path: Path, kind: str) -> None:
    """Write a bad image file of the given kind."""
    if kind == "truncated":
        data = _image_bytes((64, 48), "JPEG")
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("this is text, not a picture")


@pytest.mark.parametrize(("kind", "name"), [("truncated", "bad.jpg"), ("empty", "bad.png"), ("text", "bad.jpeg")])
def test_undecodable_image_is_named_in_the_error(tmp_path: Path, kind: str, name: str) -> None:
    _make_split(tmp_path, ["a", "b"])
    bad = tmp_path / "a" / name
    _corrupt(bad, kind)
    dataset = CheckedImageFolder(tmp_path)
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(DataError, match="remove the file or replace it") as info:
        dataset[index]
    assert str(bad) in str(info.value)
    image, _ = dataset[index + 1]  # the good files still load, as RGB
    assert image.mode == "RGB"


def test_truncated_images_are_refused_even_if_pil_is_told_to_accept_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_split(tmp_path, ["a"])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="LOAD_TRUNCATED_IMAGES"):
        CheckedImageFolder(tmp_path)[0]


def test_skip_bad_images_uses_the_next_good_sample_and_counts(tmp_path: Path) -> None:
    _make_split(tmp_path, ["a", "b"])
    bad = [tmp_path / "a" / "img1.jpg", tmp_path / "a" / "img2.JPEG"]  # two bad files in a row
    for path in bad:
        _corrupt(path, "truncated")
    dataset = CheckedImageFolder(tmp_path, transforms.ToTensor(), skip_bad_images=True)
    paths = [path for path, _ in dataset.samples]
    first_bad = paths.index(str(bad[0]))
    replacement = dataset.samples[first_bad + 2]
    image, target = dataset[first_bad]
    assert target == replacement[1]
    assert torch.equal(image, transforms.ToTensor()(Image.open(replacement[0]).convert("RGB")))
    assert dataset.bad_images == {str(path) for path in bad}
    assert len([dataset[i] for i in range(len(dataset))]) == len(dataset)  # every index yields a sample
    assert dataset.bad_images == {str(path) for path in bad}


def test_skip_bad_images_raises_when_nothing_decodes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _corrupt(tmp_path / "a" / "x.png", "empty")
    with pytest.raises(DataError, match="no image"):
        CheckedImageFolder(tmp_path, skip_bad_images=True)[0]


# transforms and datasets


def test_train_transform_uses_randaugment_and_gives_the_crop_size(tmp_path: Path) -> None:
    transform = build_transform(img_size=32, is_training=True, re_prob=0.25)
    assert "RandAugment" in repr(transform)
    assert "RandomErasing" in repr(transform)
    for i, size in enumerate(SIZES):
        image = Image.open(io.BytesIO(_image_bytes(size, "PNG", seed=i))).convert("RGB")
        assert transform(image).shape == (3, 32, 32)
    for disabled in (None, "none"):
        assert "RandAugment" not in repr(build_transform(img_size=32, is_training=True, auto_augment=disabled))


def test_eval_transform_resizes_by_crop_pct_then_center_crops() -> None:
    transform = build_transform(img_size=32, is_training=False, crop_pct=0.5)
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    crop = next(t for t in transform.transforms if isinstance(t, transforms.CenterCrop))
    assert resize.size in (64, [64], (64, 64))  # short side 32 / 0.5
    assert tuple(crop.size) == (32, 32)
    for size in SIZES:
        image = Image.open(io.BytesIO(_image_bytes(size, "JPEG"))).convert("RGB")
        assert transform(image).shape == (3, 32, 32)
    # Deterministic: evaluating twice gives the same tensor.
    assert torch.equal(transform(image), transform(image))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"crop_pct": 0.0}, "crop_pct"), ({"crop_pct": 1.5}, "crop_pct"), ({"img_size": 0}, "img_size")],
)
def test_transform_arguments_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build_transform(**{"img_size": 32, "is_training": False, **kwargs})


def test_build_datasets_folder(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path)
    train, val, classes = build_datasets(dataset="folder", data_dir=root, img_size=24, auto_augment="none")
    assert classes == ["ant", "bee", "cat"]
    assert (len(train), len(val)) == (9, 6)
    assert isinstance(train, CheckedImageFolder) and train.classes == classes
    assert train[0][0].shape == val[5][0].shape == (3, 24, 24)
    assert val[5][1] == 2


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_without_files_asks_for_download(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(DataError, match="--download"):
        build_datasets(dataset=dataset, data_dir=tmp_path, img_size=32, download=False)


def test_unknown_dataset_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder, cifar10, cifar100"):
        build_datasets(dataset="imagenet21k", data_dir=tmp_path, img_size=32)


# samplers and loaders


class _Indices(Dataset):
    """A dataset whose sample is its own index, to see what a sampler delivers."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.parametrize(("length", "world_size"), [(10, 3), (7, 4), (2, 3), (0, 2), (5, 1)])
def test_sharded_eval_sampler_covers_each_index_once(length: int, world_size: int) -> None:
    shards = [list(ShardedEvalSampler(length, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardedEvalSampler(length, rank=r, world_size=world_size)) for r in range(world_size)] == [
        len(shard) for shard in shards
    ]
    assert shards[0] == list(range(0, length, world_size))


def test_sharded_eval_sampler_rejects_a_bad_rank() -> None:
    with pytest.raises(DataError, match="rank"):
        ShardedEvalSampler(10, rank=3, world_size=3)


def _epoch(sampler_loader: tuple, epoch: int) -> list[int]:
    """The indices one rank's train loader gives in ``epoch``."""
    loader, _, sampler = sampler_loader
    sampler.set_epoch(epoch)
    return [int(i) for batch in loader for i in batch]


def test_train_loader_shards_are_disjoint_and_deterministic_per_epoch() -> None:
    dataset = _Indices(20)

    def loaders(rank: int, seed: int = 7) -> tuple:
        return build_loaders(dataset, _Indices(11), batch_size=4, workers=0, world_size=2, rank=rank, seed=seed)

    rank0, rank1 = loaders(0), loaders(1)
    assert isinstance(rank0[2].base, DistributedSampler)
    first0, first1 = _epoch(rank0, 0), _epoch(rank1, 0)
    assert len(first0) == len(first1) == 8  # 10 per rank, last partial batch dropped
    assert not set(first0) & set(first1)
    assert _epoch(loaders(0), 0) == first0  # a fresh loader (a resumed run) repeats the order
    assert _epoch(rank0, 1) != first0  # a new epoch reshuffles
    assert _epoch(rank0, 0) == first0
    assert _epoch(loaders(0, seed=8), 0) != first0
    val = [int(i) for r in (0, 1) for batch in loaders(r)[1] for i in batch]
    assert sorted(val) == list(range(11))  # validation: no padding, no drops


def test_loader_options() -> None:
    single = build_loaders(_Indices(8), _Indices(3), batch_size=4, workers=0, world_size=1, rank=0, seed=0)
    assert isinstance(single[2].base, DistributedSampler)  # also for one process: set_epoch works
    assert sorted(_epoch(single, 3)) == list(range(8))
    repeated = build_loaders(
        _Indices(8), _Indices(3), batch_size=2, workers=2, world_size=2, rank=1, seed=0, repeated_aug=3
    )
    assert isinstance(repeated[2].base, RepeatAugSampler)
    assert repeated[0].persistent_workers and repeated[1].persistent_workers
    with pytest.raises(DataError, match="batch"):
        build_loaders(_Indices(8), _Indices(3), batch_size=16, workers=0, world_size=1, rank=0, seed=0)


def test_build_mixup() -> None:
    assert build_mixup(mixup=0.0, cutmix=0.0, label_smoothing=0.1, num_classes=10) is None
    mixup = build_mixup(mixup=0.8, cutmix=1.0, label_smoothing=0.1, num_classes=10)
    assert isinstance(mixup, Mixup)
    images, targets = mixup(torch.rand(4, 3, 8, 8), torch.arange(4))
    assert images.shape == (4, 3, 8, 8)
    assert targets.shape == (4, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


# MNIST demo data


def _pngs(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*/*.png"))


def test_mnist_folder_is_real_balanced_and_round_trips(tmp_path: Path) -> None:
    root = prepare_mnist_image_folder(tmp_path / "mnist", n_train=50, n_val=20)
    assert check_image_folder(root) == [str(d) for d in range(10)]
    assert len(_pngs(root, "train")) == 50 and len(_pngs(root, "val")) == 20
    assert all(len(list((root / "val" / str(d)).glob("*.png"))) == 2 for d in range(10))
    assert set(_pngs(root, "train")).isdisjoint(_pngs(root, "val"))
    images, labels = load_mnist_5k()
    path = _pngs(root, "val")[0]
    row = int(path.stem)
    with Image.open(path) as png:
        assert png.mode == "L" and png.size == (28, 28)
        assert np.array_equal(np.asarray(png), images[row])  # lossless
    assert int(path.parent.name) == labels[row]
    rgb, target = CheckedImageFolder(root / "val", transforms.ToTensor())[0]
    assert rgb.shape == (3, 28, 28) and target == 0
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert json.loads((root / "DONE").read_text()) == {"n_train": 50, "n_val": 20}


def test_mnist_folder_is_idempotent_and_rebuilt_for_other_counts(tmp_path: Path) -> None:
    root = prepare_mnist_image_folder(tmp_path / "mnist", n_train=20, n_val=10)
    sentinel = root / "sentinel"
    sentinel.write_text("kept")
    png = _pngs(root, "train")[0]
    mtime = png.stat().st_mtime_ns
    assert prepare_mnist_image_folder(root, n_train=20, n_val=10) == root
    assert sentinel.exists() and png.stat().st_mtime_ns == mtime
    prepare_mnist_image_folder(root, n_train=30, n_val=10)
    assert not sentinel.exists() and len(_pngs(root, "train")) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]  # no staging or stale folders left


def test_mnist_folder_concurrent_calls(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_mnist_image_folder(root, n_train=20, n_val=10), range(4)))
    assert results == [root] * 4
    assert len(_pngs(root, "train")) == 20 and len(_pngs(root, "val")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_mnist_folder_loser_of_the_race_uses_the_winners_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mnist"
    write_images = demo_data._write_images
    raced = []

    def write_then_lose(staging: Path, *args: object) -> None:
        write_images(staging, *args)
        if not raced:  # another process publishes while this one is still writing
            raced.append(True)
            prepare_mnist_image_folder(root, n_train=10, n_val=10)
            (root / "winner").write_text("")

    monkeypatch.setattr(demo_data, "_write_images", write_then_lose)
    assert prepare_mnist_image_folder(root, n_train=10, n_val=10) == root
    assert (root / "winner").exists() and len(_pngs(root, "train")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_mnist_folder_defaults(tmp_path: Path) -> None:
    root = prepare_mnist_image_folder(tmp_path / "mnist")
    assert len(_pngs(root, "train")) == 4000 and len(_pngs(root, "val")) == 1000
    assert all(len(list((root / "train" / str(d)).glob("*.png"))) == 400 for d in range(10))


def test_mnist_folder_refuses_bad_counts_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="n_train"):
        prepare_mnist_image_folder(tmp_path / "a", n_train=4500, n_val=1000)
    with pytest.raises(DataError, match="every digit"):
        prepare_mnist_image_folder(tmp_path / "a", n_train=5, n_val=10)
    (tmp_path / "mine" / "photos").mkdir(parents=True)
    with pytest.raises(DataError, match="not a finished demo folder"):
        prepare_mnist_image_folder(tmp_path / "mine", n_train=10, n_val=10)
    assert (tmp_path / "mine" / "photos").is_dir()


def test_mnist_cli_prints_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--output", str(tmp_path / "cli"), "--n-train", "10", "--n-val", "10"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(_pngs(tmp_path / "cli", "train")) == 10


def test_resumable_sampler_skips_only_the_next_pass() -> None:
    sampler = ResumableSampler(DistributedSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=3))
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip_next(4)
    assert len(sampler) == 6
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies once
