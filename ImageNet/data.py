"""Datasets, transforms, samplers and loaders of the training pipeline.

Every problem a user can fix (a missing folder, an undecodable image, absent CIFAR files)
is raised as :class:`DataError`, whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

_LOG = logging.getLogger(__name__)

#: Dataset kinds that :func:`build_datasets` understands.
DATASETS = ("folder", "cifar10", "cifar100")
#: Per-channel statistics of the CIFAR training images (the usual CIFAR recipe).
CIFAR_MEAN = (0.507, 0.487, 0.441)
CIFAR_STD = (0.267, 0.256, 0.276)
#: Resize modes; "random" (a random mode per image) only makes sense for training.
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_BAD_IMAGE_FIX = "remove the file or replace it with a valid image (or pass --skip-bad-images to use the next good one)"


class DataError(ValueError):
    """A data problem the user can fix; the message names the problem and the fix."""


def _names(items: Sequence[str], limit: int = 10) -> str:
    """A short comma-separated list, so a message about 1000 classes stays readable."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _is_image(file_name: str) -> bool:
    """Whether ImageFolder would take this file (torchvision compares lower-cased names too)."""
    return file_name.lower().endswith(IMG_EXTENSIONS)


def _has_image(folder: Path) -> bool:
    """Whether the folder holds an image anywhere below it; stops at the first one found."""
    # ImageFolder walks class folders recursively and follows links, so the check does too.
    for _, _, files in os.walk(folder, followlinks=True):
        if any(_is_image(name) for name in files):
            return True
    return False


def _class_folders(split_dir: Path) -> list[str]:
    """The class folder names of one split, as ImageFolder finds them."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def check_image_folder(root: str | Path) -> list[str]:
    """Validate ``root/train/<class>/*`` and ``root/val/<class>/*``; return the sorted class names.

    Raises :class:`DataError` for a missing root or split, a split without class folders,
    class folders without images, and train and val class sets that differ.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.exists():
        raise DataError(f"dataset directory {root} does not exist; point --data-dir at the folder with train/ and val/")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory; point --data-dir at the folder with train/ and val/")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            # ImageNet's validation archive is flat: its images must be sorted into class folders first.
            raise DataError(f"{root} has no '{split}' subdirectory; {layout} (sort flat val images into class folders)")
        classes[split] = _class_folders(split_dir)
        if not classes[split]:
            raise DataError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    empty = [
        f"{split}/{name}" for split, names in classes.items() for name in names if not _has_image(root / split / name)
    ]
    if empty:
        raise DataError(
            f"class folders without image files ({', '.join(IMG_EXTENSIONS)}) in {root}: {_names(empty)}; "
            "add images to them or remove them"
        )
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        raise DataError(
            f"train and val of {root} have different classes: only in train: [{_names(only_train)}], "
            f"only in val: [{_names(only_val)}]; give both splits the same class folders"
        )
    return classes["train"]


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully and convert it to RGB; raise :class:`DataError` if it does not decode."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this global flag PIL pads truncated files with grey instead of failing: silent data damage.
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images would load silently; set it False"
        )
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            # Image.open only reads the header; load() decodes now, while the file is open, so errors surface here.
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            reason = "the file is empty (0 bytes)"
        elif isinstance(error, UnidentifiedImageError):
            reason = "its content is in no image format PIL reads"  # PIL's own text names a file object, not the path
        else:
            reason = str(error)
        raise DataError(f"cannot decode image {path}: {reason}; {_BAD_IMAGE_FIX}") from error


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder (RGB images) that reports undecodable files as :class:`DataError`.

    With ``skip_bad_images=True`` a bad file is replaced by the next sample that decodes
    (deterministic) and its path is recorded in ``bad_images`` (per process). Every skip
    also adds one to ``skipped``, a counter in shared memory, so that the training
    process sees the skips of its loader workers too.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        *,
        skip_bad_images: bool = False,
    ) -> None:
        try:
            super().__init__(str(root), transform=transform, target_transform=target_transform, loader=load_rgb)
        except FileNotFoundError as error:
            # torchvision reports class folders without images (or a missing root) this way.
            raise DataError(f"{error}; add images to those class folders or remove them") from error
        self.skip_bad_images = skip_bad_images
        self.bad_images: set[str] = set()
        # Shared memory, inherited by (or handed to) the DataLoader's worker processes.
        self.skipped = multiprocessing.Value("q", 0)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """The (transformed image, target) of ``index``, or of the next good sample when skipping bad ones."""
        count = len(self.samples)
        for offset in range(count):
            path, target = self.samples[(index + offset) % count]
            if path in self.bad_images:
                self._count_skip()  # known bad in this process: it would fail again
                continue
            try:
                image = self.loader(path)
            except DataError:
                if not self.skip_bad_images:
                    raise
                self.bad_images.add(path)
                self._count_skip()
                _LOG.warning("skipping undecodable image %s (%d bad files seen here)", path, len(self.bad_images))
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise DataError(f"no image of {self.root} decodes; {_BAD_IMAGE_FIX}")

    def _count_skip(self) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1


def skipped_images(dataset: Dataset) -> int:
    """How many bad images ``dataset`` (a :class:`CheckedImageFolder`, maybe wrapped) has skipped so far."""
    while isinstance(dataset, SeededSamples):
        dataset = dataset.dataset
    counter = getattr(dataset, "skipped", None)
    return int(counter.value) if counter is not None else 0


class SampleKey(NamedTuple):
    """What :class:`ResumableSampler` yields in deterministic mode: the index and where it was drawn."""

    epoch: int
    index: int
    rank: int
    position: int


class SeededSamples(Dataset):
    """Gives each training sample its own random-number streams, so augmentations are reproducible.

    Before a sample is loaded, the torch (CPU), Python and NumPy generators are seeded from
    (seed, epoch, dataset index) and afterwards restored, so the augmentation of a sample
    does not depend on which worker loads it, on how many workers there are, on the
    number of processes, or on where a resumed epoch restarts. With repeated augmentation
    (the same index several times per epoch) the seed uses (seed, epoch, rank, position in
    the rank's order) instead, so that the repeats differ.
    """

    def __init__(self, dataset: Dataset, seed: int, *, by_position: bool = False) -> None:
        self.dataset = dataset
        self.seed = seed
        self.by_position = by_position

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        """The sample of ``key.index``, augmented with the generators seeded for this key."""
        where = [key.rank, key.position] if self.by_position else [key.index]
        words = [self.seed, key.epoch, *where]
        seed = int(np.random.SeedSequence([w % 2**63 for w in words]).generate_state(1, np.uint64)[0])
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams stay as they are
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return self.dataset[key.index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def build_transform(
    *,
    img_size: int,
    is_training: bool,
    auto_augment: str | None = "rand-m7-mstd0.5-inc1",
    interpolation: str = "bicubic",
    crop_pct: float = 0.95,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    re_prob: float = 0.0,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable[[Image.Image], torch.Tensor]:
    """The ImageNet transform from timm.

    Training: random resized crop, horizontal flip, RandAugment (``auto_augment``; None or
    "none" disables it), normalisation and random erasing (``re_prob``). Evaluation: resize
    the short side to ``img_size / crop_pct``, center-crop ``img_size``, normalise.
    """
    if not isinstance(img_size, int) or img_size <= 0:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}; pass e.g. --img-size 224")
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}; pass e.g. --crop-pct 0.95")
    allowed = _INTERPOLATIONS + (("random",) if is_training else ())
    if interpolation not in allowed:
        raise DataError(f"unknown interpolation {interpolation!r}; use one of {', '.join(allowed)}")
    for name, value in (("re_prob", re_prob), ("hflip", hflip)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{name} is a probability and must be in [0, 1], got {value}")
    if not is_training:
        return create_transform(
            input_size=img_size,
            is_training=False,
            interpolation=interpolation,
            crop_pct=crop_pct,
            mean=tuple(mean),
            std=tuple(std),
        )
    if auto_augment is not None and auto_augment.strip().lower() in ("", "none"):
        auto_augment = None
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        # No colour jitter: RandAugment already varies colour, and without it the recipe stays crop + flip.
        color_jitter=None,
        auto_augment=auto_augment,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=re_prob,
    )


def _cifar_transform(img_size: int, is_training: bool, interpolation: str) -> Callable[[Image.Image], torch.Tensor]:
    """The standard CIFAR recipe: padded random crop and flip for training, none for evaluation."""
    if not isinstance(img_size, int) or img_size <= 0:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}; pass e.g. --img-size 32")
    if interpolation not in _INTERPOLATIONS:
        raise DataError(f"unknown interpolation {interpolation!r} for CIFAR; use one of {', '.join(_INTERPOLATIONS)}")
    steps: list[Callable[..., Any]] = []
    if img_size != 32:
        steps.append(transforms.Resize(img_size, interpolation=transforms.InterpolationMode(interpolation)))
    if is_training:
        # Padding 4 at 32 pixels is an eighth of the image; keep that fraction at other sizes.
        padding = max(1, round(4 * img_size / 32))
        steps += [transforms.RandomCrop(img_size, padding=padding), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return transforms.Compose(steps)


def _build_cifar(
    dataset: str, data_dir: Path, img_size: int, download: bool, interpolation: str
) -> tuple[Dataset, Dataset, list[str]]:
    """CIFAR-10/100 from torchvision, with torchvision's errors turned into :class:`DataError`."""
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    splits = []
    for train in (True, False):
        transform = _cifar_transform(img_size, train, interpolation)
        try:
            splits.append(cls(str(data_dir), train=train, transform=transform, download=download))
        except RuntimeError as error:
            if download:
                raise DataError(
                    f"{dataset} in {data_dir} is unusable after download ({error}); delete it and retry"
                ) from error
            raise DataError(
                f"{dataset} files not found (or corrupted) in {data_dir}; pass --download to fetch them, "
                f"or place the extracted {cls.base_folder}/ folder there"
            ) from error
        except OSError as error:
            # URLError and socket errors are OSErrors: the download itself failed.
            raise DataError(
                f"could not download {dataset} into {data_dir} ({error}); check network access, "
                f"or place the extracted {cls.base_folder}/ folder there and drop --download"
            ) from error
    return splits[0], splits[1], list(splits[0].classes)


def build_datasets(
    *,
    dataset: str,
    data_dir: str | Path,
    img_size: int,
    download: bool = False,
    auto_augment: str | None = "rand-m7-mstd0.5-inc1",
    interpolation: str = "bicubic",
    crop_pct: float = 0.95,
    re_prob: float = 0.0,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    skip_bad_images: bool = False,
) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, val, class names) of ``dataset``: "folder" (ImageNet layout), "cifar10" or "cifar100".

    The folder datasets use :func:`build_transform`; CIFAR uses its own recipe (padded crop
    and flip) and ignores the ImageNet augmentation options.
    """
    data_dir = Path(data_dir)
    if dataset in ("cifar10", "cifar100"):
        return _build_cifar(dataset, data_dir, img_size, download, interpolation)
    if dataset != "folder":
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    classes = check_image_folder(data_dir)
    common = {"img_size": img_size, "interpolation": interpolation, "crop_pct": crop_pct}
    train_tf = build_transform(
        is_training=True, auto_augment=auto_augment, re_prob=re_prob, hflip=hflip, scale=scale, **common
    )
    val_tf = build_transform(is_training=False, **common)
    train_set = CheckedImageFolder(data_dir / "train", train_tf, skip_bad_images=skip_bad_images)
    val_set = CheckedImageFolder(data_dir / "val", val_tf, skip_bad_images=skip_bad_images)
    return train_set, val_set, classes


class ShardedEvalSampler(Sampler[int]):
    """Rank ``r`` of ``world_size`` gets indices r, r + world_size, ...: every sample exactly once.

    Unlike DistributedSampler it never pads with repeated samples, so the accuracy summed
    over ranks is exact; ranks may get counts that differ by one.
    """

    def __init__(self, dataset_len: int, *, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if dataset_len < 0:
            raise DataError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        """This rank's indices in increasing order."""
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        """How many indices this rank gets."""
        return len(range(self.rank, self.dataset_len, self.world_size))


class ResumableSampler(Sampler[int]):
    """Wraps the training sampler so that a resumed epoch starts at the sample it stopped at.

    With ``keyed=True`` it yields :class:`SampleKey` tuples instead of bare indices, for
    :class:`SeededSamples`; the position counts from the start of the epoch, skipped part
    included, so a resumed epoch gets the keys of the uninterrupted one.
    """

    def __init__(self, base: Sampler[int], *, keyed: bool = False, rank: int = 0) -> None:
        self.base = base
        self.keyed = keyed
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the shuffling sampler (the order is a function of seed and epoch)."""
        self.epoch = epoch
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]

    def skip_next(self, count: int) -> None:
        """Drop the first ``count`` indices of the next pass only."""
        self._skip = count

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        for position, index in enumerate(self.base):
            if position >= skip:
                yield SampleKey(self.epoch, index, self.rank, position) if self.keyed else index

    def __len__(self) -> int:
        return len(self.base) - self._skip  # type: ignore[arg-type]


def build_loaders(
    train_set: Dataset,
    val_set: Dataset,
    *,
    batch_size: int,
    workers: int,
    world_size: int,
    rank: int,
    seed: int,
    repeated_aug: int = 1,
    pin_memory: bool = False,
    drop_last: bool = True,
    seeded_samples: bool = False,
) -> tuple[DataLoader, DataLoader, ResumableSampler]:
    """The (train loader, val loader, train sampler) of one process; ``batch_size`` is per process.

    The train sampler wraps a DistributedSampler even for one process, so that
    ``set_epoch(epoch)`` gives a deterministic, resumable order and ``skip_next`` resumes
    inside an epoch; ``repeated_aug > 1`` uses timm's RepeatAugSampler (whose order
    depends on the epoch only, not on ``seed``). Validation is sharded without padding.
    ``seeded_samples=True`` (``--deterministic``) gives every training sample its own
    seeded augmentation (:class:`SeededSamples`).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}; use --workers 0 to load in the main process")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if repeated_aug > 1:
        base: Sampler = RepeatAugSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeated_aug
        )
    else:
        base = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
    train_sampler = ResumableSampler(base, keyed=seeded_samples, rank=rank)
    if seeded_samples:
        train_set = SeededSamples(train_set, seed, by_position=repeated_aug > 1)
    # A seeded generator makes the workers' augmentation seeds reproducible and different per rank.
    generator = torch.Generator().manual_seed(seed + rank)
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=drop_last, generator=generator, **common)
    if len(train_loader) == 0:
        raise DataError(
            f"{len(train_sampler)} training samples per process give no full batch of {batch_size}; "
            "lower --batch-size or add data"
        )
    val_sampler = ShardedEvalSampler(len(val_set), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    val_loader = DataLoader(val_set, sampler=val_sampler, drop_last=False, **common)
    return train_loader, val_loader, train_sampler


def build_mixup(
    *,
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    num_classes: int,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
) -> Mixup | None:
    """A timm Mixup (which also smooths labels) when ``mixup`` or ``cutmix`` is positive, else None."""
    if mixup < 0 or cutmix < 0:
        raise DataError(f"mixup and cutmix alphas must be >= 0, got mixup={mixup}, cutmix={cutmix}")
    if mixup == 0 and cutmix == 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
