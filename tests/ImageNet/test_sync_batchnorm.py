"""The gloo-capable synchronised batch norm: 2 processes train like 1 process on the global batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import models
from ImageNet.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

STEPS = 4
GLOBAL_BATCH = 8


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        # no conv biases: before batch norm their exact gradient is 0, and Adam would amplify the rounding noise
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6, momentum=None),  # cumulative running averages take another path
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(6),  # the conversion covers every batch-norm kind
        nn.Linear(6, 3),
    )


def _bnext_float64() -> nn.Module:
    # In float64 the rounding noise that the sign functions of a binary network amplify is gone,
    # so the comparison tests the synchronisation itself on the real architecture.
    torch.manual_seed(0)
    return models.create_model("bnext_tiny", num_classes=3, stem="cifar", stage_channels=[8, 16, 16, 32]).double()


NETS: dict[str, tuple[Callable[[], nn.Module], torch.dtype, int]] = {
    "small": (_small_net, torch.float32, 6),
    "bnext": (_bnext_float64, torch.float64, 16),
}


def _batches(dtype: torch.dtype, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    # a shift and scale per channel, so that the batch statistics matter
    return [
        (
            (torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator) * 3 + 2).to(dtype),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def _train(net: str, model: nn.Module, shard: slice) -> None:
    _, dtype, size = NETS[net]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for images, targets in _batches(dtype, size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[shard]), targets[shard]).backward()
        optimizer.step()


def _worker(rank: int, store_path: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        results = {}
        for name, sync in (("small", True), ("small", False), ("bnext", True)):
            model = NETS[name][0]()
            if sync:
                model = convert_sync_batchnorm(model, torch.device("cpu"))
            per_rank = GLOBAL_BATCH // 2
            _train(name, DistributedDataParallel(model), slice(rank * per_rank, (rank + 1) * per_rank))
            results[f"{name}_{'sync' if sync else 'local'}"] = model.state_dict()
        if rank == 0:
            torch.save(results, output)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts after STEPS steps with 2 gloo processes, each holding half of every global batch."""
    folder = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder / "out.pth")), nprocs=2)
    return torch.load(folder / "out.pth", weights_only=True)


def _single_process(name: str) -> dict[str, torch.Tensor]:
    model = NETS[name][0]()
    _train(name, model, slice(None))
    return model.state_dict()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()  # a converted model saves the same state dict
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "bnext"])
def test_two_processes_with_sync_bn_match_one_process_on_the_global_batch(two_process_results, name) -> None:
    # parameters and running statistics, after several AdamW steps
    assert _max_difference(two_process_results[f"{name}_sync"], _single_process(name)) < 1e-5


@pytest.mark.slow
def test_without_synchronisation_the_processes_train_differently(two_process_results) -> None:
    # the check above has teeth: each process normalising by its own half is far off
    assert _max_difference(two_process_results["small_local"], _single_process("small")) > 1e-3


def test_outside_a_process_group_it_is_ordinary_batch_norm() -> None:
    reference = _small_net()
    converted = convert_sync_batchnorm(_small_net(), torch.device("cpu"))
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == 3
    images, _ = _batches(torch.float32, 6)[0]
    assert torch.equal(converted(images), reference(images))
    assert torch.equal(converted[1].running_var, reference[1].running_var)
    converted.eval()
    reference.eval()
    assert torch.equal(converted(images), reference(images))
    with pytest.raises(ValueError, match="shape"):
        converted[1](torch.zeros(3))
