"""The training run: set up data, model, optimizer and logging, then loop over epochs.

``ImageNet/train.py`` is a thin wrapper around :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import models
from models.fused_ops import cpu_has_bf16_instructions

from . import checkpointing
from .checkpointing import CheckpointReadError, CheckpointWriteError
from .config import ConfigError, parse_args, resolved_config
from .data import CIFAR_MEAN, CIFAR_STD, DataError, build_datasets, build_loaders, build_mixup, skipped_images
from .distillation import DistillationLoss, RoundSchedule
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_flag, cleanup, init_distributed
from .engine import EPOCH_TOTALS, NonFiniteLossError, Trainer, evaluate, train_one_epoch
from .faults import fault_point
from .host_memory import apply_keep_freed_memory, huge_pages_requested, huge_pages_status, restart_with_huge_pages
from .losses import ClassificationLoss, TrainLoss
from .optim import TemperatureSchedule, build_optimizer, build_scheduler, conform_state_to_parameters
from .sync_batchnorm import convert_sync_batchnorm
from .teachers import TeacherError, load_teachers, parse_weight_files

LOG = logging.getLogger("bnext.train")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Ask torch for deterministic kernels (``--deterministic``).

    On the CPU the kernels used here are deterministic already; on CUDA this turns off
    cuDNN's autotuner and picks deterministic algorithms. An op without a deterministic
    CUDA kernel warns instead of stopping the run (``warn_only``).
    """
    # cuBLAS reads this when it creates its first handle; it must be set before any matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _setup_logging(output: Path, is_main: bool) -> None:
    LOG.handlers.clear()
    LOG.setLevel(logging.INFO if is_main else logging.WARNING)
    LOG.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    LOG.addHandler(console)
    if is_main:
        file_handler = logging.FileHandler(output / "log.txt")
        file_handler.setFormatter(formatter)
        LOG.addHandler(file_handler)


def _check_args(args: argparse.Namespace, info: DistInfo) -> None:
    if args.batch_size % info.world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} is the global batch and must be divisible by the "
            f"{info.world_size} processes; use a multiple of {info.world_size}"
        )
    if args.dataset == "folder" and not args.data_dir:
        raise ConfigError("--data-dir is required (a folder with train/<class>/ and val/<class>/ images)")
    if args.huge_pages and not huge_pages_requested():
        raise ConfigError(
            "--huge-pages takes effect when the process starts: run ImageNet/train.py with it, or set "
            "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before Python starts"
        )
    if not timm.is_model(args.model):
        raise ConfigError(
            f"unknown model {args.model!r}: use one of {', '.join(models.list_models())} or a timm model name"
        )
    # Missing files stop the run here, before the data, the model and the teachers are built.
    for name, path in parse_weight_files(args.teacher_weights).items():
        if not Path(path).is_file():
            raise ConfigError(f"--teacher-weights {name}={path}: teacher {name!r} weights file {path!r} does not exist")
    for flag, path in (("--resume", args.resume), ("--initial-checkpoint", args.initial_checkpoint)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: the file does not exist")
    if args.amp == "fp16" and info.device.type == "cpu":
        LOG.warning("fp16 autocast on the CPU is slow; bf16 is the CPU's mixed precision")
    if args.amp == "bf16" and info.device.type == "cpu" and not cpu_has_bf16_instructions():
        LOG.warning(
            "--amp bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX): oneDNN emulates bf16, so the "
            "binary convolutions that it computes in bf16 are unlikely to be faster than in float32. Compare "
            "both on this machine: python benchmarks/train_step.py --mode eager --mode bf16"
        )


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The network from the model flags (and ``--initial-checkpoint``).

    BNext names go through :func:`models.create_model` with the BNext flags; any other
    timm name (a full-precision teacher, say) through ``timm.create_model``.
    """
    if args.model in models.MODEL_NAMES:
        model = models.create_model(
            args.model,
            num_classes=num_classes,
            stem=args.stem,
            elm_attention=args.elm_attention,
            info_recoupling=args.info_recoupling,
            stage_channels=args.stage_channels,
            width_mult=args.width_mult,
            real_bits=args.real_bits,
        )
    else:
        LOG.info("%s is not a BNext model: the BNext flags (stem, widths, ablations) do not apply", args.model)
        model = timm.create_model(args.model, pretrained=False, num_classes=num_classes)
    if args.initial_checkpoint:
        try:
            models.load_checkpoint(model, args.initial_checkpoint)
        except models.CheckpointMismatchError:
            raise
        except ValueError as error:  # an unsafe or damaged file: the loader refused to unpickle it
            raise CheckpointReadError(f"--initial-checkpoint: {error}") from error
    return model


def build_loss(args: argparse.Namespace, num_classes: int, device: torch.device) -> TrainLoss:
    """Cross-entropy, or consecutive multi-teacher distillation when ``--teacher`` is given."""
    if not args.teacher:
        if args.assistant_teachers or args.teacher_weights:
            raise ConfigError("--assistant-teachers and --teacher-weights need a main teacher (--teacher NAME)")
        return ClassificationLoss(args.smoothing)
    try:
        schedule = RoundSchedule(args.teacher, args.assistant_teachers, args.epochs, args.round_starts)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    cifar = args.dataset.startswith("cifar")
    teachers = load_teachers(
        schedule.all_teachers(),
        num_classes=num_classes,
        weight_files=parse_weight_files(args.teacher_weights),
        device=device,
        student_mean=CIFAR_MEAN if cifar else IMAGENET_DEFAULT_MEAN,
        student_std=CIFAR_STD if cifar else IMAGENET_DEFAULT_STD,
        amp_dtype=AMP_DTYPES[args.amp],
        channels_last=args.channels_last,
    )
    LOG.info(
        "distillation: main teacher %s, rounds %s, weighting %s/%s, temperature %g, label weight %g",
        schedule.main,
        [(r.start_epoch, r.assistant) for r in schedule.rounds] or "none",
        args.kd_weighting,
        args.kd_sign,
        args.kd_temperature,
        args.kd_label_weight,
    )
    return DistillationLoss(
        teachers,
        schedule,
        temperature=args.kd_temperature,
        label_weight=args.kd_label_weight,
        weighting=args.kd_weighting,
        sign=args.kd_sign,
        label_smoothing=args.smoothing,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The trained network inside its DistributedDataParallel and torch.compile wrappers."""
    while True:
        # Not `a or b`: the truth value of a torch.compile wrapper is its len(), which a network lacks.
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _resume_path(args: argparse.Namespace, output: Path) -> Path | None:
    if args.resume:
        return Path(args.resume)
    last = output / checkpointing.LAST
    return last if args.auto_resume and last.is_file() else None


class Run:
    """State of one training run, with the checkpoint format in one place."""

    def __init__(self, args: argparse.Namespace, info: DistInfo) -> None:
        self.args = args
        self.info = info
        self.output = Path(args.output)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_top1 = 0.0
        self.history: list[dict[str, float]] = []
        self.last_save = time.monotonic()
        # the sums of the epoch in progress (engine.EPOCH_TOTALS); a resumed epoch continues them
        self.epoch_totals = torch.zeros(len(EPOCH_TOTALS), dtype=torch.float64)

    def state(self, trainer: Trainer, scheduler: Any, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        """Everything needed to continue exactly where the run is (collective: every process calls it).

        The RNG states of all processes are gathered, and a partial epoch's sums are
        summed over the processes, so that a resumed run continues as if uninterrupted.
        """
        rng = checkpointing.rng_state()
        rng_per_rank = [rng]
        totals = self.epoch_totals.clone()
        if self.info.distributed:
            rng_per_rank = [None] * self.info.world_size
            dist.all_gather_object(rng_per_rank, rng)
            totals = all_reduce_sum(totals.to(self.info.device)).cpu()
        return {
            "model": _unwrap(trainer.model).state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": trainer.global_step,
            "best_top1": self.best_top1,
            "history": self.history,
            "rng": rng,
            "rng_per_rank": rng_per_rank,
            "epoch_totals": totals if batch_in_epoch else torch.zeros_like(totals),
            "skipped_steps": trainer.skipped_steps,
            "config": resolved_config(self.args),
        }

    def save(self, trainer: Trainer, scheduler: Any, epoch: int, batch_in_epoch: int, best: bool = False) -> None:
        """Rank 0 writes ``last.pth`` (and ``best.pth``) atomically; a failed write stops every process.

        Every process must call it (the state is gathered from all of them).
        """
        _check_finite_weights(_unwrap(trainer.model), trainer.global_step)
        state = self.state(trainer, scheduler, epoch, batch_in_epoch)
        error: CheckpointWriteError | None = None
        if self.info.is_main:
            try:
                checkpointing.save_atomic(state, self.output / checkpointing.LAST)
                if best:
                    checkpointing.save_atomic(state, self.output / checkpointing.BEST)
            except CheckpointWriteError as failure:
                error = failure
        # The other processes learn of the failure here instead of waiting for rank 0 forever.
        if broadcast_flag(error is not None, self.info.device):
            raise error or CheckpointWriteError("process 0 could not write the checkpoint (see its message)")
        self.last_save = time.monotonic()

    def restore(self, path: Path, trainer: Trainer, scheduler: Any) -> None:
        """Load a checkpoint written by :meth:`save` into the live objects."""
        state = checkpointing.load(path)
        model = _unwrap(trainer.model)
        models.check_state_dict(model, state["model"])
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if conform_state_to_parameters(trainer.optimizer) and self.info.is_main:
            LOG.info("optimizer state copied into the parameters' memory layout (--channels-last changed on resume)")
        scheduler.load_state_dict(state["scheduler"])
        if trainer.scaler is not None and state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        if trainer.ema is not None and state.get("ema"):
            trainer.ema.module.load_state_dict(state["ema"])
        trainer.global_step = state["global_step"]
        trainer.skipped_steps = int(state.get("skipped_steps", 0))
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        totals = state.get("epoch_totals")
        # the saved sums cover all processes: rank 0 carries them, the end-of-epoch sum adds the rest
        if totals is not None and self.batch_in_epoch and self.info.is_main:
            self.epoch_totals = totals.to(torch.float64).clone()
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.info.world_size:
            checkpointing.set_rng_state(per_rank[self.info.rank])
        elif self.info.is_main:
            checkpointing.set_rng_state(state["rng"])
        LOG.info("resumed from %s at epoch %d, batch %d", path, self.epoch, self.batch_in_epoch)


def _check_finite_weights(model: nn.Module, global_step: int) -> None:
    """Raise NonFiniteLossError instead of saving weights that hold NaN or inf.

    A finite loss can still give non-finite gradients; this keeps such an update out
    of the checkpoints (the last one stays the last good one), at one host sync per save.
    """
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        return
    names = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    raise NonFiniteLossError(
        f"the weights hold NaN or inf after global step {global_step - 1} ({', '.join(names[:3])})"
    )


def _progress(total: int, epoch: int, is_main: bool) -> Any:
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)


def train(args: argparse.Namespace) -> dict[str, float]:
    """Run (or resume) training as configured; returns the final metrics."""
    info = init_distributed(args.device, args.cpu_threads)
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the output directory {str(output)!r}: {error}") from error
    _setup_logging(output, info.is_main)
    # Before the data loaders exist: their worker processes inherit the setting.
    LOG.info(apply_keep_freed_memory(args.keep_freed_memory))
    LOG.info(huge_pages_status())
    _check_args(args, info)
    if args.deterministic:
        use_deterministic_kernels()
    seed_everything(args.seed + info.rank)
    if info.is_main:
        # a run killed while writing a checkpoint leaves its temporary file; the checkpoint itself is whole
        for stale in checkpointing.remove_stale_temporaries(output):
            LOG.info("removed %s, the partial write of a run killed while saving", stale)

    train_set, val_set, classes = build_datasets(
        dataset=args.dataset,
        data_dir=args.data_dir,
        img_size=args.img_size,
        download=args.download,
        auto_augment=None if str(args.aa).lower() == "none" else args.aa,
        interpolation=args.interpolation,
        crop_pct=args.crop_pct,
        re_prob=args.reprob,
        hflip=args.hflip,
        scale=tuple(args.scale),
        skip_bad_images=args.skip_bad_images,
    )
    if args.num_classes is not None and args.num_classes != len(classes):
        raise ConfigError(f"--num-classes {args.num_classes} does not match the {len(classes)} classes in the data")
    num_classes = len(classes)
    train_loader, val_loader, sampler = build_loaders(
        train_set,
        val_set,
        batch_size=args.batch_size // info.world_size,
        workers=args.workers,
        world_size=info.world_size,
        rank=info.rank,
        seed=args.seed,
        repeated_aug=args.aug_repeats,
        pin_memory=args.pin_mem and info.device.type == "cuda",
        seeded_samples=args.deterministic,
    )

    model = build_model(args, num_classes).to(info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and info.distributed:
        model = convert_sync_batchnorm(model, info.device)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)
    optimizer = build_optimizer(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        binary_weight_decay=args.binary_weight_decay,
        betas=tuple(args.opt_betas),
        eps=args.opt_eps,
    )
    scheduler = build_scheduler(
        optimizer,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        steps_per_epoch=len(train_loader),
        on_updates=args.sched_on_updates,
    )
    core = model
    forward_model: nn.Module = model
    if args.compile:
        options = models.compile_options(info.device)
        LOG.info("torch.compile with inductor options %s (compiles at the first step)", options or "(defaults)")
        forward_model = torch.compile(model, options=options)
    if info.distributed:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        forward_model = DistributedDataParallel(forward_model, device_ids=device_ids)
    amp_dtype = AMP_DTYPES[args.amp]
    trainer = Trainer(
        model=forward_model,
        optimizer=optimizer,
        loss_fn=build_loss(args, num_classes, info.device),
        device=info.device,
        scheduler=scheduler,
        sched_on_updates=args.sched_on_updates,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(info.device.type) if args.amp == "fp16" else None,
        clip_grad=args.clip_grad,
        channels_last=args.channels_last,
        mixup=build_mixup(
            mixup=args.mixup,
            cutmix=args.cutmix,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
        ),
        ema=ema,
        constrained=core,
        nan_at_step=args.debug_nan_at_step,
        skip_nonfinite=args.skip_nonfinite,
    )
    temperature = TemperatureSchedule(args.temperature_start, args.temperature_decay)

    run = Run(args, info)
    resume = _resume_path(args, output)
    if resume is not None:
        run.restore(resume, trainer, scheduler)
    if info.is_main:
        _write_config(output / "config.yaml", resolved_config(args))
    writer = _tensorboard(output) if info.is_main else None
    LOG.info(
        "model %s: %d parameters (%d binary), %d classes, %d train / %d val images, %d process(es) on %s",
        args.model,
        sum(p.numel() for p in core.parameters()),
        sum(p.numel() for _, p in models.latent_binary_parameters(core)),
        num_classes,
        len(train_set),
        len(val_set),
        info.world_size,
        info.device,
    )

    final: dict[str, float] = {}
    try:
        if run.epoch >= args.epochs:
            LOG.info("training is already complete (%d epochs) in %s", args.epochs, output)
        for epoch in range(run.epoch, args.epochs):
            final = _run_epoch(
                run, trainer, scheduler, sampler, train_loader, val_loader, epoch, temperature, writer, train_set
            )
    finally:
        if writer is not None:
            writer.close()
        barrier()
    if not final and run.history:
        final = run.history[-1]
    LOG.info("final: %s", json.dumps({k: float(f"{v:.6g}") for k, v in final.items()}))
    return final


def _run_epoch(
    run, trainer, scheduler, sampler, train_loader, val_loader, epoch, temperature, writer, train_set
) -> dict:
    args, info = run.args, run.info
    start_batch = run.batch_in_epoch if epoch == run.epoch else 0
    if not start_batch:
        run.epoch_totals.zero_()
    steps_per_epoch = len(train_loader)  # before skip_next, which shortens the next pass
    sampler.set_epoch(epoch)
    if start_batch:
        sampler.skip_next(start_batch * train_loader.batch_size)
    models.set_temperature(_unwrap(trainer.model), temperature(epoch))
    if not args.sched_on_updates:
        scheduler.step(epoch)

    def after_step(batches_done: int) -> None:
        if trainer.skipped:
            LOG.warning(
                "skipped step %d (epoch %d, batch %d): non-finite loss or gradient, no update (--skip-nonfinite)",
                trainer.global_step - 1,
                epoch,
                batches_done - 1,
            )
        due = bool(args.checkpoint_steps) and trainer.global_step % args.checkpoint_steps == 0
        if not due:
            timed = (time.monotonic() - run.last_save) / 60 >= args.checkpoint_minutes
            # clocks differ between processes: rank 0 decides, so that all take part in the save
            due = broadcast_flag(timed, info.device) if info.distributed else timed
        if due and batches_done < steps_per_epoch:  # the epoch's end saves anyway
            run.save(trainer, scheduler, epoch, batches_done)
        fault_point("step", trainer.global_step)

    progress = _progress(steps_per_epoch - start_batch, epoch, info.is_main)
    totals = run.epoch_totals.to(info.device)
    run.epoch_totals = totals  # updated in place by train_one_epoch, read by checkpoints
    try:
        stats = train_one_epoch(
            trainer,
            train_loader,
            epoch,
            on_step=after_step,
            progress=progress,
            start_batch=start_batch,
            totals=totals,
            skipped_images=lambda: skipped_images(train_set),
        )
    finally:
        if progress is not None:
            progress.close()
    val = evaluate(
        trainer.model, val_loader, info.device, amp_dtype=trainer.amp_dtype, channels_last=args.channels_last
    )
    metrics = {
        "epoch": float(epoch),
        "train_loss": stats["loss"],
        "train_top1": stats["top1"],
        "train_top5": stats["top5"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_loss": val["loss"],
        "lr": trainer.optimizer.param_groups[1]["lr"],
        "temperature": temperature(epoch),
        "images_per_second": stats["images_per_second"] * info.world_size,
        "data_time": stats["data_time"],
        "skipped_steps": stats["skipped_steps"],
        "skipped_images": stats["skipped_images"],
    }
    if stats["skipped_steps"] or stats["skipped_images"]:
        LOG.warning(
            "epoch %d skipped %d step(s) with a non-finite loss or gradient and %d undecodable image(s)",
            epoch + 1,
            stats["skipped_steps"],
            stats["skipped_images"],
        )
    if isinstance(trainer.loss_fn, DistillationLoss):
        metrics["kd_round"] = float(trainer.loss_fn.schedule.round_index(epoch))
        for key, value in trainer.loss_fn.pop_epoch_stats().items():
            metrics[f"kd_weight_{key.replace(':', '_')}"] = value
        LOG.info("epoch %d teachers %s", epoch + 1, trainer.loss_fn.schedule.teachers(epoch))
    if trainer.ema is not None:
        ema_val = evaluate(trainer.ema.module, val_loader, info.device, amp_dtype=trainer.amp_dtype)
        metrics["val_ema_top1"] = ema_val["top1"]
    is_best = val["top1"] > run.best_top1
    run.best_top1 = max(run.best_top1, val["top1"])
    run.history.append(metrics)
    run.epoch_totals.zero_()
    run.save(trainer, scheduler, epoch + 1, 0, best=is_best)
    LOG.info(
        "epoch %d/%d  train loss %.4f  top-1 %.2f  val top-1 %.2f  top-5 %.2f  lr %.3g  T %.3g  %.0f img/s",
        epoch + 1,
        args.epochs,
        metrics["train_loss"],
        metrics["train_top1"],
        metrics["val_top1"],
        metrics["val_top5"],
        metrics["lr"],
        metrics["temperature"],
        metrics["images_per_second"],
    )
    if writer is not None:
        for key, value in metrics.items():
            if key != "epoch":
                writer.add_scalar(_tb_tag(key), value, epoch)
        writer.flush()
    return metrics


def _tb_tag(key: str) -> str:
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val", "kd") else f"train/{key}"


def _tensorboard(output: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output / "tensorboard"))


def _write_config(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse flags, train, and turn known failures into messages and exit codes."""
    args = parse_args(argv)
    try:
        if args.huge_pages:
            restart_with_huge_pages(from_command_line=argv is None)  # returns once the tunable is set
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(args)
    except (
        ConfigError,
        DataError,
        TeacherError,
        models.CheckpointMismatchError,
        CheckpointReadError,
        FileNotFoundError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(
            f"error: {error}; stopped without saving, the last checkpoint is the last good one "
            "(--skip-nonfinite skips such steps instead)",
            file=sys.stderr,
        )
        return 1
    except CheckpointWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0
