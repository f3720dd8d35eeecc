"""Train an image classifier with PyTorch DDP: the whole training story, top to bottom.

    python train_ddp.py --train_dir data/train --val_dir data/val --use_amp      # one process
    torchrun --nproc_per_node=8 train_ddp.py --train_dir data/train ...          # eight
    python launch_ddp.py --num_gpus 2 --use_amp                                  # via torchrun
"""
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, check_resumable, load_checkpoint, save_checkpoint, unwrap
from config import ConfigError, parse_args
from dataset import DataError, build_datasets, build_loaders, normalize, prepare_digits_demo
from model import ModelError, build_model
from utils import (all_reduce_sum, broadcast_buffers, append_history, main_print, new_history, setup_distributed,
                   teardown_distributed, write_json_atomic)

CLEAR_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)


def main(argv=None):
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        return report_error(exc, rank=int(os.environ.get("RANK", 0)))
    ctx = setup_distributed()
    try:
        train(args, ctx)
        return 0
    except CLEAR_ERRORS as exc:
        return report_error(exc, ctx.rank)
    finally:
        teardown_distributed()


def report_error(exc, rank):
    """One line per failing rank, no traceback: these are the user's input, not our bug."""
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
    return 2


def train(args, ctx):
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if args.demo:
        args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    train_set, val_set, class_names = build_datasets(args)

    model = build_model(args.model, len(class_names), args.pretrained_weights).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.use_amp and amp_dtype == torch.float16)
    train_loader, val_loader = build_loaders(
        train_set, val_set, args.batch_size, args.num_workers, ctx.rank, ctx.world_size, args.seed,
        pin_memory=ctx.device.type == "cuda")
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch * args.epochs)

    start_epoch, best_acc, history = 1, 0.0, new_history()
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        check_resumable(checkpoint, args.resume, class_names, args.model)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        start_epoch, best_acc = checkpoint["epoch"] + 1, checkpoint["best_acc"]
        history = checkpoint["history"]
        main_print(ctx, f"Resumed from {args.resume}: epoch {checkpoint['epoch']} done, best acc {best_acc:.2f}%")

    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters, gradient_as_bucket_view=True)
    if args.use_amp and amp_dtype == torch.bfloat16 and ctx.device.type == "cpu" and ctx.is_main:
        warn_slow_cpu_bf16(ctx)

    effective_batch = args.batch_size * ctx.world_size * args.gradient_accumulation_steps
    main_print(ctx, f"Training {args.model} on {len(train_set)} images ({len(class_names)} classes), "
                    f"validating on {len(val_set)}; {describe_processes(ctx)}, "
                    f"effective batch {effective_batch}, learning rate {args.learning_rate:g}")
    for epoch in range(start_epoch, args.epochs + 1):
        epoch_start = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, amp_dtype,
                                      epoch, args, ctx)
        broadcast_buffers(unwrap(model))  # evaluate and save the statistics rank 0 saves
        val_loss, val_acc = evaluate(unwrap(model), val_loader, len(val_set), amp_dtype, args, ctx)
        record = dict(epoch=epoch, **train_stats, val_loss=val_loss, val_acc=val_acc,
                      epoch_seconds=time.perf_counter() - epoch_start)
        append_history(history, record)
        is_best = val_acc > best_acc
        best_acc = max(best_acc, val_acc)
        main_print(ctx, f"Epoch {epoch}/{args.epochs} | train loss {record['train_loss']:.4f} "
                        f"acc {record['train_acc']:.2f}% | val loss {val_loss:.4f} acc {val_acc:.2f}% "
                        f"(best {best_acc:.2f}%) | lr {record['learning_rate']:.2e} | "
                        f"{record['epoch_seconds']:.1f} s, {record['samples_per_second']:.0f} img/s")
        if ctx.is_main:
            state = dict(model_state_dict=unwrap(model).state_dict(),
                         optimizer_state_dict=optimizer.state_dict(),
                         scaler_state_dict=scaler.state_dict(),
                         scheduler_state_dict=scheduler.state_dict(),
                         epoch=epoch, best_acc=best_acc, class_names=class_names, model_name=args.model,
                         config=vars(args), history=history)
            save_checkpoint(state, os.path.join(args.checkpoint_dir, "checkpoint_latest.pth"))
            if is_best:
                save_checkpoint(state, os.path.join(args.checkpoint_dir, "checkpoint_best.pth"))
            write_json_atomic(os.path.join(args.log_dir, "training_history.json"), history)
    main_print(ctx, f"Done: best val acc {best_acc:.2f}%; checkpoints in {args.checkpoint_dir}/, "
                    f"history in {args.log_dir}/training_history.json")


def describe_processes(ctx):
    if not ctx.distributed:
        return f"1 process on {ctx.device.type}"
    return f"{ctx.world_size} processes on {ctx.device.type} ({'nccl' if ctx.device.type == 'cuda' else 'gloo'})"


def build_scheduler(optimizer, args, total_steps):
    """Linear warm-up, then cosine decay to zero (or constant), stepped once per optimizer step."""
    warmup = min(args.warmup_steps, max(total_steps - 1, 0))
    if args.lr_scheduler == "cosine":
        main_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    else:
        main_schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main_schedule
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main_schedule], milestones=[warmup])


def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp_dtype, epoch, args, ctx):
    """One pass over this rank's shard. Gradients are accumulated over micro-batches; only the
    last micro-batch of each group all-reduces them. Metrics stay on the device: the host syncs
    only at logging points and at the end of the epoch."""
    model.train()
    device = ctx.device
    accumulation = args.gradient_accumulation_steps
    num_batches = len(loader)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(total=num_batches, desc=f"Epoch {epoch}/{args.epochs}", disable=not ctx.is_main,
                    leave=False, dynamic_ncols=True, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        images = normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        group_start = i - i % accumulation
        micro_steps_in_group = min(accumulation, num_batches - group_start)  # the last group may be short
        is_update = i + 1 == group_start + micro_steps_in_group
        # DDP decides whether to all-reduce during forward, so forward and backward both sit in no_sync.
        skip_sync = model.no_sync() if isinstance(model, DDP) and not is_update else nullcontext()
        with skip_sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.use_amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            scaler.scale(loss / micro_steps_in_group).backward()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.numel()
        if is_update:
            scaler.unscale_(optimizer)  # clip true gradients, once per update
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            update_index = (i // accumulation) + 1
            if ctx.is_main and update_index % args.log_every_steps == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}", acc=f"{100 * correct.item() / seen.item():.1f}%",
                                     lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                     grad_norm=f"{grad_norm.item():.3f}", refresh=False)
        progress.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    progress.close()
    totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), seen.double()]))
    loss_total, correct_total, seen_total = totals.tolist()
    return dict(train_loss=loss_total / seen_total, train_acc=100 * correct_total / seen_total,
                learning_rate=optimizer.param_groups[0]["lr"], samples_per_second=seen_total / seconds)


@torch.no_grad()
def evaluate(model, loader, dataset_size, amp_dtype, args, ctx):
    """Exact global loss and accuracy. Each rank fills its own samples' slots of a dataset-sized
    vector (its shard is indices rank, rank + world, ...); the all-reduce adds zeros elsewhere,
    so every rank ends with the same per-sample values a one-process run computes, summed in the
    same order. Runs on the unwrapped model on every rank: no collective inside the forward."""
    model.eval()
    losses = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    hits = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    position = ctx.rank
    for images, labels in loader:
        images = normalize(images.to(ctx.device, non_blocking=True))
        labels = labels.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=args.use_amp):
            logits = model(images)
        slots = torch.arange(position, position + ctx.world_size * len(labels), ctx.world_size,
                             device=ctx.device)
        losses[slots] = F.cross_entropy(logits.float(), labels, reduction="none").double()
        hits[slots] = (logits.argmax(dim=1) == labels).double()
        position += ctx.world_size * len(labels)
    all_reduce_sum(losses)
    all_reduce_sum(hits)
    return losses.sum().item() / dataset_size, 100 * hits.sum().item() / dataset_size


def warn_slow_cpu_bf16(ctx):
    warnings.warn("bfloat16 autocast on this CPU runs far slower than float32 (measured about 40x "
                  "for ResNet-18 on a CPU without native bf16 matrix units); drop --use_amp on CPU",
                  stacklevel=2)


if __name__ == "__main__":
    sys.exit(main())
