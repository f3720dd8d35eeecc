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
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, check_resumable, load_checkpoint, restore_rng_state,
                        rng_state, save_checkpoint, unwrap)
from config import ConfigError, parse_args
from dataset import DataError, build_datasets, build_loaders, normalize, prepare_digits_demo
from model import ModelError, build_model
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


def train(args, ctx, stop):
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if args.demo:
        args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    train_set, val_set, class_names = build_datasets(args)
    train_loader, val_loader = build_loaders(
        train_set, val_set, args.batch_size, args.num_workers, ctx.rank, ctx.world_size, args.seed,
        pin_memory=ctx.device.type == "cuda")

    model = build_model(args.model, len(class_names), args.pretrained_weights).to(ctx.device)
    # Fused AdamW skips an update on the device when told its gradients are not finite: no host sync.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=True)
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.use_amp and amp_dtype == torch.float16)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch * args.epochs)

    # Where the run stands: epochs completed, optimizer steps done in the next one, and the
    # running sums of that partial epoch (one row per rank), all restored on resume.
    run = dict(epoch=0, step=0, best_acc=0.0, history=new_history(), train_partial=None, rng=None)
    resume_path = find_resume_path(args)
    if resume_path:
        checkpoint = load_checkpoint(resume_path)
        check_resumable(checkpoint, resume_path, class_names, args.model)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scaler.load_state_dict(checkpoint["scaler_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        run.update({key: checkpoint.get(key, run[key]) for key in run})
        restore_rng_state(run["rng"][ctx.rank % len(run["rng"])])
        main_print(ctx, f"Resumed from {resume_path}: epoch {run['epoch']} done"
                        + (f" and {run['step']} steps of epoch {run['epoch'] + 1}" if run["step"] else "")
                        + f", best acc {run['best_acc']:.2f}%")

    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters, gradient_as_bucket_view=True)
    if args.use_amp and amp_dtype == torch.bfloat16 and ctx.device.type == "cpu" and ctx.is_main:
        warn_slow_cpu_bf16()

    def save(names, partial=None):
        """Checkpoint the run on rank 0. Every rank calls it: RNG states and partial sums are gathered."""
        rngs, partials = gather_from_ranks(rng_state()), gather_from_ranks(partial)
        if not ctx.is_main:
            return
        state = dict(model_state_dict=unwrap(model).state_dict(), optimizer_state_dict=optimizer.state_dict(),
                     scaler_state_dict=scaler.state_dict(), scheduler_state_dict=scheduler.state_dict(),
                     epoch=run["epoch"], step=run["step"], best_acc=run["best_acc"], class_names=class_names,
                     model_name=args.model, config=vars(args), history=run["history"], rng=rngs,
                     train_partial=partials if partial is not None else None)
        for name in names:
            save_checkpoint(state, os.path.join(args.checkpoint_dir, name))

    effective_batch = args.batch_size * ctx.world_size * args.gradient_accumulation_steps
    main_print(ctx, f"Training {args.model} on {len(train_set)} images ({len(class_names)} classes), "
                    f"validating on {len(val_set)}; {describe_processes(ctx)}, "
                    f"effective batch {effective_batch}, learning rate {args.learning_rate:g}")
    for epoch in range(run["epoch"] + 1, args.epochs + 1):
        epoch_start = time.perf_counter()
        train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, amp_dtype,
                                      epoch, run, save, stop, args, ctx)
        if train_stats is None:  # stopped by a signal; a mid-epoch checkpoint is saved
            main_print(ctx, f"Stopped by signal {stop.signal}: saved step {run['step']} of epoch {epoch} "
                            f"to {args.checkpoint_dir}/checkpoint_latest.pth; resume with --auto_resume")
            return 128 + stop.signal
        broadcast_buffers(unwrap(model))  # evaluate and save the statistics rank 0 saves
        val_loss, val_acc = evaluate(unwrap(model), val_loader, len(val_set), amp_dtype, args, ctx)
        epoch_record = dict(epoch=epoch, **train_stats, val_loss=val_loss, val_acc=val_acc,
                       epoch_seconds=time.perf_counter() - epoch_start)
        append_history(run["history"], epoch_record)
        is_best = val_acc > run["best_acc"]
        run.update(epoch=epoch, step=0, best_acc=max(run["best_acc"], val_acc))
        main_print(ctx, f"Epoch {epoch}/{args.epochs} | train loss {epoch_record['train_loss']:.4f} "
                        f"acc {epoch_record['train_acc']:.2f}% | val loss {val_loss:.4f} acc {val_acc:.2f}% "
                        f"(best {run['best_acc']:.2f}%) | lr {epoch_record['learning_rate']:.2e} | "
                        f"{epoch_record['epoch_seconds']:.1f} s, {epoch_record['samples_per_second']:.0f} img/s"
                        + (f" | {epoch_record['nonfinite_steps']} non-finite steps skipped"
                           if epoch_record["nonfinite_steps"] else ""))
        save(["checkpoint_latest.pth"] + (["checkpoint_best.pth"] if is_best else []))
        if ctx.is_main:
            write_json_atomic(os.path.join(args.log_dir, "training_history.json"), run["history"])
        if any_rank(stop.requested, ctx.device):
            main_print(ctx, f"Stopped by signal {stop.signal} after epoch {epoch}; resume with --auto_resume")
            return 128 + stop.signal
    main_print(ctx, f"Done: best val acc {run['best_acc']:.2f}%; checkpoints in {args.checkpoint_dir}/, "
                    f"history in {args.log_dir}/training_history.json")
    return 0


def find_resume_path(args):
    if args.resume:
        return args.resume
    latest = os.path.join(args.checkpoint_dir, "checkpoint_latest.pth")
    return latest if args.auto_resume and os.path.exists(latest) else None


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


def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp_dtype, epoch, run, save, stop, args, ctx):
    """One pass over this rank's shard, from optimizer step `run['step']` on (mid-epoch resume).

    Gradients accumulate over micro-batches; only the last micro-batch of each group all-reduces
    them. Metrics stay on the device: the host syncs only at logging points (every
    --log_every_steps), where the ranks also decide together whether to stop. Returns the epoch's
    metrics, or None when stopped by a signal (after a mid-epoch checkpoint).
    """
    model.train()
    device = ctx.device
    accumulation = args.gradient_accumulation_steps
    batches_done = run["step"] * accumulation
    loader.sampler.set_epoch(epoch, start=batches_done * args.batch_size)
    num_batches = batches_done + len(loader)  # the whole epoch's, for the grouping of micro-batches
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
        scheduler.step()
        sums[4] += nonfinite
        sums[5] = (sums[5] + 1) * nonfinite  # consecutive non-finite steps
        run["step"] = update = i // accumulation + 1
        if update % args.log_every_steps == 0 or update == num_updates:
            streak = int(sums[5].item())  # equal on every rank: gradients are all-reduced
            if streak >= args.max_nonfinite_steps:
                raise TrainingError(
                    f"{streak} consecutive optimizer steps had a non-finite loss or gradient (epoch {epoch}, "
                    f"step {update}); lower --learning_rate, set --max_grad_norm, or use --amp_dtype "
                    f"bfloat16; the last good checkpoint is in {args.checkpoint_dir}/")
            if ctx.is_main:
                progress.set_postfix(loss=f"{loss.item():.4f}", acc=f"{100 * sums[1].item() / sums[2].item():.1f}%",
                                     lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                     grad_norm=f"{grad_norm.item():.3f}", refresh=False)
            if any_rank(stop.requested, device):
                save(["checkpoint_latest.pth"], partial=sums.cpu())
                progress.close()
                return None
        global_step = (epoch - 1) * num_updates + update
        if args.save_every_steps and global_step % args.save_every_steps == 0 and update < num_updates:
            save(["checkpoint_latest.pth"], partial=sums.cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    progress.close()
    seen_timed = torch.tensor([sums[2].item() - seen_at_start], device=device, dtype=torch.float64)
    totals = all_reduce_sum(torch.cat([sums[:4], seen_timed]))
    loss_total, correct_total, seen_total, skipped_total, seen_timed = totals.tolist()
    return dict(train_loss=loss_total / seen_total, train_acc=100 * correct_total / seen_total,
                learning_rate=optimizer.param_groups[0]["lr"], samples_per_second=seen_timed / seconds,
                skipped_images=int(skipped_total), nonfinite_steps=int(sums[4].item()))


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
def evaluate(model, loader, dataset_size, amp_dtype, args, ctx):
    """Exact global loss and accuracy. Each rank fills its own samples' slots of dataset-sized
    vectors (its shard is indices rank, rank + world, ...); the all-reduce adds zeros elsewhere,
    so every rank ends with the same per-sample values a one-process run computes, summed in the
    same order. Runs on the unwrapped model on every rank: no collective inside the forward.
    Unreadable images skipped with --skip_bad_images are left out of both sums and the count."""
    model.eval()
    losses = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    hits = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    evaluated = torch.zeros(dataset_size, device=ctx.device, dtype=torch.float64)
    for images, labels, indices, _ in loader:
        images = normalize(images.to(ctx.device, non_blocking=True))
        labels = labels.to(ctx.device, non_blocking=True)
        indices = indices.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=args.use_amp):
            logits = model(images)
        losses[indices] = F.cross_entropy(logits.float(), labels, reduction="none").double()
        hits[indices] = (logits.argmax(dim=1) == labels).double()
        evaluated[indices] = 1
    for tensor in (losses, hits, evaluated):
        all_reduce_sum(tensor)
    count = max(evaluated.sum().item(), 1)
    return losses.sum().item() / count, 100 * hits.sum().item() / count


def warn_slow_cpu_bf16():
    warnings.warn("bfloat16 autocast on this CPU runs far slower than float32 (measured about 40x "
                  "for ResNet-18 on a CPU without native bf16 matrix units); drop --use_amp on CPU",
                  stacklevel=2)


if __name__ == "__main__":
    sys.exit(main())
