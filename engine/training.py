"""What one run is made of, its settled configuration, and the one builder of it (used by
train_ddp.py and bench/).

    args, _ = settle(parse_args(argv), ctx)
    data = build_data(args, ctx)
    training = build_training(args, ctx, len(data.class_names), len(data.train_loader))
"""
import argparse
import math
import os
import platform
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import InterpolationMode

from config import (
    PREPROCESSING_FLAGS,
    Settled,
    check_preprocessing,
    check_recipe_sizes,
    fill_crop_sizes,
    fill_preprocessing,
)
from core.errors import ModelError
from dataset import augmentation_policy, build_datasets, build_loaders, mixing_of, prepare_digits_demo, sequence_shape
from engine.batches import BatchStage, progressive_end_epoch, progressive_size
from engine.distributed import JointChecks, StopRequest, gather_from_ranks, main_print
from engine.loggers import RunLogger
from engine.losses import build_criterion
from engine.recipe import build_ema, build_optimizer, build_scheduler, scaled_learning_rate
from engine.resume import check_resumable, plan_resume
from fastload.device_decode import build_device_decoded_loaders
from fastload.image_cache import build_cached_loaders
from inputs.label_files import data_classes
from inputs.sampling import SampleTrace
from model import build_model, check_image_size, last_linear_name, pretrained_entry, pretrained_file, unwrap


@dataclass
class Data:
    train_loader: object   # yields (uint8 images, labels, indices, skipped) per batch
    val_loader: object     # this rank's unpadded validation shard, same batch form
    class_names: list
    train_size: int
    val_size: int
    train_labels: list = None  # each training image's class index (--class_weights balanced)


@dataclass
class Training:
    """The pieces one training run works with, built once by build_training."""
    model: torch.nn.Module          # what trains: possibly DDP- and torch.compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    amp_dtype: torch.dtype          # autocast's (torch.float32 when the run has no AMP: resolve_amp)
    stage: BatchStage               # every batch's way to the model: device, normalisation, memory format
    batches_per_epoch: int          # per process, after --limit_train_batches
    steps_per_epoch: int            # optimizer steps: batches over accumulation, rounded up
    learning_rate: float            # --learning_rate after --scale_lr
    logger: RunLogger
    stop: StopRequest
    checks: JointChecks
    trace: SampleTrace | None       # --trace_samples
    criterion: object = None        # (logits, targets) -> the training loss (losses.build_criterion)
    backbone_frozen: bool = False   # --freeze_backbone_epochs: set by enter_epoch


def settle(args, ctx, checkpoint=None, checkpoint_path=None):
    """The run's configuration: the parsed flags (config.parse_args, which fills the defaults the
    launcher checks) with every value derived from them resolved, once, in this order, and frozen
    (config.Settled):
    - the preprocessing: with --pretrained, the weights' own (resolve_preprocessing); a model that
      cannot take --image_size is refused before any data is read or written;
    - --demo: the digits written once, and their folders as --train_dir and --val_dir;
    - resuming `checkpoint` (read from checkpoint_path): the same classes and model
      (resume.check_resumable), then resume.plan_resume's accumulation that keeps its global batch
      and the AMP dtype it trained with;
    - the defaults left: one micro-batch per step, and autocast's dtype on this device (resolve_amp).
    `args` is left as parsed. Returns (the settled configuration, the ResumePlan or None)."""
    args = argparse.Namespace(**vars(args))  # resolved in a copy, frozen at the end
    resolve_preprocessing(args, ctx)
    fill_crop_sizes(args)
    check_recipe_sizes(args)
    for size in sorted({args.image_size, args.train_crop_size} | set(progressive_sizes(args))):
        check_image_size(args.model, size)  # every size the run will feed the model, the ramp's included
    if args.demo:
        args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    plan = None
    if checkpoint is not None:
        check_resumable(checkpoint, checkpoint_path, data_classes(args), args.model, args.multi_label)
        plan = plan_resume(checkpoint, checkpoint_path, args, ctx.world_size)
        args.gradient_accumulation_steps, args.amp_dtype = plan.gradient_accumulation_steps, plan.amp_dtype
    args.gradient_accumulation_steps = args.gradient_accumulation_steps or 1
    resolve_amp(args, ctx)
    return Settled(**vars(args)), plan


def build_data(args, ctx):
    """The datasets and their loaders, for a settled configuration (settle): image files (decoded
    by DataLoader workers, or on the device with --decode_on_device), or the decoded cache with
    --cache_images."""
    train_set, val_set, class_names = build_datasets(args, ctx.world_size)
    if args.cache_images:
        train_loader, val_loader = build_cached_loaders(train_set, val_set, args, ctx)
    elif args.decode_on_device:
        train_loader, val_loader = build_device_decoded_loaders(train_set, val_set, args, ctx)
    else:
        train_loader, val_loader = build_loaders(
            train_set, val_set, args.batch_size, args.num_workers, ctx.rank, ctx.world_size, args.seed,
            pin_memory=ctx.device.type == "cuda", **sequence_shape(args, train_set.targets))
    return Data(train_loader, val_loader, class_names, len(train_set), len(val_set), list(train_set.targets))


def build_training(args, ctx, num_classes, batches_in_loader, stop=None, logger=None, resuming=False,
                   class_weights=None):
    """Model (on the device, DDP- and compile-wrapped as asked), optimizer, schedule, scaler and EMA;
    `class_weights`: the training loss's per-class weights (losses.loss_weights) or None.

    `args` is the settled configuration (settle). Everything is built before any checkpoint is
    restored into it (resume.resume_run); a run that resumes does not fetch starting weights (the
    checkpoint's replace them)."""
    weights = None if resuming else starting_weights(ctx, args.model, args.pretrained, args.pretrained_weights)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.model, num_classes, weights)
    if args.sync_bn and ctx.device.type == "cuda" and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        main_print(ctx, "Note: --sync_bn needs several CUDA processes (PyTorch's SyncBatchNorm runs only on "
                        "GPUs); each process keeps its own BatchNorm statistics here.")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    learning_rate = scaled_learning_rate(args, ctx.world_size)
    optimizer = build_optimizer(model, args, learning_rate, head=model.get_submodule(last_linear_name(model)))
    amp_dtype = getattr(torch, args.amp_dtype) if args.use_amp else torch.float32  # settled: resolve_amp
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.use_amp and amp_dtype == torch.float16)
    batches_per_epoch = min(batches_in_loader, args.limit_train_batches or batches_in_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    ema = build_ema(model, args.ema_decay, warmup=args.ema_warmup) if args.use_ema else None
    model = wrap(model, ctx, args.find_unused_parameters, args.compile)
    trace = SampleTrace(args.log_dir, ctx) if args.trace_samples and not args.fast_dev_run else None
    stage = build_stage(args, ctx, num_classes, memory_format)
    criterion = build_criterion(args, class_weights, ctx.device)
    return Training(model, optimizer, scheduler, scaler, ema, amp_dtype, stage, batches_per_epoch,
                    steps_per_epoch, learning_rate, logger or RunLogger(args, ctx), stop or StopRequest(),
                    JointChecks(ctx.device), trace, criterion=criterion)


def progressive_sizes(args):
    """The training crop sizes of progressive resizing over the run's epochs (none without it)."""
    if not args.progressive_min_size:
        return []
    end = progressive_end_epoch(args.epochs, args.progressive_start_epoch, args.progressive_end_epoch)
    return [progressive_size(epoch, args.train_crop_size, args.progressive_min_size, args.progressive_start_epoch, end)
            for epoch in range(1, args.epochs + 1)]


def build_stage(args, ctx, num_classes, memory_format):
    """The run's batch stage: normalisation and layout, and the recipe's batch-level steps (the
    per-sample policy where the loader has not applied it: every path but the files')."""
    files = not (args.cache_images or args.decode_on_device)
    augmenting = not (args.no_augmentation or args.overfit_batches)
    progressive = None
    if args.progressive_min_size:
        end = progressive_end_epoch(args.epochs, args.progressive_start_epoch, args.progressive_end_epoch)
        progressive = (args.train_crop_size, args.progressive_min_size, args.progressive_start_epoch, end)
    return BatchStage(ctx.device, tuple(args.mean), tuple(args.std), memory_format, seed=args.seed,
                      num_classes=num_classes, policy=None if files else augmentation_policy(args),
                      random_erase=args.random_erase if augmenting else 0.0, mixing=mixing_of(args),
                      progressive=progressive)


def wrap(model, ctx, find_unused_parameters, compile):
    """The model as it trains: DDP across processes (it syncs the parameters that require gradients
    when it is built), then torch.compile if asked."""
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
    return torch.compile(model) if compile else model


def enter_epoch(training, epoch, args, ctx):
    """Training mode for `epoch`. During the first --freeze_backbone_epochs epochs only the head
    trains: the backbone's parameters take no gradient and its batch-norm statistics and dropout
    are frozen too (eval mode). When freezing starts or ends the model is wrapped anew, so DDP
    syncs exactly the parameters that train (no hang, no unsynced gradient)."""
    frozen = epoch <= args.freeze_backbone_epochs
    model = unwrap(training.model)
    head = model.get_submodule(last_linear_name(model))
    if frozen != training.backbone_frozen:
        head_parameters = set(head.parameters())
        for parameter in model.parameters():
            parameter.requires_grad_(not frozen or parameter in head_parameters)
        training.model, training.backbone_frozen = wrap(model, ctx, args.find_unused_parameters, args.compile), frozen
    training.model.train()
    if frozen:
        model.eval()
        head.train()


def starting_weights(ctx, model_name, pretrained, pretrained_weights):
    """--pretrained_weights, or the file of --pretrained: downloaded once per node, by its local
    rank 0, while the node's other ranks wait; a failure on any node is every rank's one line."""
    if not pretrained:
        return pretrained_weights
    entry = pretrained_entry(model_name, pretrained)
    error = None
    if ctx.local_rank == 0:
        try:
            pretrained_file(entry)
        except ModelError as exc:
            error = str(exc)
    failures = [failure for failure in gather_from_ranks(error) if failure]  # everyone waits for the downloads
    if failures:
        raise ModelError(failures[0])
    return pretrained_file(entry, download=False)


def resolve_preprocessing(args, ctx):
    """settle's step for the preprocessing flags, in the flags being settled. With --pretrained,
    the preprocessing flags not given take the weights' own values
    (torchvision's weights.transforms(): crop and resize sizes, mean, std; a crop size of your own
    keeps the weights' resize ratio), said in one line naming what you set. Without, config.py has
    already filled them in with the torchvision recipe's (224 px crops of 256 px, ImageNet's)."""
    if not args.pretrained or None not in (getattr(args, name) for name in PREPROCESSING_FLAGS):
        return
    entry = pretrained_entry(args.model, args.pretrained)
    given = [f"--{name}" for name in PREPROCESSING_FLAGS if getattr(args, name) is not None]
    own = entry.transforms()
    crop, resize = own.crop_size[0], own.resize_size[0]
    fill_preprocessing(args, crop, crop / resize, own.mean, own.std)
    check_preprocessing(args)
    resampling = ("" if own.interpolation == InterpolationMode.BILINEAR else
                  f"; resized bilinearly, where the weights were evaluated {own.interpolation.value}")
    main_print(ctx, f"Preprocessing: {args.image_size} px crops, evaluation images resized to {args.resize_size} px "
                    f"first, mean {args.mean}, std {args.std}: {entry}'s own"
                    + (f", except what you set ({', '.join(given)})" if given else "") + resampling)


def resolve_amp(args, ctx):
    """settle's step for the autocast dtype of this run, written in the flags being settled so that
    its checkpoints keep what ran (a resumed run inherits it: resume.plan_resume). --amp_dtype auto
    is float16 on GPUs; on a CPU, bfloat16 where the CPU has native bfloat16 instructions, else no
    AMP at all (args.use_amp becomes False): float16 autocast on a CPU, or bfloat16 without those
    instructions, is many times slower than float32. On a CPU one line says what was chosen, or
    what an explicit choice costs. Returns the torch dtype (float32 without AMP)."""
    if not args.use_amp:
        return torch.float32
    if ctx.device.type != "cpu":
        args.amp_dtype = "float16" if args.amp_dtype == "auto" else args.amp_dtype
        return getattr(torch, args.amp_dtype)
    native = cpu_has_native_bfloat16()
    if args.amp_dtype == "auto" and not native:
        args.use_amp = False
        main_print(ctx, "AMP: full precision (float32) on this CPU: it has no native bfloat16 instructions, and "
                        "float16 autocast is many times slower than float32 on a CPU (--amp_dtype forces either)")
        return torch.float32
    if args.amp_dtype == "auto":
        args.amp_dtype = "bfloat16"
        main_print(ctx, "AMP: bfloat16 autocast (this CPU has native bfloat16 instructions; float16 autocast is many "
                        "times slower than float32 on a CPU)")
    elif args.amp_dtype == "float16":
        main_print(ctx, "Warning: float16 autocast on a CPU runs 10-20x slower than float32 (ResNet-18); "
                        "--amp_dtype bfloat16 on a CPU with native bfloat16, or no --use_amp, avoids that")
    elif not native:
        main_print(ctx, "Warning: --amp_dtype bfloat16 on a CPU without native bfloat16 instructions: it is emulated "
                        "and runs far slower than float32 here (drop --use_amp on this CPU)")
    else:
        main_print(ctx, "AMP: bfloat16 autocast (this CPU has native bfloat16 instructions)")
    return getattr(torch, args.amp_dtype)


def cpu_has_native_bfloat16():
    """AVX512-BF16 or AMX on x86 (oneDNN's own check also counts plain AVX-512, which only emulates
    bfloat16); elsewhere oneDNN's check (Arm's BF16 extension)."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # private helpers of torch, absent from some builds
        return False
