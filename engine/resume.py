"""The resume contract: what a user may change between runs, and what happens when they do.

Every change either continues exactly, is applied with a line that says so, or is refused in one
line that names the flag and the way out; nothing changes silently. README's "Fault tolerance"
section has the same contract as a table.

- Continued exactly: the number of processes, --batch_size and --gradient_accumulation_steps, as
  long as the global batch (batch x processes x accumulation) is kept. Accumulation adapts by
  itself when the flag is not given; the run continues at the exact next sample of the epoch's
  global sequence (sampling.py).
- Re-planned: --epochs (the schedule's horizon follows it: a cosine anneals to zero at the new
  last epoch).
- Kept: the AMP dtype a run trained with, when --amp_dtype is not given (auto), as the
  accumulation is.
- Applied from the next step, with a note: the flags in APPLIED (weight decay, clipping, ...).
- Refused unless the part is explicitly started afresh: another optimizer (--reset_optimizer),
  another schedule or peak rate (--reset_lr_schedule), another --backbone_lr_scale (both), another
  monitored metric (--reset_best), another seed in the middle of an epoch, another global batch.
"""
from core.errors import ConfigError
from engine.recipe import restart_scheduler
from inputs.augment import GENERATOR

RESETTABLE = {  # flag whose change needs the reset, the part it restarts, and what the reset does
    "optimizer": ("reset_optimizer", "optimizer", "start the optimizer's state (moments) afresh"),
    "lr_scheduler": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "warmup_steps": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "learning_rate": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "scale_lr": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "lr_step_epochs": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "lr_gamma": ("reset_lr_schedule", "lr_schedule", "start a new schedule over the remaining epochs"),
    "monitor_metric": ("reset_best", "best", "forget the best value, top-k and early-stopping count"),
}
APPLIED = ("freeze_backbone_epochs", "weight_decay", "momentum", "max_grad_norm", "label_smoothing", "use_ema",
           "ema_decay", "use_amp", "amp_dtype", "image_size", "resize_size", "mean", "std", "cache_format",
           "cache_quality", "decode_on_device", "min_crop_scale", "hflip_prob", "no_augmentation", "seed",
           "early_stopping_patience", "early_stopping_min_delta", "save_top_k", "max_nonfinite_steps")


def plan_resume(checkpoint, path, args, world_size):
    """Check this run's flags against the checkpoint's before anything is built. Sets
    args.gradient_accumulation_steps (kept global batch) and returns (the parts to reset, the
    lines that say what changed). Raises ConfigError, naming the flag and the way out."""
    saved = checkpoint["config"]
    reset = {part for reset_flag, part, _ in RESETTABLE.values() if getattr(args, reset_flag)}
    for flag, (reset_flag, part, effect) in RESETTABLE.items():
        if saved.get(flag, getattr(args, flag)) != getattr(args, flag) and part not in reset:
            raise ConfigError(
                f"{path} was trained with --{flag} {saved[flag]}, this run asks for --{flag} "
                f"{getattr(args, flag)}: pass --{flag} {saved[flag]} to continue it, or add --{reset_flag} to "
                f"{effect}")
    if saved.get("backbone_lr_scale", 1.0) != args.backbone_lr_scale and not {"optimizer", "lr_schedule"} <= reset:
        raise ConfigError(f"{path} was trained with --backbone_lr_scale {saved.get('backbone_lr_scale', 1.0)}, this "
                          f"run asks for {args.backbone_lr_scale}, which regroups the optimizer's parameters: pass "
                          f"--backbone_lr_scale {saved.get('backbone_lr_scale', 1.0)} to continue it, or add "
                          "--reset_optimizer --reset_lr_schedule to start both afresh")
    if checkpoint.get("samples_done") and saved.get("seed", args.seed) != args.seed:
        raise ConfigError(f"{path} stopped in the middle of epoch {checkpoint['epoch'] + 1}, whose sample order "
                          f"comes from --seed {saved['seed']}: pass --seed {saved['seed']} (a new seed applies "
                          "from an epoch's start)")
    trained_amp = saved.get("amp_dtype") if saved.get("use_amp") else None  # older checkpoints: float16, the default
    if args.use_amp and args.amp_dtype == "auto" and trained_amp in ("float16", "bfloat16"):
        args.amp_dtype = trained_amp
    notes = [keep_global_batch(checkpoint, path, args, world_size)]
    if saved.get("epochs", args.epochs) != args.epochs:
        plan = "schedule re-planned for" if args.lr_scheduler == "cosine" and "lr_schedule" not in reset else "now"
        notes.append(f"{plan} {args.epochs} epochs (was {saved['epochs']})")
    changed = [f"--{flag} {saved[flag]} -> {getattr(args, flag)}" for flag in APPLIED
               if flag in saved and saved[flag] != getattr(args, flag)]
    if changed:
        notes.append("applied from here: " + ", ".join(changed))
    if checkpoint.get("crop_generator") != GENERATOR:
        notes.append("training crops are drawn by augment.py's counter-based generator from here (this "
                     "checkpoint's run drew them per sample with Python's random): same distribution, other crops")
    notes += sorted({f"--{reset_flag}: {effect}" for reset_flag, part, effect in RESETTABLE.values() if part in reset})
    return reset, [note for note in notes if note]


def saved_layout(checkpoint):
    """(per-process batch, processes, accumulation) of the checkpoint's run."""
    saved = checkpoint["config"]
    return saved["batch_size"], len(checkpoint.get("rng") or [0]), saved.get("gradient_accumulation_steps") or 1


def keep_global_batch(checkpoint, path, args, world_size):
    """Set the accumulation that keeps the checkpoint's global batch on this run's processes and
    per-process batch; refuse (naming values that work) when none does. Returns a note or ''."""
    batch, processes, accumulation = saved_layout(checkpoint)
    global_batch = checkpoint.get("global_batch") or batch * processes * accumulation  # older checkpoints
    per_step = args.batch_size * world_size
    was = f"{batch} x {processes} processes x {accumulation} accumulation"
    given = args.gradient_accumulation_steps
    if global_batch % per_step == 0 and given in (None, global_batch // per_step):
        args.gradient_accumulation_steps = global_batch // per_step
        if args.gradient_accumulation_steps == accumulation:
            return ""
        return (f"gradient accumulation {args.gradient_accumulation_steps} keeps the global batch at {global_batch} "
                f"on {world_size} process(es) (was {was})")
    batches = [b for b in range(1, global_batch // world_size + 1) if global_batch % (b * world_size) == 0]
    way = (f"--batch_size {' or '.join(map(str, batches[-3:]))} (accumulation adapts when "
           "--gradient_accumulation_steps is not given)" if batches
           else f"a number of processes that divides {global_batch}")
    asked = f"{args.batch_size} x {world_size} processes" + (f" x {given} accumulation" if given else "")
    raise ConfigError(f"{path} trained with a global batch of {global_batch} samples ({was}); {asked} cannot keep "
                      f"it: use {way}, or start a new run from its weights with --pretrained_weights {path}")


def restart_parts(training, state, reset, args):
    """After RunState.restore: a fresh schedule from this step (--reset_lr_schedule), and the
    applied optimizer flags written into the restored optimizer's groups."""
    if "lr_schedule" in reset:
        done = state.epoch * training.steps_per_epoch + state.step
        training.scheduler = restart_scheduler(training.optimizer, args, training.learning_rate,
                                               training.steps_per_epoch,
                                               max(args.epochs * training.steps_per_epoch - done, 1))
    for group in training.optimizer.param_groups:
        group["weight_decay"] = args.weight_decay
        if "momentum" in group:
            group["momentum"] = args.momentum
