"""Train an image classifier with PyTorch DDP: the whole training story, top to bottom.

    python train_ddp.py --train_dir data/train --val_dir data/val --use_amp      # one process
    torchrun --nproc_per_node=8 train_ddp.py --train_dir data/train ...          # eight
    python launch_ddp.py --num_gpus 2 --use_amp                                  # via torchrun

Where things live: flags in config.py; data in dataset.py (and image_cache.py, cache_file.py);
the order of samples in sampling.py; models in model.py; the recipe (optimizer, schedule, EMA) in
recipe.py; the run's pieces and their builder in training.py; the checkpoint schema and the run's
state in checkpoint.py; what may change on resume in resume.py; running sums and evaluation in
metrics.py; process group, collectives and signals in distributed.py.
"""
import os
import sys
import time
from contextlib import nullcontext

from config import parse_args, print_help_if_asked

if __name__ == "__main__":
    print_help_if_asked(sys.argv[1:])  # before torch loads, which takes seconds

import torch
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from tqdm import tqdm

from core.errors import USER_ERRORS, CheckpointError, ConfigError, TrainingError
from core.files import remove_quietly, write_json_atomic
from engine.checkpoint import (
    RunState,
    load_checkpoint,
    rng_state,
    set_aside_previous_run,
    top_k_filename,
    write_checkpoints,
)
from engine.distributed import (
    Stopped,
    StopRequest,
    broadcast_buffers,
    broadcast_object,
    gather_from_ranks,
    is_peer_loss,
    main_print,
    report_to_torchrun,
    setup_distributed,
    teardown_distributed,
)
from engine.losses import loss_weights
from engine.metrics import EpochSums, class_report, evaluate_classes
from engine.multilabel import evaluate_multilabel, multilabel_report
from engine.resume import resume_run
from engine.training import build_data, build_training, enter_epoch, settle
from model import unwrap


@record_errors  # torchrun's failure summary then names the failing rank's error
def main(argv=None):
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        return report_error(exc, rank=int(os.environ.get("RANK", 0)))
    ctx = setup_distributed(args.dist_timeout_minutes)
    try:
        return train(args, ctx, StopRequest())
    except USER_ERRORS as exc:
        return report_error(exc, ctx.rank)
    except Stopped as exc:
        main_print(ctx, f"Stopped by signal {exc.signum} while setting up; nothing was trained or saved.")
        return 128 + exc.signum
    except RuntimeError as exc:
        if not is_peer_loss(exc):
            raise
        return report_error("another process of this job stopped or failed (its own message says why), so "
                            "this one stops too", ctx.rank, exit_code=1, consequence=True)
    finally:
        teardown_distributed()


def report_error(exc, rank, exit_code=2, consequence=False):
    """One line per failing rank, no traceback: these are the user's input, not our bug. Under
    torchrun the line also goes to its failure summary."""
    message = str(exc).strip()
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep its last line
        message = message.splitlines()[-1].split(": ", 1)[-1]
    prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    report_to_torchrun(f"error: {message}", consequence)
    return exit_code


def train(args, ctx, stop):
    began = time.perf_counter()
    resume_path, checkpoint = find_checkpoint_to_resume(args)
    args, plan = settle(args, ctx, checkpoint, resume_path)  # read-only from here
    data = build_data(args, ctx)
    args = start_afresh(args, ctx, resume_path)
    class_weights = loss_weights(args, data.train_labels, data.class_names)
    training = build_training(args, ctx, len(data.class_names), len(data.train_loader), stop,
                              resuming=checkpoint is not None, class_weights=class_weights)
    state = resume_run(checkpoint, training, ctx.rank, plan, args) if checkpoint else RunState()
    if checkpoint:
        main_print(ctx, describe_resume(resume_path, state, plan.notes))
    state.global_batch = args.batch_size * ctx.world_size * args.gradient_accumulation_steps
    main_print(ctx, describe_setup(data, training, args, ctx))
    if args.num_sanity_val_steps and state.epoch == 0 and state.step == 0:
        evaluate_model(unwrap(training.model), training, data, args, ctx, max_batches=args.num_sanity_val_steps)
        main_print(ctx, f"Sanity check: validation ran on up to {args.num_sanity_val_steps} batch(es) per process.")

    stop.defer()  # from here a signal stops the run at a joint check, after a checkpoint
    exit_code = 0
    for epoch in range(state.epoch + 1, args.epochs + 1):
        epoch_start = time.perf_counter()
        sums = train_one_epoch(training, data, epoch, state, args, ctx)
        record, evaluated = validate(training, data, epoch, sums, args, ctx) if sums is not None else (None, None)
        if record is None:  # stopped by a signal, in training or validation: the steps trained are saved
            if sums is not None:
                save(training, state, data, ["checkpoint_latest.pth"], args, ctx, sums)
            main_print(ctx, f"Stopped by signal {stop.signal}: saved step {state.step} of epoch {epoch}"
                            f"{' (training done, validation not)' if sums is not None else ''} to "
                            f"{args.checkpoint_dir}/checkpoint_latest.pth; resume with --auto_resume")
            exit_code = 128 + stop.signal
            break
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        monitored = record[("ema_" if training.ema is not None else "") + args.monitor_metric]
        # --multi_label: each model's thresholds, tuned on this validation
        state.thresholds = getattr(evaluated[0], "thresholds", None)
        state.ema_thresholds = getattr(evaluated[-1], "thresholds", None) if training.ema is not None else None
        names, dropped = state.end_epoch(record, monitored, args)
        main_print(ctx, describe_epoch(record, state, args))
        save(training, state, data, names, args, ctx)
        finish_epoch_files(state, names, dropped, evaluated[-1], data.class_names, args, ctx)
        log_epoch(training.logger, record, epoch * training.steps_per_epoch)
        if state.should_stop_early(args):
            main_print(ctx, f"Early stopping: {args.monitor_metric} has not improved by more than "
                            f"{args.early_stopping_min_delta:g} for {state.stale_epochs} epochs.")
            break
        if stop.agreed(ctx.device):
            main_print(ctx, f"Stopped by signal {stop.signal} after epoch {epoch}; resume with --auto_resume")
            exit_code = 128 + stop.signal
            break
    training.logger.close(exit_code)  # a signal stop shows as not finished in wandb
    ending = describe_end(state, exit_code, time.perf_counter() - began, args)
    if ending:
        main_print(ctx, ending)
    return exit_code


def find_checkpoint_to_resume(args):
    """(path, checkpoint) of --resume, or of checkpoint_latest.pth with --auto_resume when there is
    one, loaded (settle checks it against this run's classes and flags); else (None, None)."""
    latest = os.path.join(args.checkpoint_dir, "checkpoint_latest.pth")
    path = args.resume or (latest if args.auto_resume and os.path.exists(latest) else None)
    if path is None:
        return None, None
    return path, load_checkpoint(path)


def start_afresh(args, ctx, resume_path):
    """A new run does not write over the results of the run before it: their files in --checkpoint_dir
    and --log_dir (checkpoints, exports of them, history, config) move to previous/<when it ended>/
    there, before this run writes anything, and one line says where. Nothing moves when this run
    continues the one in checkpoint_dir (resumes from there), in a torchrun restart (those files are
    this job's own: its first attempt moved the others aside) or with --fast_dev_run (writes nothing).
    Returns the settled configuration, with --pretrained_weights where they moved if they did."""
    continuing = resume_path is not None and (os.path.realpath(os.path.dirname(os.path.abspath(resume_path)))
                                              == os.path.realpath(args.checkpoint_dir))
    if continuing or args.fast_dev_run or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        return args
    moved, error = {}, None
    if ctx.is_main:
        try:
            moved = set_aside_previous_run(args.checkpoint_dir, args.log_dir)
        except CheckpointError as exc:
            error = str(exc)
    moved, error = broadcast_object((moved, error))  # no rank writes into the folders before the move
    if error:
        raise CheckpointError(error)
    if not moved:
        return args
    places = " and ".join(sorted({os.path.dirname(new) + "/" for new in moved.values()}))
    note = f"Note: this is a new run, so the previous run's files moved to {places}"
    latest = moved.get(os.path.join(args.checkpoint_dir, "checkpoint_latest.pth"))
    if latest:
        note += f" (to continue that run instead: --resume {latest})"
    relocated = {os.path.abspath(old): new for old, new in moved.items()}
    if args.pretrained_weights and os.path.abspath(args.pretrained_weights) in relocated:
        args = args.replaced(pretrained_weights=relocated[os.path.abspath(args.pretrained_weights)])  # read there
        note += f"; --pretrained_weights now reads {args.pretrained_weights}"
    main_print(ctx, note)
    return args


def train_one_epoch(training, data, epoch, state, args, ctx):
    """One pass over this rank's share of the epoch's global sample sequence, from position
    `state.samples_done` on (a mid-epoch resume, possibly on another layout: sampling.py).

    Gradients accumulate over micro-batches; only the last micro-batch of each group all-reduces
    them. Metrics stay on the device; the host syncs only at log points (--log_every_steps) and
    at the ranks' joint checks (Training.checks). Returns the epoch's running sums, or None when
    stopped by a signal (after a mid-epoch checkpoint).
    """
    enter_epoch(training, epoch, args, ctx)
    sampler, accumulation = data.train_loader.sampler, args.gradient_accumulation_steps
    state.epoch_samples = state.epoch_samples or training.batches_per_epoch * sampler.row  # kept across resumes
    sampler.set_epoch(epoch, start=state.samples_done, end=state.epoch_samples)
    batches_done = state.samples_done // sampler.row
    num_batches = batches_done + sampler.batches()
    sums, state.train_partial = EpochSums.resume(ctx.device, state.train_partial, ctx.rank, ctx.world_size), None
    trace = training.trace
    progress = tqdm(total=num_batches, initial=batches_done, desc=f"Epoch {epoch}/{args.epochs}",
                    disable=not ctx.is_main, leave=False, dynamic_ncols=True, mininterval=1.0)
    params = [p for group in training.optimizer.param_groups for p in group["params"]]
    training.optimizer.zero_grad(set_to_none=True)
    start, sums.seen_before = time.perf_counter(), sums.seen.item()
    shown = False  # whether the bar shows this epoch's loss yet
    for i, (images, labels, indices, skipped) in enumerate(data.train_loader, start=batches_done):
        group_start = i - i % accumulation
        group_size = min(accumulation, num_batches - group_start)  # the last group may be short
        is_update = i + 1 == group_start + group_size
        loss, pairs = forward_backward(training, images, labels, epoch, indices, skipped, group_size, is_update,
                                       sums, args, ctx)
        progress.update()
        if trace:
            trace.add(indices, pairs)
        if not is_update:
            continue
        state.step = update = i // accumulation + 1
        global_step = (epoch - 1) * training.steps_per_epoch + update
        grad_norm = optimizer_step(training, params, sums, global_step, args)
        state.samples_done = min((i + 1) * sampler.row, state.epoch_samples)
        last = state.samples_done == state.epoch_samples
        if trace:
            trace.write(epoch, update)
        logged = update % args.log_every_steps == 0 or last
        if ctx.is_main and (logged or not shown):  # the bar shows the loss from the epoch's first step on
            log_step(training.logger if logged else None, progress, loss, grad_norm, sums, global_step,
                     refresh=not shown)
            shown = True
        if training.checks.due(global_step, last) and stop_now(training, sums, epoch, update, args, ctx):
            save(training, state, data, ["checkpoint_latest.pth"], args, ctx, sums)
            progress.close()
            return None
        if args.save_every_steps and global_step % args.save_every_steps == 0 and not last:
            save(training, state, data, ["checkpoint_latest.pth"], args, ctx, sums)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    progress.close()
    sums.seconds = time.perf_counter() - start
    return sums


def forward_backward(training, images, labels, epoch, keys, skipped, group_size, is_update, sums, args, ctx):
    """One micro-batch: the batch stage's augmentation, forward under autocast, scaled backward,
    running sums. Returns (the loss, the mixed pairs' draw or None). Under mixing the targets are
    soft (the loss of probabilities, smoothed by --label_smoothing as hard labels are) and
    training accuracy counts the label with the larger share of each mixed image."""
    images, targets, pairs = training.stage.train_batch(images, labels, epoch, keys)
    # DDP decides whether to all-reduce during forward, so forward and backward both sit in no_sync.
    skip_sync = training.model.no_sync() if not is_update and ctx.distributed else nullcontext()
    with skip_sync:
        with torch.autocast(ctx.device.type, dtype=training.amp_dtype, enabled=args.use_amp):
            logits = training.model(images)
            loss = training.criterion(logits, targets)
        training.scaler.scale(loss / group_size).backward()
    sums.add_batch(loss, logits, targets if pairs is None or args.multi_label else targets.argmax(dim=1), skipped)
    return loss, pairs


def optimizer_step(training, params, sums, global_step, args):
    """Unscale once, clip, step (skipped on the device when the gradients are not finite), move
    the schedule on, and the EMA every --ema_steps global steps. Returns the gradient norm (before
    clipping) of `params`."""
    optimizer, scaler = training.optimizer, training.scaler
    scaler.unscale_(optimizer)  # clip true gradients, once per update
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, grad_norm)
    nonfinite = ~torch.isfinite(grad_norm)  # a NaN/Inf loss gives NaN/Inf gradients
    step_skipping_nonfinite(optimizer, scaler, nonfinite)
    optimizer.zero_grad(set_to_none=True)
    learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
    training.scheduler.step()
    if training.ema is not None and global_step % args.ema_steps == 0:
        training.ema.update_parameters(unwrap(training.model))
    sums.add_update(nonfinite, learning_rate)
    return grad_norm


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


def log_step(logger, progress, loss, grad_norm, sums, global_step, refresh=False):
    """Rank 0 at a log point: the step's metrics to the loggers (None: the progress bar only) and the
    progress bar (host syncs); `refresh` redraws the bar now rather than at its next update."""
    metrics = {"train/loss": loss.item(), "train/learning_rate": sums.learning_rate.item(),
               "train/grad_norm": grad_norm.item()}
    if logger is not None:
        logger.log(metrics, step=global_step)
    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                         acc=f"{100 * sums.correct.item() / sums.seen.item():.1f}%",
                         lr=f"{metrics['train/learning_rate']:.2e}", grad_norm=f"{metrics['train/grad_norm']:.3f}",
                         refresh=refresh)


def stop_now(training, sums, epoch, update, args, ctx):
    """The ranks' joint check: True when a signal asks to stop; an error after too many
    consecutive non-finite steps."""
    stop, streak = training.checks.run((epoch - 1) * training.steps_per_epoch + update, training.stop,
                                       sums.nonfinite_streak.item(), ctx.is_main)
    if streak >= args.max_nonfinite_steps:
        raise TrainingError(
            f"{args.max_nonfinite_steps} consecutive optimizer steps had a non-finite loss or gradient "
            f"({streak} in a row by epoch {epoch}, step {update}); lower --learning_rate, set --max_grad_norm, "
            f"or use --amp_dtype bfloat16; the last good checkpoint is in {args.checkpoint_dir}/")
    return stop


def validate(training, data, epoch, sums, args, ctx):
    """(record, evaluations): the epoch's record, its training metrics and exact validation of the
    model (and the EMA), top-5 included with more than 5 classes; and the evaluations, the model's
    then the EMA's (the last is the monitored one, as for best: its confusion matrix, or with
    --multi_label its per-class figures and tuned thresholds). (None, None) when the ranks stop on
    a signal meanwhile (the epoch's training is then saved as done)."""
    model = unwrap(training.model)
    broadcast_buffers(model)  # evaluate and save the statistics rank 0 saves
    evaluated = [evaluate_model(model, training, data, args, ctx, args.limit_val_batches, training.stop)]
    if training.ema is not None and evaluated[0] is not None:
        broadcast_buffers(training.ema.module)  # each rank averaged its own batch statistics
        evaluated.append(evaluate_model(training.ema.module, training, data, args, ctx, args.limit_val_batches,
                                        training.stop))
    if None in evaluated:
        return None, None
    record = dict(epoch=epoch, **sums.epoch_totals(), **evaluated[0].metrics("val_"))
    if training.ema is not None:
        record.update(evaluated[1].metrics("ema_val_"))
    return record, evaluated


def evaluate_model(model, training, data, args, ctx, max_batches=0, stop=None):
    """Exact validation of `model` on all ranks: one label per image (metrics.evaluate_classes, with
    --tta), or several (multilabel.evaluate_multilabel). None when stopped by a signal."""
    if args.multi_label:
        return evaluate_multilabel(model, data.val_loader, data.val_size, len(data.class_names), training, ctx,
                                   args.batch_size, args.use_amp, max_batches, stop=stop)
    return evaluate_classes(model, data.val_loader, data.val_size, training, ctx, args.batch_size, args.use_amp,
                            max_batches, stop=stop, tta=args.tta)


def save(training, state, data, names, args, ctx, sums=None):
    """Checkpoint the run under `names` on rank 0 (nothing with --fast_dev_run). Every rank calls
    it: RNG states and, mid-epoch, the running sums are gathered from all ranks."""
    rngs = gather_from_ranks(rng_state())
    partials = gather_from_ranks(sums.to_saved()) if sums is not None else None
    if ctx.is_main and not args.fast_dev_run:
        checkpoint = state.to_checkpoint(training, data.class_names, vars(args), rngs, partials)
        write_checkpoints(checkpoint, args.checkpoint_dir, names)
        # beside every checkpoint, not at the start: a run that fails before its first one leaves no file
        write_json_atomic(os.path.join(args.log_dir, "config.json"), vars(args))


def finish_epoch_files(state, names, dropped_top_k, evaluation, class_names, args, ctx):
    """Rank 0: delete the checkpoints that left the top k; rewrite the history file; with a new
    checkpoint_best.pth, write its per-class metrics and confusion matrix (the monitored model's)."""
    if not ctx.is_main or args.fast_dev_run:
        return
    for old_epoch in dropped_top_k:
        remove_quietly(os.path.join(args.checkpoint_dir, top_k_filename(old_epoch)))
    write_json_atomic(os.path.join(args.log_dir, "training_history.json"), state.history)
    if "checkpoint_best.pth" in names:
        weights = "ema" if args.use_ema else "model"
        report = (multilabel_report(evaluation, class_names, state.epoch, weights) if args.multi_label
                  else class_report(evaluation.confusion, class_names, state.epoch, weights))
        write_json_atomic(os.path.join(args.log_dir, "best_per_class.json"), report)


def log_epoch(logger, record, global_step):
    metrics = {"epoch": record["epoch"], "train/epoch_loss": record["train_loss"],
               "train/epoch_acc": record["train_acc"], "train/samples_per_second": record["samples_per_second"],
               "val/loss": record["val_loss"], "val/acc": record["val_acc"]}
    # top-5 with more than 5 classes; the EMA's with --use_ema
    optional = {"val_acc5": "val/acc5", "val_macro_f1": "val/macro_f1", "val_balanced_acc": "val/balanced_acc",
                "val_map": "val/map", "val_micro_f1": "val/micro_f1", "ema_val_map": "val/ema_map",
                "ema_val_micro_f1": "val/ema_micro_f1",
                "ema_val_loss": "val/ema_loss", "ema_val_acc": "val/ema_acc", "ema_val_acc5": "val/ema_acc5",
                "ema_val_macro_f1": "val/ema_macro_f1", "ema_val_balanced_acc": "val/ema_balanced_acc"}
    metrics.update({name: record[key] for key, name in optional.items() if key in record})
    logger.log(metrics, step=global_step)


def describe_resume(path, state, changes):
    partial = f" and {state.step} steps of epoch {state.epoch + 1}" if state.step else ""
    return (f"Resumed from {path}: epoch {state.epoch} done{partial}, best acc {state.best_acc:.2f}%"
            + "".join(f"; {change}" for change in changes))


def describe_setup(data, training, args, ctx):
    effective_batch = args.batch_size * ctx.world_size * args.gradient_accumulation_steps
    scaled = f" ({args.scale_lr}-scaled from {args.learning_rate:g})" if args.scale_lr != "none" else ""
    return (f"Training {args.model} on {data.train_size} images ({len(data.class_names)} classes), validating on "
            f"{data.val_size}; {ctx.describe()}; effective batch {effective_batch} ({args.batch_size} x "
            f"{ctx.world_size} processes x {args.gradient_accumulation_steps} accumulation), learning rate "
            f"{training.learning_rate:g}{scaled}")


def describe_epoch(record, state, args):
    line = (f"Epoch {record['epoch']}/{args.epochs} | train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.2f}% | val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}% ")
    if "val_acc5" in record:
        line += f"top-5 {record['val_acc5']:.2f}% "
    if "val_map" in record:  # --multi_label: acc is the exact-match accuracy
        line += f"mAP {record['val_map']:.2f}% micro-F1 {record['val_micro_f1']:.2f}% "
    line += f"macro-F1 {record['val_macro_f1']:.2f}% "
    if "val_balanced_acc" in record:
        line += f"bal. acc {record['val_balanced_acc']:.2f}% "
    if "ema_val_acc" in record:
        top5 = f", top-5 {record['ema_val_acc5']:.2f}%" if "ema_val_acc5" in record else ""
        line += f"(EMA {record['ema_val_loss']:.4f}, {record['ema_val_acc']:.2f}%{top5}) "
    line += (f"| best {args.monitor_metric} {monitored_value(state.best_metric, args)} | lr "
             f"{record['learning_rate']:.2e} | {record['epoch_seconds']:.1f} s, {record['samples_per_second']:.0f} "
             "img/s")
    if record["nonfinite_steps"]:
        line += f" | {record['nonfinite_steps']} non-finite steps skipped"
    if record["skipped_images"]:
        line += f" | {record['skipped_images']} unreadable images skipped"
    return line


def describe_end(state, exit_code, seconds, args):
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    if args.fast_dev_run:
        return f"fast_dev_run passed in {took}: one train and one val batch ran; no files written."
    if state.best_metric is None or exit_code != 0:
        return None
    best = f"best {args.monitor_metric} {monitored_value(state.best_metric, args)} at epoch {state.best_epoch}"
    if args.monitor_metric != "val_acc":
        best += f" (best val acc {state.best_acc:.2f}%)"
    return f"Done in {took}: {best}; checkpoints in {args.checkpoint_dir}/, history and config in {args.log_dir}/"


def monitored_value(value, args):
    return f"{value:.4g}" if args.monitor_metric == "val_loss" else f"{value:.2f}%"


if __name__ == "__main__":
    sys.exit(main())
