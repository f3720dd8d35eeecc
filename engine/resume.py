"""The resume contract: what a user may change between runs, and what happens when they do.

Every change either continues exactly, is applied with a line that says so, or is refused in one
line that names the flag and the way out; nothing changes silently. Every flag of
config.build_parser() has its place in exactly one of the four classes below (FREE, APPLIED,
RESETTABLE, NEVER; tests/test_resume.py holds them to the parser, so a new flag has no default
behaviour on resume). README's "Fault tolerance" section has the same contract as a table.

- Continued exactly: the number of processes, --batch_size and --gradient_accumulation_steps, as
  long as the global batch (batch x processes x accumulation) is kept. Accumulation adapts by
  itself when the flag is not given; the run continues at the exact next sample of the epoch's
  global sequence (sampling.py).
- Re-planned: --epochs (the schedule's horizon follows it: a cosine anneals to zero at the new
  last epoch).
- Kept: the AMP dtype a run trained with, when --amp_dtype is not given (auto), as the
  accumulation is.
- Applied from the next step, with a note: the flags in APPLIED (weight decay, clipping, ...);
  those in EPOCH_START_ONLY (--seed, --ra_reps, --sampling) are refused in the middle of an epoch.
- Refused unless the part is explicitly started afresh: the flags in RESETTABLE (another optimizer,
  schedule, peak rate, --backbone_lr_scale, monitored metric).
- Refused: the flags in NEVER (another model, another global batch), and another class set.

Who decides what: plan_resume, before anything is built (its ResumePlan settles the accumulation
and the AMP dtype: engine.training.settle); resume_run, which has RunState.restore load the parts
kept and then starts the reset ones afresh.
"""
from dataclasses import dataclass

from core.errors import CheckpointError, ConfigError
from engine.checkpoint import RunState, draws_of
from engine.recipe import apply_weight_decay, restart_scheduler
from inputs.augment import GENERATOR

# Free to change: where the data and files are, how the run is fed, placed on its processes,
# logged, checked and debugged; the starting weights (a resume takes the checkpoint's) and the
# resume flags themselves.
FREE = frozenset({
    "train_dir", "val_dir", "train_csv", "val_csv", "image_root", "image_column", "label_column", "label_delimiter",
    "demo",
    "num_workers", "cache_images", "skip_bad_images", "sync_bn", "channels_last",
    "compile", "pretrained", "pretrained_weights", "find_unused_parameters", "dist_timeout_minutes", "distributed",
    "fast_dev_run", "overfit_batches", "limit_train_batches", "limit_val_batches", "trace_samples",
    "num_sanity_val_steps", "config", "checkpoint_dir", "log_dir", "resume", "reset_optimizer", "reset_lr_schedule",
    "reset_best", "auto_resume", "save_every_steps", "log_every_steps", "use_wandb", "wandb_project", "wandb_name",
    "use_tensorboard",
})
# Applied from the next step, each change named on the "Resumed from" line ("applied from here:
# --weight_decay 0.01 -> 0.2", in this order); --epochs has words of its own (the schedule re-planned).
APPLIED = ("epochs", "freeze_backbone_epochs", "weight_decay", "momentum", "nesterov", "max_grad_norm",
           "label_smoothing", "use_ema", "ema_decay", "ema_steps", "ema_warmup", "use_amp", "amp_dtype", "image_size",
           "resize_size", "train_crop_size", "val_crop_size", "val_resize_size", "mean", "std", "cache_format",
           "cache_quality", "decode_on_device", "min_crop_scale", "hflip_prob", "no_augmentation", "auto_augment",
           "ra_magnitude", "ra_num_ops", "augmix_severity", "color_jitter", "random_erase", "mixup_alpha",
           "cutmix_alpha", "mix_prob", "mix_switch_prob", "mix_off_epoch", "ra_reps", "progressive_min_size",
           "progressive_start_epoch", "progressive_end_epoch", "sampling", "class_weights", "loss", "focal_gamma",
           "pos_weight", "tta", "seed", "early_stopping_patience",
           "early_stopping_min_delta", "save_top_k", "max_nonfinite_steps")
# Applied flags an epoch's sample sequence comes from: refused in the middle of one.
EPOCH_START_ONLY = ("seed", "ra_reps", "sampling")
# Refused unless every --reset_* named is given: flag -> the resets its change needs.
RESETTABLE = {
    "optimizer": ("reset_optimizer",),
    "lr_scheduler": ("reset_lr_schedule",),
    "warmup_steps": ("reset_lr_schedule",),
    "learning_rate": ("reset_lr_schedule",),
    "scale_lr": ("reset_lr_schedule",),
    "lr_step_epochs": ("reset_lr_schedule",),
    "lr_gamma": ("reset_lr_schedule",),
    "monitor_metric": ("reset_best",),
    "lr_min": ("reset_lr_schedule",),
    "lr_warmup_epochs": ("reset_lr_schedule",),
    "lr_warmup_method": ("reset_lr_schedule",),
    "lr_warmup_decay": ("reset_lr_schedule",),
    # These regroup the optimizer's parameters (recipe.parameter_groups).
    "backbone_lr_scale": ("reset_optimizer", "reset_lr_schedule"),
    "norm_weight_decay": ("reset_optimizer", "reset_lr_schedule"),
    "bias_weight_decay": ("reset_optimizer", "reset_lr_schedule"),
    "layer_decay": ("reset_optimizer", "reset_lr_schedule"),
}
RESETS = {  # reset flag -> the part it starts afresh, and what that does
    "reset_optimizer": ("optimizer", "start the optimizer's state (moments) afresh"),
    "reset_lr_schedule": ("lr_schedule", "start a new schedule over the remaining epochs"),
    "reset_best": ("best", "forget the best value, top-k and early-stopping count"),
}
# Never changeable: flag -> what must stay, and what refuses another value.
NEVER = {
    "model": "the architecture the weights fit (check_resumable)",
    "multi_label": "the kind of output the head was trained for: sigmoids per class, or one softmax (check_resumable)",
    "batch_size": "the global batch, batch x processes x accumulation (keep_global_batch)",
    "gradient_accumulation_steps": "the global batch (keep_global_batch); adapts when not given",
}
# Flags older checkpoints lack: the value they trained with (a name: the flag whose value it had).
TRAINED_WITHOUT = {
    "backbone_lr_scale": 1.0, "norm_weight_decay": None, "bias_weight_decay": None, "layer_decay": None,
    "lr_min": 0.0, "lr_warmup_epochs": 0, "lr_warmup_method": "linear", "lr_warmup_decay": None, "nesterov": False,
    "ema_steps": 1, "ema_warmup": False, "auto_augment": None, "ra_magnitude": 9, "ra_num_ops": 2,
    "augmix_severity": 3, "color_jitter": 0.0, "random_erase": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
    "mix_prob": 1.0, "mix_switch_prob": 0.5, "mix_off_epoch": 0, "ra_reps": 1, "progressive_min_size": None,
    "progressive_start_epoch": 1, "progressive_end_epoch": None, "sampling": "uniform", "class_weights": "none",
    "loss": "ce", "focal_gamma": 2.0, "tta": "none", "pos_weight": "none", "multi_label": False,
    "train_crop_size": "image_size", "val_crop_size": "image_size", "val_resize_size": "resize_size",
}


def trained_value(saved, flag, otherwise):
    """The value a checkpoint's run had for `flag`: its config's, the TRAINED_WITHOUT value for
    older checkpoints, else `otherwise`."""
    if flag in saved:
        return saved[flag]
    if flag not in TRAINED_WITHOUT:
        return otherwise
    value = TRAINED_WITHOUT[flag]
    return saved.get(value) if value in ("image_size", "resize_size") else value


@dataclass(frozen=True)
class ResumePlan:
    """What a checkpoint decides for the run that continues it (plan_resume)."""
    reset: frozenset                  # the parts started afresh: "optimizer", "lr_schedule", "best"
    notes: tuple                      # what the "Resumed from" line says changed
    gradient_accumulation_steps: int  # keeps the checkpoint's global batch on this run's processes
    amp_dtype: str                    # --amp_dtype: the checkpoint's own when not given (auto)


def check_resumable(checkpoint, path, class_names, model_name, multi_label=False):
    """Refuse a checkpoint of another kind of labels (one per image, or several), another class set
    or another model, before touching any state."""
    trained_multi_label = checkpoint["config"].get("multi_label", False)
    if trained_multi_label != multi_label:
        kinds = {True: "several labels per image (--multi_label)", False: "one label per image"}
        raise CheckpointError(f"{path} was trained with {kinds[trained_multi_label]}, this run asks for "
                              f"{kinds[multi_label]}; {'add' if trained_multi_label else 'drop'} --multi_label to "
                              f"resume it, or start a new run from its weights with --pretrained_weights {path}")
    if checkpoint["class_names"] != class_names:
        raise CheckpointError(
            f"{path} was trained on {len(checkpoint['class_names'])} classes "
            f"({', '.join(checkpoint['class_names'][:5])}...), but the training data has "
            f"{len(class_names)} ({', '.join(class_names[:5])}...); resume needs the same classes")
    saved_model = checkpoint["config"].get("model", "resnet18")
    if saved_model != model_name:
        raise CheckpointError(f"{path} holds a '{saved_model}' model, but --model is "
                              f"'{model_name}'; pass --model {saved_model} to resume it")


def plan_resume(checkpoint, path, args, world_size):
    """Check this run's flags against the checkpoint's before anything is built; returns the
    ResumePlan. Raises ConfigError, naming the flag and the way out. `args` is only read."""
    saved = checkpoint["config"]
    reset = frozenset(part for flag, (part, _) in RESETS.items() if getattr(args, flag))
    for flag, resets in RESETTABLE.items():
        trained, asked = trained_value(saved, flag, getattr(args, flag)), getattr(args, flag)
        if trained != asked and not {RESETS[name][0] for name in resets} <= reset:
            raise ConfigError(refusal(path, flag, trained, asked, resets))
    for flag in EPOCH_START_ONLY:
        trained = trained_value(saved, flag, getattr(args, flag))
        if checkpoint.get("samples_done") and trained != getattr(args, flag):
            raise ConfigError(f"{path} stopped in the middle of epoch {checkpoint['epoch'] + 1}, whose sample order "
                              f"comes from --{flag} {trained}: pass --{flag} {trained} (a new {flag} applies "
                              "from an epoch's start)")
    refuse_mixing_switch_mid_epoch(checkpoint, path, args)
    amp_dtype = kept_amp_dtype(saved, args.use_amp, args.amp_dtype)
    accumulation, kept = keep_global_batch(checkpoint, path, args.batch_size, args.gradient_accumulation_steps,
                                           world_size)
    notes = [kept, *applied_changes(saved, {**vars(args), "amp_dtype": amp_dtype}, reset)]
    if checkpoint.get("crop_generator") != GENERATOR:
        notes.append("training crops are drawn by augment.py's counter-based generator from here (this "
                     "checkpoint's run drew them per sample with Python's random): same distribution, other crops")
    trained_draws = checkpoint.get("draws", {})
    notes += [f"{name} draws are made by {generator} from here (this checkpoint's run used {trained_draws[name]}): "
              "same distribution, other draws" for name, generator in draws_of(vars(args)).items()
              if name in trained_draws and trained_draws[name] != generator]
    notes += sorted(f"--{flag}: {effect}" for flag, (part, effect) in RESETS.items() if part in reset)
    return ResumePlan(reset, tuple(note for note in notes if note), accumulation, amp_dtype)


def mixes(config):
    return bool((config.get("mixup_alpha") or config.get("cutmix_alpha")) and not config.get("no_augmentation"))


def refuse_mixing_switch_mid_epoch(checkpoint, path, args):
    """With --ra_reps, mixing decides how an image's copies interleave with the others (ranks take
    pairs: sampling.py), so turning it on or off in the middle of an epoch would change the rest
    of that epoch's sequence: refused until the epoch's end."""
    saved = checkpoint["config"]
    if (checkpoint.get("samples_done") and trained_value(saved, "ra_reps", 1) > 1
            and mixes(saved) != mixes(vars(args))):
        state = "on" if mixes(saved) else "off"
        raise ConfigError(f"{path} stopped in the middle of epoch {checkpoint['epoch'] + 1} with mixing {state} and "
                          f"--ra_reps {saved['ra_reps']}, whose sample sequence depends on it: keep mixing {state} "
                          "until that epoch ends (resume, then change it at an epoch's start)")


def refusal(path, flag, trained, asked, resets):
    """The one line refusing a RESETTABLE change without its resets. A change that needs several
    resets regroups the optimizer's parameters (--backbone_lr_scale). A flag the checkpoint's run
    left unset (None) is continued by leaving it out."""
    had = f"--{flag} {trained}" if trained is not None else f"no --{flag}"
    keep = f"pass --{flag} {trained}" if trained is not None else f"leave --{flag} out"
    if len(resets) == 1:
        return (f"{path} was trained with {had}, this run asks for --{flag} {asked}: {keep} to continue it, "
                f"or add --{resets[0]} to {RESETS[resets[0]][1]}")
    return (f"{path} was trained with {had}, this run asks for {asked}, which regroups the optimizer's "
            f"parameters: {keep} to continue it, or add {' '.join('--' + name for name in resets)} "
            "to start both afresh")


def kept_amp_dtype(saved, use_amp, amp_dtype):
    """--amp_dtype auto on resume is the dtype the checkpoint's run trained with, as the
    accumulation is kept; older checkpoints hold float16, the default then."""
    trained = saved.get("amp_dtype") if saved.get("use_amp") else None
    return trained if use_amp and amp_dtype == "auto" and trained in ("float16", "bfloat16") else amp_dtype


def applied_changes(saved, values, reset):
    """The notes on APPLIED flags whose value changed: the re-planned schedule, then the rest."""
    notes = []
    if saved.get("epochs", values["epochs"]) != values["epochs"]:
        plan = "schedule re-planned for" if values["lr_scheduler"] == "cosine" and "lr_schedule" not in reset else "now"
        notes.append(f"{plan} {values['epochs']} epochs (was {saved['epochs']})")
    trained = {flag: trained_value(saved, flag, values[flag]) for flag in APPLIED if flag != "epochs"}
    changed = [f"--{flag} {trained[flag]} -> {values[flag]}" for flag in trained if trained[flag] != values[flag]]
    if changed:
        notes.append("applied from here: " + ", ".join(changed))
    return notes


def saved_layout(checkpoint):
    """(per-process batch, processes, accumulation) of the checkpoint's run."""
    saved = checkpoint["config"]
    return saved["batch_size"], len(checkpoint.get("rng") or [0]), saved.get("gradient_accumulation_steps") or 1


def keep_global_batch(checkpoint, path, batch_size, given, world_size):
    """The accumulation that keeps the checkpoint's global batch with this run's per-process batch
    on its processes (`given`: --gradient_accumulation_steps, None when not given), and a note or
    ''; refuse (naming values that work) when none does."""
    batch, processes, accumulation = saved_layout(checkpoint)
    global_batch = checkpoint.get("global_batch") or batch * processes * accumulation  # older checkpoints
    per_step = batch_size * world_size
    was = f"{batch} x {processes} processes x {accumulation} accumulation"
    if global_batch % per_step == 0 and given in (None, global_batch // per_step):
        kept = global_batch // per_step
        if kept == accumulation:
            return kept, ""
        return kept, (f"gradient accumulation {kept} keeps the global batch at {global_batch} on {world_size} "
                      f"process(es) (was {was})")
    batches = [b for b in range(1, global_batch // world_size + 1) if global_batch % (b * world_size) == 0]
    way = (f"--batch_size {' or '.join(map(str, batches[-3:]))} (accumulation adapts when "
           "--gradient_accumulation_steps is not given)" if batches
           else f"a number of processes that divides {global_batch}")
    asked = f"{batch_size} x {world_size} processes" + (f" x {given} accumulation" if given else "")
    raise ConfigError(f"{path} trained with a global batch of {global_batch} samples ({was}); {asked} cannot keep "
                      f"it: use {way}, or start a new run from its weights with --pretrained_weights {path}")


def resume_run(checkpoint, training, rank, plan, args):
    """Load a checkpoint into the run built for it (RunState.restore, all but the parts reset) and
    start the reset parts afresh: a fresh optimizer takes the schedule's current rate, a fresh
    schedule runs from this step over the remaining epochs, a fresh best forgets the best value,
    top-k and early-stopping count. The APPLIED optimizer flags reach the restored optimizer's
    groups. Returns the run's state."""
    reset = plan.reset
    state = RunState.restore(checkpoint, training, rank, load_optimizer="optimizer" not in reset,
                             load_schedule="lr_schedule" not in reset)
    if "optimizer" in reset and "lr_schedule" not in reset:
        for group, rate in zip(training.optimizer.param_groups, training.scheduler.get_last_lr()):
            group["lr"] = rate
    if "best" in reset:
        state.best_metric, state.best_epoch, state.stale_epochs, state.top_k = None, 0, 0, []
    if "lr_schedule" in reset:
        done = state.epoch * training.steps_per_epoch + state.step
        training.scheduler = restart_scheduler(training.optimizer, args, training.learning_rate,
                                               training.steps_per_epoch,
                                               max(args.epochs * training.steps_per_epoch - done, 1))
    apply_weight_decay(training.optimizer, args.weight_decay, args.norm_weight_decay, args.bias_weight_decay)
    for group in training.optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = args.momentum
        if "nesterov" in group:
            group["nesterov"] = args.nesterov
    return state
