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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, check_resumable, copy_checkpoint, load_checkpoint, remove_quietly, restore_rng_state,
                        rng_state, save_checkpoint, unwrap)
from config import ConfigError, parse_args
from dataset import DataError, build_datasets, build_loaders, normalize, prepare_digits_demo
from image_cache import build_cached_loaders
from loggers import RunLogger
from model import ModelError, build_model
from recipe import (build_ema, build_optimizer, build_scheduler, is_improvement, scaled_learning_rate,
                    top_k_filename, update_top_k)
from utils import (StopRequest, all_reduce_sum, any_rank, append_history, broadcast_buffers,
                   gather_from_ranks, main_print, new_history, setup_distributed, teardown_distributed,
                   write_json_atomic)


class TrainingError(RuntimeError):
    """Training cannot usefully go on (e.g. the loss keeps being NaN); the message says why."""


CLEAR_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, TrainingError)


@record_errors  # torchrun's failure summary then names the failing rank's error
def main(argv=None):
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        return report_error(exc, rank=int(os.environ.get("RANK", 0)))
    ctx = setup_distributed(args.dist_timeout_minutes)
    stop = StopRequest()
    try:
        return train(args, ctx, stop)
    except CLEAR_ERRORS as exc:
        return report_error(exc, ctx.rank)
    finally:
        teardown_distributed()


def report_error(exc, rank):
    """One line per failing rank, no traceback: these are the user's input, not our bug."""
    message = str(exc).strip()
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep its last line
        message = message.splitlines()[-1].split(": ", 1)[-1]
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    return 2


@dataclass
class Training:
    """The pieces one training run works with, built once by `train`."""
    model: torch.nn.Module          # what trains: possibly DDP- and torch.compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object                     # AveragedModel or None
    amp_dtype: torch.dtype
    memory_format: torch.memory_format
    batches_per_epoch: int          # per process, after --limit_train_batches
    logger: RunLogger
    stop: StopRequest
    save: object                    # save(names, partial=None): a collective call, rank 0 writes


def train(args, ctx, stop):
    began = time.perf_counter()
    if args.demo:
        args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    train_set, val_set, class_names = build_datasets(args, ctx.world_size)
    if args.cache_images:
        train_loader, val_loader = build_cached_loaders(train_set, val_set, args, ctx)
    else:
        train_loader, val_loader = build_loaders(
            train_set, val_set, args.batch_size, args.num_workers, ctx.rank, ctx.world_size, args.seed,
            pin_memory=ctx.device.type == "cuda")

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.model, len(class_names), args.pretrained_weights)
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
    batches_per_epoch = min(len(train_loader), args.limit_train_batches or len(train_loader))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    ema = build_ema(model, args.ema_decay) if args.use_ema else None

    # Where the run stands: epochs completed, optimizer steps done in the next one, the running
    # sums of that partial epoch (one row per rank), and the epoch-level decisions so far.
    run = dict(epoch=0, step=0, best_acc=0.0, best_metric=None, best_epoch=0, stale_epochs=0, top_k=[],
               history=new_history(), train_partial=None, rng=None)
    resume_path = find_resume_path(args)
    if resume_path:
        checkpoint = load_checkpoint(resume_path)
        check_resumable(checkpoint, resume_path, class_names, args.model)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if ema is not None and "ema_state_dict" in checkpoint:
            ema.module.load_state_dict(checkpoint["ema_state_dict"])
            ema.n_averaged.fill_(checkpoint["ema_num_averaged"])
        run.update({key: checkpoint.get(key, run[key]) for key in run})
        if run["rng"]:
            restore_rng_state(run["rng"][ctx.rank % len(run["rng"])])
        main_print(ctx, f"Resumed from {resume_path}: epoch {run['epoch']} done"
                        + (f" and {run['step']} steps of epoch {run['epoch'] + 1}" if run["step"] else "")
                        + f", best acc {run['best_acc']:.2f}%")

    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters, gradient_as_bucket_view=True)
    if args.compile:
        model = torch.compile(model)
    if args.use_amp and amp_dtype == torch.bfloat16 and ctx.device.type == "cpu" and ctx.is_main:
        warn_slow_cpu_bf16()
    writes_files = not args.fast_dev_run
    if writes_files and ctx.is_main:
        write_json_atomic(os.path.join(args.log_dir, "config.json"), vars(args))

    def save(names, partial=None):
        """Checkpoint the run on rank 0. Every rank calls it: RNG states and partial sums are gathered."""
        rngs, partials = gather_from_ranks(rng_state()), gather_from_ranks(partial)
        if not (ctx.is_main and writes_files):
            return
        state = dict(model_state_dict=unwrap(model).state_dict(), optimizer_state_dict=optimizer.state_dict(),
                     scaler_state_dict=scaler.state_dict(), scheduler_state_dict=scheduler.state_dict(),
                     class_names=class_names, model_name=args.model, config=vars(args), rng=rngs,
                     **{key: run[key] for key in run if key not in ("rng", "train_partial")},
                     train_partial=partials if partial is not None else None)
        if ema is not None:
            state.update(ema_state_dict=ema.module.state_dict(), ema_num_averaged=int(ema.n_averaged))
        first = os.path.join(args.checkpoint_dir, names[0])
        save_checkpoint(state, first)
        for name in names[1:]:  # best / top-k: the same bytes under another name
            copy_checkpoint(first, os.path.join(args.checkpoint_dir, name))

    logger = RunLogger(args, ctx)
    training = Training(model, optimizer, scheduler, scaler, ema, amp_dtype, memory_format, batches_per_epoch,
                        logger, stop, save)
    effective_batch = args.batch_size * ctx.world_size * args.gradient_accumulation_steps
    main_print(ctx, f"Training {args.model} on {len(train_set)} images ({len(class_names)} classes), "
                    f"validating on {len(val_set)}; {describe_processes(ctx)}; effective batch "
                    f"{effective_batch} ({args.batch_size} x {ctx.world_size} processes x "
                    f"{args.gradient_accumulation_steps} accumulation), learning rate {learning_rate:g}"
                    + (f" ({args.scale_lr}-scaled from {args.learning_rate:g})" if args.scale_lr != "none" else ""))
    if args.num_sanity_val_steps and run["epoch"] == 0 and run["step"] == 0:
        evaluate(unwrap(model), val_loader, len(val_set), training, args, ctx, max_batches=args.num_sanity_val_steps)
        main_print(ctx, f"Sanity check: validation ran on up to {args.num_sanity_val_steps} batch(es) per process.")

    exit_code = 0
    for epoch in range(run["epoch"] + 1, args.epochs + 1):
        epoch_start = time.perf_counter()
        train_stats = train_one_epoch(training, train_loader, epoch, run, args, ctx)
        if train_stats is None:  # stopped by a signal; a mid-epoch checkpoint is saved
            main_print(ctx, f"Stopped by signal {stop.signal}: saved step {run['step']} of epoch {epoch} "
                            f"to {args.checkpoint_dir}/checkpoint_latest.pth; resume with --auto_resume")
            exit_code = 128 + stop.signal
            break
        broadcast_buffers(unwrap(model))  # evaluate and save the statistics rank 0 saves
        val_loss, val_acc = evaluate(unwrap(model), val_loader, len(val_set), training, args, ctx)
        epoch_record = dict(epoch=epoch, **train_stats, val_loss=val_loss, val_acc=val_acc)
        if ema is not None:
            broadcast_buffers(ema.module)  # each rank averaged its own batch statistics
            epoch_record["ema_val_loss"], epoch_record["ema_val_acc"] = evaluate(
                ema.module, val_loader, len(val_set), training, args, ctx)
        epoch_record["epoch_seconds"] = time.perf_counter() - epoch_start
        append_history(run["history"], epoch_record)
        # Every rank holds the same all-reduced metrics, so these decisions agree without a collective.
        monitored = epoch_record[("ema_" if ema is not None else "") + args.monitor_metric]
        is_best = is_improvement(monitored, run["best_metric"], args.monitor_metric)
        improved = is_improvement(monitored, run["best_metric"], args.monitor_metric, args.early_stopping_min_delta)
        run.update(epoch=epoch, step=0, best_acc=max(run["best_acc"], epoch_record["val_acc"]),
                   stale_epochs=0 if improved else run["stale_epochs"] + 1)
        if is_best:
            run.update(best_metric=monitored, best_epoch=epoch)
        names = ["checkpoint_latest.pth"] + (["checkpoint_best.pth"] if is_best else [])
        if args.save_top_k:
            run["top_k"], entered, dropped = update_top_k(run["top_k"], args.save_top_k, epoch, monitored, args.monitor_metric)
            names += [top_k_filename(epoch)] if entered else []
        main_print(ctx, describe_epoch(epoch_record, run, args))
        save(names)
        if args.save_top_k and ctx.is_main and writes_files:
            for old_epoch in dropped:
                remove_quietly(os.path.join(args.checkpoint_dir, top_k_filename(old_epoch)))
        if ctx.is_main and writes_files:
            write_json_atomic(os.path.join(args.log_dir, "training_history.json"), run["history"])
        global_step = epoch * steps_per_epoch
        logger.log({"epoch": epoch, "train/epoch_loss": epoch_record["train_loss"],
                    "train/epoch_acc": epoch_record["train_acc"],
                    "train/samples_per_second": epoch_record["samples_per_second"],
                    "val/loss": val_loss, "val/acc": val_acc,
                    **({"val/ema_loss": epoch_record["ema_val_loss"], "val/ema_acc": epoch_record["ema_val_acc"]}
                       if ema is not None else {})}, step=global_step)
        if args.early_stopping_patience and run["stale_epochs"] >= args.early_stopping_patience:
            main_print(ctx, f"Early stopping: {args.monitor_metric} has not improved by more than "
                            f"{args.early_stopping_min_delta:g} for {run['stale_epochs']} epochs.")
            break
        if any_rank(stop.requested, ctx.device):
            main_print(ctx, f"Stopped by signal {stop.signal} after epoch {epoch}; resume with --auto_resume")
            exit_code = 128 + stop.signal
            break
    logger.close(exit_code)  # a signal stop shows as not finished in wandb
    seconds = time.perf_counter() - began
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    if not writes_files:
        main_print(ctx, f"fast_dev_run passed in {took}: one train and one val batch ran; no files written.")
    elif run["best_metric"] is not None and exit_code == 0:
        main_print(ctx, f"Done in {took}: best {args.monitor_metric} {run['best_metric']:.4g} at epoch "
                        f"{run['best_epoch']} (best val acc {run['best_acc']:.2f}%); checkpoints in "
                        f"{args.checkpoint_dir}/, history and config in {args.log_dir}/")
    return exit_code


def describe_epoch(record, run, args):
    line = (f"Epoch {record['epoch']}/{args.epochs} | train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2f}% | val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}% ")
    if "ema_val_acc" in record:
        line += f"(EMA {record['ema_val_loss']:.4f}, {record['ema_val_acc']:.2f}%) "
    line += (f"| best {args.monitor_metric} {run['best_metric']:.4g} | lr {record['learning_rate']:.2e} | "
             f"{record['epoch_seconds']:.1f} s, {record['samples_per_second']:.0f} img/s")
    if record["nonfinite_steps"]:
        line += f" | {record['nonfinite_steps']} non-finite steps skipped"
    if record["skipped_images"]:
        line += f" | {record['skipped_images']} unreadable images skipped"
    return line


def find_resume_path(args):
    if args.resume:
        return args.resume
    latest = os.path.join(args.checkpoint_dir, "checkpoint_latest.pth")
    return latest if args.auto_resume and os.path.exists(latest) else None


def describe_processes(ctx):
    if not ctx.distributed:
        return f"1 process on {ctx.device.type}"
    return f"{ctx.world_size} processes on {ctx.device.type} ({'nccl' if ctx.device.type == 'cuda' else 'gloo'})"


def train_one_epoch(training, loader, epoch, run, args, ctx):
    """One pass over this rank's shard, from optimizer step `run['step']` on (mid-epoch resume).

    Gradients accumulate over micro-batches; only the last micro-batch of each group all-reduces
    them. Metrics stay on the device: the host syncs only at logging points (every
    --log_every_steps), where the ranks also decide together whether to stop. Returns the epoch's
    metrics, or None when stopped by a signal (after a mid-epoch checkpoint).
    """
    model, optimizer, scaler, device = training.model, training.optimizer, training.scaler, ctx.device
    model.train()
    accumulation = args.gradient_accumulation_steps
    batches_done = run["step"] * accumulation
    loader.sampler.set_epoch(epoch, start=batches_done * args.batch_size)
    num_batches = training.batches_per_epoch  # the whole epoch's, for the grouping of micro-batches
    num_updates = math.ceil(num_batches / accumulation)
    # Running sums: loss, correct, seen, skipped images, non-finite steps (this epoch), non-finite streak.
    sums = torch.zeros(6, device=device, dtype=torch.float64)
    if run["train_partial"] is not None:
        sums += run["train_partial"][ctx.rank % len(run["train_partial"])].to(device)
        run["train_partial"] = None
    params = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(total=num_batches, initial=batches_done, desc=f"Epoch {epoch}/{args.epochs}",
                    disable=not ctx.is_main, leave=False, dynamic_ncols=True, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    seen_at_start = sums[2].item()
    for i, (images, labels, _, skipped) in enumerate(loader, start=batches_done):
        if i == num_batches:  # --limit_train_batches
            break
        images = to_model_input(images, device, training.memory_format)
        labels = labels.to(device, non_blocking=True)
        group_start = i - i % accumulation
        micro_steps_in_group = min(accumulation, num_batches - group_start)  # the last group may be short
        is_update = i + 1 == group_start + micro_steps_in_group
        # DDP decides whether to all-reduce during forward, so forward and backward both sit in no_sync.
        skip_sync = model.no_sync() if not is_update and ctx.distributed else nullcontext()
        with skip_sync:
            with torch.autocast(device.type, dtype=training.amp_dtype, enabled=args.use_amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            scaler.scale(loss / micro_steps_in_group).backward()
        sums[0] += loss.detach().double() * labels.numel()
        sums[1] += (logits.argmax(dim=1) == labels).sum()
        sums[2] += labels.numel()
        sums[3] += skipped
        progress.update()
        if not is_update:
            continue
        scaler.unscale_(optimizer)  # clip true gradients, once per update
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, grad_norm)
        nonfinite = ~torch.isfinite(grad_norm)  # a NaN/Inf loss gives NaN/Inf gradients
        step_skipping_nonfinite(optimizer, scaler, nonfinite)
        optimizer.zero_grad(set_to_none=True)
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        training.scheduler.step()
        if training.ema is not None:
            training.ema.update_parameters(unwrap(model))
        sums[4] += nonfinite
        sums[5] = (sums[5] + 1) * nonfinite  # consecutive non-finite steps
        run["step"] = update = i // accumulation + 1
        global_step = (epoch - 1) * num_updates + update
        if update % args.log_every_steps == 0 or update == num_updates:
            streak = int(sums[5].item())  # equal on every rank: gradients are all-reduced
            if streak >= args.max_nonfinite_steps:
                raise TrainingError(
                    f"{streak} consecutive optimizer steps had a non-finite loss or gradient (epoch {epoch}, "
                    f"step {update}); lower --learning_rate, set --max_grad_norm, or use --amp_dtype "
                    f"bfloat16; the last good checkpoint is in {args.checkpoint_dir}/")
            if ctx.is_main:
                metrics = {"train/loss": loss.item(), "train/learning_rate": step_lr,
                           "train/grad_norm": grad_norm.item()}
                training.logger.log(metrics, step=global_step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                                     acc=f"{100 * sums[1].item() / sums[2].item():.1f}%",
                                     lr=f"{metrics['train/learning_rate']:.2e}",
                                     grad_norm=f"{metrics['train/grad_norm']:.3f}", refresh=False)
            if any_rank(training.stop.requested, device):
                training.save(["checkpoint_latest.pth"], partial=sums.cpu())
                progress.close()
                return None
        if args.save_every_steps and global_step % args.save_every_steps == 0 and update < num_updates:
            training.save(["checkpoint_latest.pth"], partial=sums.cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    progress.close()
    seen_timed = torch.tensor([sums[2].item() - seen_at_start], device=device, dtype=torch.float64)
    totals = all_reduce_sum(torch.cat([sums[:4], seen_timed]))
    loss_total, correct_total, seen_total, skipped_total, seen_timed = totals.tolist()
    return dict(train_loss=loss_total / seen_total, train_acc=100 * correct_total / seen_total,
                learning_rate=step_lr, samples_per_second=seen_timed / seconds,
                skipped_images=int(skipped_total), nonfinite_steps=int(sums[4].item()))


def to_model_input(images, device, memory_format):
    """uint8 batch -> normalised float on the device, channels-last if asked (the model is too)."""
    return normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)


def step_skipping_nonfinite(optimizer, scaler, nonfinite):
    """Optimizer step that leaves the weights untouched when `nonfinite` is set, decided on the
    device. A float16 GradScaler does this itself; otherwise the fused optimizer reads `found_inf`
    (GradScaler's own contract with fused optimizers)."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return
    optimizer.found_inf = nonfinite.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@torch.no_grad()
def evaluate(model, loader, dataset_size, training, args, ctx, max_batches=None):
    """Exact global loss and accuracy. Each rank fills its own samples' slots of dataset-sized
    vectors (its shard is indices rank, rank + world, ...); the all-reduce adds zeros elsewhere,
    so every rank ends with the same per-sample values a one-process run computes, summed in the
    same order. Runs on the unwrapped model on every rank: no collective inside the forward.
    Images not evaluated (--limit_val_batches, unreadable with --skip_bad_images) are left out of
    both sums and the count."""
    model.eval()
    max_batches = max_batches or args.limit_val_batches or len(loader)
    losses = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    hits = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    evaluated = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    for batch_index, (images, labels, indices, _) in enumerate(loader):
        if batch_index == max_batches:
            break
        images = to_model_input(images, ctx.device, training.memory_format)
        labels = labels.to(ctx.device, non_blocking=True)
        indices = indices.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=training.amp_dtype, enabled=args.use_amp):
            logits = model(images)
        losses[indices] = F.cross_entropy(logits.float(), labels, reduction="none").double()
        hits[indices] = (logits.argmax(dim=1) == labels).double()
        evaluated[indices] = 1
    for tensor in (losses, hits, evaluated):
        all_reduce_sum(tensor)
    count = max(evaluated.sum().item(), 1)
    return losses.sum().item() / count, 100 * hits.sum().item() / count


def warn_slow_cpu_bf16():
    """bfloat16 autocast on a CPU without native bf16 instructions emulates them, far slower than
    float32; CPUs with AVX512-BF16 or AMX run it faster (see BENCHMARKS.md)."""
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    if not native:
        warnings.warn("this CPU has no native bfloat16 support: bfloat16 autocast runs far slower than "
                      "float32 here (about 40x measured for ResNet-18); drop --use_amp on this CPU",
                      stacklevel=2)


if __name__ == "__main__":
    sys.exit(main())
