"""Loss landscapes along random filter-normalized directions (Li et al., 2018).

Method of "Visualizing the Loss Landscape of Neural Nets" (H. Li, Z. Xu, G. Taylor,
C. Studer, T. Goldstein, NeurIPS 2018): the loss is evaluated at
``theta + alpha * d1`` (1-D) or ``theta + alpha * d1 + beta * d2`` (2-D), where each
direction is Gaussian and rescaled filter by filter to the norm of the weights, so that
networks with different weight scales can be compared.

Conventions of this implementation:

* **Directions.** The weight of every conv/linear layer (and any other parameter with at
  least two dimensions larger than 1) gets a Gaussian direction whose filters (slices
  along dim 0) are rescaled to the norms of the weight's filters. Every other parameter
  gets a zero direction, i.e. is left unperturbed, as in the paper's default
  (``--xignore biasbn``): batch-norm affine parameters, biases, PReLU slopes, and the
  per-channel thresholds (``move.bias``) and recoupling mixes (``scale``) that BNext
  stores as ``(1, C, 1, 1)`` only for broadcasting.
* **Binary layers.** Their *latent* weights (:func:`models.latent_binary_parameters`) are
  perturbed, and the forward binarizes the perturbed latent weights at a fixed
  temperature (``--temperature``, default the model's own). The ``±1.5`` clip is a
  training-time projection and is not applied to the perturbed weights. In the
  exact-sign regime (a trained model) the loss is piecewise constant in the latent
  weights: it changes only where a perturbation flips signs.
* **Data.** ``--batches`` batches of ``--batch-size`` images with the evaluation
  transform, loaded once and reused at every grid point. ImageFolder sorts samples by
  class, so by default the images are taken at evenly spaced indices of the split
  (``--subset spread``) and dealt round-robin into the batches, which gives every batch
  every class; ``--subset first`` takes the literal first images.
* **Evaluation.** Mean cross-entropy over all the images, in eval mode. With
  ``--recompute-bn`` the batch-norm running statistics are re-estimated at every grid
  point (reset, cumulative average, the same batches) before the evaluation.

Command line::

    python -m visualization.loss_landscape --model bnext_tiny --stem cifar --width-mult 0.25 \\
        --data-dir ~/.cache/bnext/mnist_png --img-size 32 --out visualization/figures \\
        --grid 11 --batches 1 --recompute-bn \\
        --compare "bnext_tiny:elm_attention=false,info_recoupling=false"

A model is named ``NAME[:key=value,...]``: ``NAME`` is one of :func:`models.list_models`
(or a design of :mod:`visualization.block_designs`, when that module exists), and the
options ``elm_attention``, ``info_recoupling``, ``width_mult``, ``stem``, ``checkpoint``,
``temperature``, ``label`` (and ``layout`` for designs) override the shared flags for that
model only. Model flags not given fall back to the model's own checkpoint config; a compared
model without a checkpoint takes the stem and width of ``--model``'s checkpoint config.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import models
from ImageNet import checkpointing
from ImageNet.data import DATASETS, CheckedImageFolder, DataError, build_datasets
from models.bnext import Stem, block_layout

Batch = tuple[torch.Tensor, torch.Tensor]

#: Guards the division by a direction filter's norm (a Gaussian filter is never this small).
_EPS = 1e-12
#: Options a model spec may carry after ``NAME:``.
SPEC_KEYS = ("elm_attention", "info_recoupling", "width_mult", "stem", "checkpoint", "temperature", "label", "layout")
#: Macro layout of a block-design network unless the spec names another (``layout=bnext_small``).
DEFAULT_DESIGN_LAYOUT = "bnext_tiny"
#: Options of models.create_model that the shared flags and a checkpoint's config can set.
_BUILD_KEYS = ("stem", "width_mult", "elm_attention", "info_recoupling", "stage_channels")
DIRECTION_RULE = (
    "filter-normalized Gaussian for conv/linear weights and other tensors with >= 2 dims larger than 1; "
    "zero for 1-D parameters (BN, biases, PReLU) and (1, C, 1, 1) per-channel thresholds/mixes"
)


# ---------------------------------------------------------------------------------------------------------------
# Directions and grid evaluation


def direction_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get a filter-normalized direction (the others get zero).

    A conv/linear weight (any layer :func:`models.layer_precision` knows, binary ones
    included) always qualifies, even with a single filter. Any other parameter
    qualifies when at least two of its dimensions are larger than 1, so that 1-D
    parameters and per-channel vectors stored as ``(1, C, 1, 1)`` are left alone.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        is_layer = models.layer_precision(module) is not None
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            if (is_layer and param_name == "weight") or sum(size > 1 for size in param.shape) >= 2:
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    # The precision tags name the latent binary weights: those are always perturbed.
    names.update(name for name, _ in models.latent_binary_parameters(model))
    return names


@torch.no_grad()
def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random direction in parameter space, filter-normalized as in Li et al. (2018).

    For every parameter of :func:`direction_parameter_names`, a standard Gaussian tensor
    (drawn from ``generator``, on the generator's device, in parameter order) whose
    filter ``i`` (slice ``[i]`` along dim 0) is rescaled to the norm of the weight's
    filter ``i``: ``d_i <- d_i / ||d_i|| * ||w_i||``. Every other parameter maps to zeros.
    The latent weights of binary layers are the parameters themselves, so their
    directions follow the latent (not the binarized) filter norms.

    Returns:
        A direction tensor for every named parameter of ``model``, on the parameter's device.
    """
    filtered = direction_parameter_names(model)
    directions: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name not in filtered:
            directions[name] = torch.zeros_like(param)
            continue
        noise = torch.randn(param.shape, generator=generator, device=generator.device, dtype=param.dtype)
        noise = noise.to(param.device)
        flat_noise = noise.reshape(noise.shape[0], -1)
        weight_norms = param.detach().reshape(param.shape[0], -1).norm(dim=1, keepdim=True)
        noise_norms = flat_noise.norm(dim=1, keepdim=True).clamp_min(_EPS)
        directions[name] = (flat_noise * (weight_norms / noise_norms)).reshape(param.shape)
    return directions


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Re-estimate the batch-norm running statistics on ``batches``, then leave them in eval mode.

    The statistics are reset and accumulated as a cumulative average (``momentum=None``),
    so the result does not depend on the order of the batches' contributions beyond their
    sizes. Only the batch norms are switched to train mode: dropout or drop-path in
    another model would make the estimate random. The caller restores the momenta.
    """
    norms = _batch_norms(model)
    if not norms:
        return
    device = _device_of(model)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for images, _ in batches:
            model(images.to(device))
    finally:
        for norm in norms:
            norm.eval()


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean cross-entropy over every image of ``batches`` (not the mean of the batch means)."""
    device = _device_of(model)
    total, count = 0.0, 0
    for images, targets in batches:
        logits = model(images.to(device))
        total += float(F.cross_entropy(logits.float(), targets.to(device), reduction="sum"))
        count += targets.numel()
    if count == 0:
        raise ValueError("no images to evaluate the loss on")
    return total / count


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def evaluate_grid(
    model: nn.Module,
    directions: Sequence[Mapping[str, torch.Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float] | None,
    batches: Sequence[Batch],
    *,
    recompute_bn: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """The mean loss at ``theta + alpha * d1`` (1-D) or ``theta + alpha * d1 + beta * d2`` (2-D).

    Args:
        model: the network; evaluated in eval mode. Its parameters, buffers, train/eval
            flags and batch-norm momenta are restored afterwards, even on error.
        directions: one direction (with ``betas=None``) or two, each a mapping from
            parameter names to tensors of the parameters' shapes (missing names and
            all-zero tensors leave that parameter unperturbed).
        alphas: steps along the first direction.
        betas: steps along the second direction, or None for a 1-D scan.
        batches: the fixed ``(images, targets)`` batches.
        recompute_bn: re-estimate the batch-norm statistics at every grid point
            (:func:`recompute_batch_norm`) before evaluating.
        progress: show a tqdm bar over the grid points.
        desc: the bar's label.

    Returns:
        Losses of shape ``(len(alphas),)`` for a 1-D scan, ``(len(alphas), len(betas))`` for 2-D
        (``losses[i, j]`` at ``alphas[i]``, ``betas[j]``).
    """
    if betas is None and len(directions) != 1:
        raise ValueError(f"a 1-D scan (betas=None) takes one direction, got {len(directions)}")
    if betas is not None and len(directions) != 2:
        raise ValueError(f"a 2-D scan takes two directions, got {len(directions)}")
    params = dict(model.named_parameters())
    unknown = sorted({name for direction in directions for name in direction} - params.keys())
    if unknown:
        raise ValueError(f"directions name parameters the model does not have: {unknown[:5]}")
    # Only parameters that some direction moves are touched at each point.
    moved = [name for name in params if any(name in d and bool(d[name].any()) for d in directions)]
    originals = {name: params[name].detach().clone() for name in moved}
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in _batch_norms(model)}
    steps_b = [0.0] if betas is None else list(betas)
    losses = np.empty((len(alphas), len(steps_b)), dtype=np.float64)
    bar = tqdm(total=losses.size, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        model.eval()
        for i, alpha in enumerate(alphas):
            for j, beta in enumerate(steps_b):
                with torch.no_grad():
                    for name in moved:
                        value = originals[name] + float(alpha) * directions[0][name].to(originals[name])
                        if betas is not None and name in directions[1]:
                            value = value + float(beta) * directions[1][name].to(originals[name])
                        params[name].copy_(value)
                if recompute_bn:
                    recompute_batch_norm(model, batches)
                losses[i, j] = mean_loss(model, batches)
                bar.update()
    finally:
        bar.close()
        with torch.no_grad():
            for name in moved:
                params[name].copy_(originals[name])
            named_buffers = dict(model.named_buffers())
            for name, value in buffers.items():
                named_buffers[name].copy_(value)
        for module, training in modes.items():
            module.training = training
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    return losses[:, 0] if betas is None else losses


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_batches(
    dataset: str,
    data_dir: str | Path,
    img_size: int,
    batches: int,
    batch_size: int,
    *,
    split: str = "val",
    crop_pct: float = 0.95,
    subset: str = "spread",
) -> tuple[list[Batch], list[str]]:
    """Fixed evaluation batches of a dataset, and its class names.

    Images get the evaluation transform of :func:`ImageNet.data.build_datasets` (also
    for ``split="train"``). ``subset="spread"`` takes ``batches * batch_size`` images at
    evenly spaced indices and deals them round-robin into the batches, so that every
    batch sees every class of a class-sorted ImageFolder; ``"first"`` takes the first
    images in order. Nothing is random.
    """
    if batches < 1 or batch_size < 1:
        raise DataError(f"--batches and --batch-size must be >= 1, got {batches} and {batch_size}")
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if subset not in ("spread", "first"):
        raise DataError(f"subset must be 'spread' or 'first', got {subset!r}")
    _, val_set, classes = build_datasets(
        dataset=dataset, data_dir=data_dir, img_size=img_size, crop_pct=crop_pct, auto_augment=None
    )
    source: Any = val_set
    if split == "train":
        # The training split, but with the evaluation transform: a landscape must not be random.
        if dataset == "folder":
            source = CheckedImageFolder(Path(data_dir) / "train", val_set.transform)
        else:
            source = type(val_set)(str(data_dir), train=True, transform=val_set.transform)
    size = len(source)
    count = min(batches * batch_size, size)
    if count == 0:
        raise DataError(f"the {split} split of {data_dir} is empty")
    n_batches = -(-count // batch_size)
    if subset == "spread":
        indices = [k * size // count for k in range(count)]
        groups = [indices[b::n_batches] for b in range(n_batches)]
    else:
        groups = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    out: list[Batch] = []
    for group in groups:
        samples = [source[index] for index in group]
        images = torch.stack([image for image, _ in samples])
        targets = torch.tensor([int(target) for _, target in samples], dtype=torch.long)
        out.append((images, targets))
    return out, list(classes)


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """A model to scan: its registry name and per-model options from ``NAME:key=value,...``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Legend and file label: the ``label`` option, else the name and its ablations."""
        if "label" in self.options:
            return str(self.options["label"])
        removed = [
            text
            for key, text in (("elm_attention", "no ELM-attention"), ("info_recoupling", "no info-recoupling"))
            if self.options.get(key) is False
        ]
        return f"{self.name} ({', '.join(removed)})" if removed else self.name


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``NAME`` or ``NAME:key=value,...`` (keys in :data:`SPEC_KEYS`)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"model spec {text!r} has no name")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_KEYS:
            raise ValueError(f"bad option {item!r} in model spec {text!r}; use key=value with keys {SPEC_KEYS}")
        value = value.strip()
        if key in ("elm_attention", "info_recoupling"):
            options[key] = _parse_bool(value)
        elif key in ("width_mult", "temperature"):
            options[key] = float(value)
        elif key == "stem" and value not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {value!r}")
        else:
            options[key] = value
    return ModelSpec(name, options)


def block_designs() -> Mapping[str, Any]:
    """``visualization.block_designs.DESIGNS`` when that module exists, else an empty mapping."""
    if importlib.util.find_spec("visualization.block_designs") is None:
        return {}
    module = importlib.import_module("visualization.block_designs")
    return getattr(module, "DESIGNS", {})


def checkpoint_config(path: str | Path | None) -> dict[str, Any]:
    """The ``config`` a training checkpoint (``last.pth``/``best.pth``) carries, or ``{}``."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if str(path).endswith(".safetensors"):
        return {}
    state = checkpointing.load(path)
    config = state.get("config") if isinstance(state, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else {}


def resolve_build_options(
    spec_options: Mapping[str, Any], cli_options: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """Options for :func:`models.create_model`: spec option > explicit flag > checkpoint config > default."""
    resolved: dict[str, Any] = {}
    for key in _BUILD_KEYS:
        for source in (spec_options, cli_options, config):
            if source.get(key) is not None:
                resolved[key] = source[key]
                break
    return resolved


class DesignNetwork(nn.Module):
    """A classifier made of one block design in a BNext macro layout.

    BNext's real-valued stem, then one ``design(in, out, stride)`` block per entry of
    :func:`models.bnext.block_layout`, then BNext's ``PReLU -> GAP -> Linear`` head, so
    that a landscape compares block designs under the same widths, strides and head.
    """

    def __init__(self, design: Any, channels: Sequence[int], num_classes: int, stem: str = "imagenet") -> None:
        super().__init__()
        self.channels = list(channels)
        self.stem = Stem(self.channels[0], 2 if stem == "imagenet" else 1)
        self.blocks = nn.Sequential(*(design(c_in, c_out, stride) for c_in, c_out, stride, _ in block_layout(channels)))
        self.prelu = nn.PReLU(self.channels[-1])
        self.fc = nn.Linear(self.channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, num_classes: int, options: Mapping[str, Any], layout: str | None = None) -> nn.Module:
    """A BNext network from :func:`models.create_model`, or a :class:`DesignNetwork` of a block design.

    A design name (a key of ``visualization.block_designs.DESIGNS``, when that module
    exists) is built in the channel layout of the BNext network ``layout`` (default
    BNext-T) with the ``stem``, ``width_mult`` and ``stage_channels`` of ``options``;
    the ablation switches do not apply to designs.
    """
    if name in models.list_models():
        return models.create_model(name, num_classes=num_classes, **options)
    designs = block_designs()
    if name in designs:
        layout = layout or DEFAULT_DESIGN_LAYOUT
        if layout not in models.list_models() or layout == "bnext18":
            raise ValueError(f"a design's layout must be one of bnext_tiny/small/middle/large, got {layout!r}")
        shape_options = {key: options[key] for key in ("stem", "width_mult", "stage_channels") if key in options}
        with torch.device("meta"):
            channels = models.create_model(layout, num_classes=num_classes, **shape_options).channels
        return DesignNetwork(designs[name], channels, num_classes, options.get("stem", "imagenet"))
    valid = [*models.list_models(), *designs]
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(valid)}")


def model_temperature(model: nn.Module) -> float | None:
    """The model's weight-binarization temperature, or None when it has no binary convolution."""
    try:
        return models.get_temperature(model)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Running a scan


@dataclass
class Landscape:
    """The result of one model's scan."""

    label: str
    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    centre_loss: float
    settings: dict[str, Any]

    def save(self, path: str | Path) -> None:
        """Write alphas, betas (empty for 1-D), losses, centre_loss and settings (JSON) to an ``.npz``."""
        np.savez(
            path,
            alphas=self.alphas,
            betas=self.betas if self.betas is not None else np.empty(0),
            losses=self.losses,
            centre_loss=np.float64(self.centre_loss),
            settings=np.array(json.dumps(self.settings, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Landscape:
        """Read a landscape written by :meth:`save` (to redraw it without recomputing)."""
        with np.load(path) as data:
            settings = json.loads(str(data["settings"]))
            betas = data["betas"] if data["betas"].size else None
            return cls(
                settings.get("label", Path(path).stem),
                data["alphas"],
                betas,
                data["losses"],
                float(data["centre_loss"]),
                settings,
            )


def scan(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    label: str,
    dim: int = 2,
    grid: int = 21,
    span: float = 1.0,
    seed: int = 0,
    temperature: float | None = None,
    recompute_bn: bool = False,
    progress: bool = False,
) -> Landscape:
    """Draw ``dim`` filter-normalized directions (seeded) and evaluate the loss on a ``grid`` per axis.

    The steps run over ``[-span, span]``. ``temperature`` (when given) is set on every
    binarizer for the scan and the old temperatures are restored afterwards; the centre
    loss is evaluated separately at the unperturbed weights with the same BN treatment.
    """
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    if grid < 2:
        raise ValueError(f"grid needs at least 2 points per axis, got {grid}")
    saved_temperatures = [module.temperature.detach().clone() for module in models.binarizers(model)]
    try:
        if temperature is not None:
            models.set_temperature(model, temperature)
        generator = torch.Generator().manual_seed(seed)
        directions = [filter_normalized_direction(model, generator) for _ in range(dim)]
        steps = np.linspace(-span, span, grid)
        betas = steps.copy() if dim == 2 else None
        losses = evaluate_grid(
            model, directions, steps, betas, batches, recompute_bn=recompute_bn, progress=progress, desc=label
        )
        zero = [0.0] if dim == 2 else None
        centre = float(np.ravel(evaluate_grid(model, directions, [0.0], zero, batches, recompute_bn=recompute_bn))[0])
        used_temperature = model_temperature(model)
    finally:
        with torch.no_grad():
            for module, saved in zip(models.binarizers(model), saved_temperatures):
                module.temperature.copy_(saved)
    perturbed = direction_parameter_names(model)
    latent = [name for name, _ in models.latent_binary_parameters(model)]
    settings = {
        "label": label,
        "dim": dim,
        "grid": grid,
        "range": span,
        "seed": seed,
        "temperature": used_temperature,
        "recompute_bn": recompute_bn,
        "images": int(sum(targets.numel() for _, targets in batches)),
        "batches": len(batches),
        "direction_rule": DIRECTION_RULE,
        "perturbed_parameters": len(perturbed),
        "perturbed_elements": int(sum(p.numel() for n, p in model.named_parameters() if n in perturbed)),
        "unperturbed_parameters": sum(1 for name, _ in model.named_parameters() if name not in perturbed),
        "latent_binary_parameters_perturbed": sum(1 for name in latent if name in perturbed),
    }
    return Landscape(label, steps, betas, losses, centre, settings)


# ---------------------------------------------------------------------------------------------------------------
# Figures


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_") or "model"


def _levels(landscapes: Sequence[Landscape], count: int = 24) -> tuple[np.ndarray, bool]:
    """Shared contour levels; logarithmic when the losses span more than a factor of 20."""
    low = min(float(np.nanmin(item.losses)) for item in landscapes)
    high = max(float(np.nanmax(item.losses)) for item in landscapes)
    if high <= low:
        high = low + 1e-6
    if low > 0 and high / low > 20:
        return np.geomspace(low, high, count), True
    return np.linspace(low, high, count), False


def _draw_contour(fig: Figure, ax: Any, item: Landscape, levels: np.ndarray, log: bool) -> Any:
    from matplotlib.colors import LogNorm

    x, y = np.meshgrid(item.alphas, item.betas, indexing="ij")
    norm = LogNorm(vmin=levels[0], vmax=levels[-1]) if log else None
    filled = ax.contourf(x, y, item.losses, levels=levels, cmap="viridis", norm=norm, extend="neither")
    lines = ax.contour(x, y, item.losses, levels=levels[::3], colors="white", linewidths=0.6, norm=norm)
    ax.clabel(lines, fontsize=7, fmt="%.3g")
    ax.plot([0], [0], marker="*", color="red", markersize=11, markeredgecolor="black", linestyle="none")
    ax.set_xlabel(r"$\alpha$ (direction 1)")
    ax.set_ylabel(r"$\beta$ (direction 2)")
    ax.set_title(_panel_title(item), fontsize=9)
    ax.set_aspect("equal")
    _few_ticks(ax)
    return filled


def _subtitle(item: Landscape, width_inches: float) -> str:
    """The settings every panel shares, wrapped to the figure width (the temperature is per panel)."""
    s = item.settings
    bn = "BN statistics re-estimated at every point" if s["recompute_bn"] else "BN statistics fixed"
    text = (
        f"filter-normalized random directions (Li et al. 2018), latent binary weights perturbed; "
        f"mean cross-entropy on {s['images']} images; {bn}; seed {s['seed']}"
    )
    # About 15 characters of 8-point text per inch; matplotlib's own wrap ignores the figure edge here.
    return textwrap.fill(text, width=max(40, int(15 * width_inches)))


def _panel_title(item: Landscape) -> str:
    temperature = item.settings.get("temperature")
    binarization = "no binary conv" if temperature is None else f"weight temperature T={temperature:.3g}"
    return f"{item.label}\n{binarization}, centre loss {item.centre_loss:.3f}"


def _few_ticks(ax: Any, count: int = 5) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(count))


def plot_line(landscapes: Sequence[Landscape], path: str | Path) -> None:
    """1-D losses of one or more models, overlaid, against the step ``alpha``."""
    fig = Figure(figsize=(7, 4.5 + 0.2 * len(landscapes)), layout="constrained")
    ax = fig.add_subplot()
    for item in landscapes:
        ax.plot(item.alphas, item.losses, marker="o", markersize=3, label=_panel_title(item).replace("\n", ": "))
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(r"$\alpha$ (step along a filter-normalized direction)")
    ax.set_ylabel("mean cross-entropy")
    if all(float(np.nanmin(item.losses)) > 0 for item in landscapes):
        high = max(float(np.nanmax(item.losses)) for item in landscapes)
        low = min(float(np.nanmin(item.losses)) for item in landscapes)
        if high / low > 20:
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.set_yscale("log")
            # Label 1-2-5 steps: with the default only the powers of ten carry numbers.
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.grid(True, alpha=0.3)
    # Below the axes, so that the legend never hides the curves.
    fig.legend(fontsize=8, loc="outside lower center")
    ax.set_title("1-D loss landscape", fontsize=11)
    fig.suptitle(_subtitle(landscapes[0], fig.get_figwidth()), fontsize=8)
    fig.savefig(path, dpi=110)


def plot_contours(landscapes: Sequence[Landscape], path: str | Path) -> None:
    """2-D contour maps side by side, with shared levels and one colour bar."""
    levels, log = _levels(landscapes)
    fig = Figure(figsize=(4.6 * len(landscapes) + 1.2, 5.6), layout="constrained")
    axes = [fig.add_subplot(1, len(landscapes), index + 1) for index in range(len(landscapes))]
    filled = None
    for ax, item in zip(axes, landscapes):
        filled = _draw_contour(fig, ax, item, levels, log)
    bar = fig.colorbar(filled, ax=axes, shrink=0.85)
    # A log colour bar only labels powers of ten by default: label some of the levels instead.
    ticks = levels[:: max(1, len(levels) // 6)]
    bar.set_ticks(ticks, labels=[f"{value:.3g}" for value in ticks])
    bar.set_label("mean cross-entropy" + (" (log scale)" if log else ""))
    fig.suptitle("2-D loss contours\n" + _subtitle(landscapes[0], fig.get_figwidth()), fontsize=8)
    fig.savefig(path, dpi=100)


def plot_surfaces(landscapes: Sequence[Landscape], path: str | Path) -> None:
    """3-D loss surfaces side by side, with a shared vertical range."""
    low = min(float(np.nanmin(item.losses)) for item in landscapes)
    high = max(float(np.nanmax(item.losses)) for item in landscapes)
    fig = Figure(figsize=(5.2 * len(landscapes), 4.8), layout="constrained")
    for index, item in enumerate(landscapes):
        ax = fig.add_subplot(1, len(landscapes), index + 1, projection="3d")
        x, y = np.meshgrid(item.alphas, item.betas, indexing="ij")
        ax.plot_surface(x, y, item.losses, cmap="viridis", vmin=low, vmax=high, linewidth=0, antialiased=True)
        ax.set_zlim(low, high if high > low else low + 1e-6)
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(r"$\beta$")
        ax.set_zlabel("loss")
        ax.tick_params(labelsize=7)
        _few_ticks(ax)
        ax.set_title(_panel_title(item), fontsize=9)
        ax.view_init(elev=30, azim=-60)
    fig.suptitle("3-D loss surfaces\n" + _subtitle(landscapes[0], fig.get_figwidth()), fontsize=8)
    fig.savefig(path, dpi=100)


def write_outputs(landscapes: Sequence[Landscape], out: str | Path) -> list[Path]:
    """Write every landscape's ``.npz`` and figures, and the comparison figure(s) for several; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    slugs: dict[str, int] = {}
    for item in landscapes:
        slug = _slug(item.label)
        slugs[slug] = slugs.get(slug, 0) + 1
        if slugs[slug] > 1:
            slug = f"{slug}_{slugs[slug]}"  # the same model twice (other checkpoint): keep both files
        item.settings["file_label"] = slug
        written.append(out / f"landscape_{slug}.npz")
        item.save(written[-1])
        if item.betas is None:
            written.append(out / f"line_{slug}.png")
            plot_line([item], written[-1])
        else:
            written.append(out / f"contour_{slug}.png")
            plot_contours([item], written[-1])
            written.append(out / f"surface_{slug}.png")
            plot_surfaces([item], written[-1])
    if len(landscapes) > 1:
        if landscapes[0].betas is None:
            written.append(out / "compare_line.png")
            plot_line(landscapes, written[-1])
        else:
            written.append(out / "compare_contour.png")
            plot_contours(landscapes, written[-1])
            written.append(out / "compare_surface.png")
            plot_surfaces(landscapes, written[-1])
    return written


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visualization.loss_landscape",
        description="Loss landscape along random filter-normalized directions (Li et al., 2018).",
    )
    parser.add_argument("--model", required=True, help="NAME[:key=value,...] (see the module docstring)")
    parser.add_argument("--checkpoint", help="weights for --model (a training checkpoint also supplies its config)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="NAME", help="more models for the same figure")
    model = parser.add_argument_group("model flags (shared by all models; default: checkpoint config, else factory)")
    model.add_argument("--stem", choices=("imagenet", "cifar"))
    model.add_argument("--width-mult", type=float)
    model.add_argument("--stage-channels", type=int, nargs="+")
    model.add_argument("--elm-attention", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--info-recoupling", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--num-classes", type=int, help="default: the number of classes in the data")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", required=True)
    data.add_argument("--dataset", choices=DATASETS, default="folder")
    data.add_argument("--img-size", type=int, help="default: the checkpoint's, else 32")
    data.add_argument("--crop-pct", type=float, help="evaluation crop fraction; default: the checkpoint's, else 0.95")
    data.add_argument("--split", choices=("val", "train"), default="val")
    data.add_argument("--subset", choices=("spread", "first"), default="spread")
    data.add_argument("--batches", type=int, default=2)
    data.add_argument("--batch-size", type=int, default=64)
    scan_group = parser.add_argument_group("scan")
    scan_group.add_argument("--out", required=True, help="output directory")
    scan_group.add_argument("--dim", type=int, choices=(1, 2), default=2)
    scan_group.add_argument("--grid", type=int, default=21, help="points per axis (odd keeps 0 on the grid)")
    scan_group.add_argument("--range", dest="span", type=float, default=1.0, help="steps run over [-range, range]")
    scan_group.add_argument("--seed", type=int, default=0, help="seeds the directions and freshly built weights")
    scan_group.add_argument("--temperature", type=float, help="binarization temperature (default: the model's)")
    scan_group.add_argument("--recompute-bn", action="store_true", help="re-estimate BN statistics at every point")
    scan_group.add_argument("--device", default="cpu")
    scan_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 2 for a data, model or checkpoint problem."""
    args = _parser().parse_args(argv)
    try:
        specs = [parse_model_spec(args.model), *(parse_model_spec(text) for text in args.compare)]
        if args.checkpoint:
            specs[0] = ModelSpec(specs[0].name, {"checkpoint": args.checkpoint, **specs[0].options})
        configs = [checkpoint_config(spec.options.get("checkpoint")) for spec in specs]
        # Data settings follow the first checkpoint that has a config unless given.
        config = next((c for c in configs if c), {})
        img_size = args.img_size or config.get("img_size") or 32
        crop_pct = args.crop_pct or config.get("crop_pct") or 0.95
        batches, classes = load_batches(
            args.dataset,
            args.data_dir,
            img_size,
            args.batches,
            args.batch_size,
            split=args.split,
            crop_pct=crop_pct,
            subset=args.subset,
        )
        num_classes = args.num_classes or len(classes)
        cli = {key: getattr(args, key) for key in _BUILD_KEYS}
        landscapes = []
        # A compared model without a checkpoint config of its own takes the shape (not the ablation
        # switches) of --model's checkpoint, so that a comparison runs at one width and stem.
        shape = {key: configs[0][key] for key in ("stem", "width_mult", "stage_channels") if key in configs[0]}
        for spec, spec_config in zip(specs, configs):
            options = resolve_build_options(spec.options, cli, spec_config or shape)
            # The same seed for every freshly built model: a comparison differs only by architecture.
            torch.manual_seed(args.seed)
            model = build_model(spec.name, num_classes, options, spec.options.get("layout"))
            if spec.options.get("checkpoint"):
                models.load_checkpoint(model, spec.options["checkpoint"])
            model.to(args.device)
            temperature = spec.options.get("temperature", args.temperature)
            landscape = scan(
                model,
                batches,
                label=spec.label,
                dim=args.dim,
                grid=args.grid,
                span=args.span,
                seed=args.seed,
                temperature=temperature,
                recompute_bn=args.recompute_bn,
                progress=not args.no_progress,
            )
            landscape.settings.update(
                model=spec.name,
                build_options=options,
                checkpoint=spec.options.get("checkpoint"),
                dataset=args.dataset,
                data_dir=str(args.data_dir),
                split=args.split,
                subset=args.subset,
                img_size=img_size,
                crop_pct=crop_pct,
                batch_size=args.batch_size,
            )
            print(f"{spec.label}: centre loss {landscape.centre_loss:.4f}, grid min {np.min(landscape.losses):.4f}")
            landscapes.append(landscape)
        for path in write_outputs(landscapes, args.out):
            print(path)
    except (DataError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
