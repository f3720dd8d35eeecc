"""What one run is made of, and the one builder of it (used by train_ddp.py and bench/).

    data = build_data(args, ctx)
    training = build_training(args, ctx, len(data.class_names), len(data.train_loader))
"""
import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dataset import build_datasets, build_loaders, prepare_digits_demo
from distributed import JointChecks, StopRequest, main_print
from image_cache import build_cached_loaders
from loggers import RunLogger
from model import build_model, check_image_size
from recipe import build_ema, build_optimizer, build_scheduler, scaled_learning_rate
from sampling import SampleTrace


@dataclass
class Data:
    train_loader: object   # yields (uint8 images, labels, indices, skipped) per batch
    val_loader: object     # this rank's unpadded validation shard, same batch form
    class_names: list
    train_size: int
    val_size: int


@dataclass
class Training:
    """The pieces one training run works with, built once by build_training."""
    model: torch.nn.Module          # what trains: possibly DDP- and torch.compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    amp_dtype: torch.dtype
    memory_format: torch.memory_format
    batches_per_epoch: int          # per process, after --limit_train_batches
    steps_per_epoch: int            # optimizer steps: batches over accumulation, rounded up
    learning_rate: float            # --learning_rate after --scale_lr
    logger: RunLogger
    stop: StopRequest
    checks: JointChecks
    trace: SampleTrace | None       # --trace_samples


def build_data(args, ctx):
    """The datasets and their loaders: image files, or the decoded cache with --cache_images. A
    model that cannot take --image_size is refused first, before any data is read or written."""
    check_image_size(args.model, args.image_size)
    if args.demo:
        args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    train_set, val_set, class_names = build_datasets(args, ctx.world_size)
    if args.cache_images:
        train_loader, val_loader = build_cached_loaders(train_set, val_set, args, ctx)
    else:
        train_loader, val_loader = build_loaders(
            train_set, val_set, args.batch_size, args.num_workers, ctx.rank, ctx.world_size, args.seed,
            pin_memory=ctx.device.type == "cuda")
    return Data(train_loader, val_loader, class_names, len(train_set), len(val_set))


def build_training(args, ctx, num_classes, batches_in_loader, stop=None, logger=None):
    """Model (on the device, DDP- and compile-wrapped as asked), optimizer, schedule, scaler and EMA.

    Everything is built before any checkpoint is restored into it (RunState.restore)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.model, num_classes, args.pretrained_weights)
    if args.sync_bn and ctx.device.type == "cuda" and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        main_print(ctx, "Note: --sync_bn needs several CUDA processes (PyTorch's SyncBatchNorm runs only on "
                        "GPUs); each process keeps its own BatchNorm statistics here.")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    learning_rate = scaled_learning_rate(args, ctx.world_size)
    optimizer = build_optimizer(model, args, learning_rate)
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.use_amp and amp_dtype == torch.float16)
    batches_per_epoch = min(batches_in_loader, args.limit_train_batches or batches_in_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    ema = build_ema(model, args.ema_decay) if args.use_ema else None
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters, gradient_as_bucket_view=True)
    if args.compile:
        model = torch.compile(model)
    if args.use_amp and amp_dtype == torch.bfloat16 and ctx.device.type == "cpu" and ctx.is_main:
        warn_slow_cpu_bf16()
    trace = SampleTrace(args.log_dir, ctx) if args.trace_samples and not args.fast_dev_run else None
    return Training(model, optimizer, scheduler, scaler, ema, amp_dtype, memory_format, batches_per_epoch,
                    steps_per_epoch, learning_rate, logger or RunLogger(args, ctx), stop or StopRequest(),
                    JointChecks(ctx.device), trace)


def warn_slow_cpu_bf16():
    """bfloat16 autocast on a CPU without native bf16 instructions emulates them, far slower than
    float32; CPUs with AVX512-BF16 or AMX run it faster (see BENCHMARKS.md)."""
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    if not native:
        warnings.warn("this CPU has no native bfloat16 support: bfloat16 autocast runs far slower than "
                      "float32 here (drop --use_amp on this CPU; BENCHMARKS.md has the measurement)",
                      stacklevel=2)
