"""Checkpoints: the run's state and its one schema, atomic writes, safe (weights_only) loads.

SCHEMA below is the one description of a checkpoint's keys; `RunState` writes exactly those
(`to_checkpoint`) and reads them back (`restore`). Every value is a tensor, str, int, float,
bool, None, list or dict, so `torch.load(path)` works under PyTorch's default `weights_only=True`.
"""
import os
import pickle
import time
from dataclasses import dataclass, field, fields

import torch

from config import preprocessing_of
from core.errors import CheckpointError, first_line
from core.files import fsync_directory, link_or_copy_atomic, write_atomic
from engine.recipe import load_scheduler_state
from inputs.augment import GENERATOR as CROP_GENERATOR
from inputs.mixing import GENERATOR as MIX_GENERATOR
from inputs.policies import GENERATOR as POLICY_GENERATOR
from model import load_trained_weights, strip_wrapper_prefixes, unwrap
from utils import append_history, new_history

SCHEMA = {
    "model_state_dict": "the unwrapped model's weights (no `module.`/`_orig_mod.` prefixes)",
    "optimizer_state_dict": "the optimizer's state",
    "scaler_state_dict": "the GradScaler's state",
    "scheduler_state_dict": "the learning-rate schedule's state",
    "epoch": "epochs completed",
    "step": "optimizer steps done in the next epoch (non-zero in a mid-epoch checkpoint)",
    "samples_done": "positions of the next epoch's global sample sequence trained so far (sampling.py)",
    "epoch_samples": "that epoch's planned length in samples (0 until it starts)",
    "global_batch": "samples per optimizer step: per-process batch x processes x accumulation",
    "best_acc": "best validation accuracy so far (%)",
    "best_metric": "best value of --monitor_metric so far (None before the first epoch ends)",
    "best_epoch": "the epoch of best_metric",
    "stale_epochs": "epochs since --monitor_metric last improved (early stopping)",
    "top_k": "[value, epoch] of the --save_top_k best epochs",
    "thresholds": "--multi_label: per class, the model's decision threshold tuned on this epoch's validation "
                  "(None otherwise); predict.py and export.py apply them",
    "ema_thresholds": "the same for the EMA weights (--use_ema; None otherwise), applied with --weights ema",
    "history": "the per-epoch metrics so far (utils.HISTORY_KEYS)",
    "class_names": "class folder names in label order",
    "model_name": "--model",
    "config": "every flag's value",
    "preprocessing": "the evaluation transform the weights expect (predict.py and export.py apply it): image_size "
                     "(center crop), resize_size (shorter side first), mean and std (of 0-1 pixels)",
    "crop_generator": "how training crops were drawn (augment.GENERATOR); older checkpoints lack it",
    "draws": "every kind of random draw the run made, by name, and the generator that made it (draws_of); "
             "older checkpoints lack it",
    "rng": "every rank's torch RNG states (dropout), in rank order",
    "train_partial": "every rank's running sums of the epoch in progress (metrics.EpochSums), or None",
}
EMA_SCHEMA = {  # present with --use_ema only
    "ema_state_dict": "the EMA weights (same keys as the model, plus n_averaged)",
    "ema_num_averaged": "how many optimizer steps the EMA has averaged",
}
REQUIRED_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "class_names", "config")


def save_checkpoint(state, path):
    """Write durably and atomically (core.files.write_atomic): a kill at any moment leaves either
    the old or the new file, never a truncated one. The folder is created if need be."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, lambda f: torch.save(state, f))
    except OSError as exc:  # disk full, permission denied, file too large: the old file stays
        raise save_failed(path, exc) from None


def copy_checkpoint(source, path):
    """Give a just-written checkpoint a second name without serialising it again: a hard link, or
    a copy where links are not supported (core.files.link_or_copy_atomic). Atomic like save_checkpoint."""
    try:
        link_or_copy_atomic(source, path)
    except OSError as exc:
        raise save_failed(path, exc) from None


def save_failed(path, exc):
    return CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}; the previous "
                           "checkpoint there is untouched; free space or pick another --checkpoint_dir")


def rng_state():
    """This process's torch RNG states as tensors (augmentation has its own per-sample seeds; only
    dropout-like layers draw from these)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])


def load_checkpoint(path):
    """Load a checkpoint safely; refuse anything that is not a plain-data checkpoint dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (the file is empty)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a pickle at all (text, random bytes)
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(exc)})") from None
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than plain data, which "
            f"could run code ({first_line(exc)}); only load checkpoints from sources you trust, "
            "re-saved as plain state dicts") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a training checkpoint of this project "
                              f"(expected keys {', '.join(REQUIRED_KEYS)})")
    checkpoint["model_state_dict"] = strip_wrapper_prefixes(checkpoint["model_state_dict"])
    return checkpoint


def checkpoint_preprocessing(checkpoint):
    """The evaluation transform a checkpoint's weights expect (SCHEMA's "preprocessing"); checkpoints
    written before that key existed: the one their flags gave."""
    return checkpoint.get("preprocessing") or preprocessing_of(checkpoint["config"])


def draws_of(config):
    """{draw: generator} of the random draws a run's flags make: crops always; the per-sample
    policy, erasing and mixing when on. A resume notes a generator that changed (resume.plan_resume)."""
    draws = dict(crop=CROP_GENERATOR)
    if config.get("auto_augment") or config.get("color_jitter"):
        draws["policy"] = POLICY_GENERATOR
    if config.get("random_erase"):
        draws["erase"] = POLICY_GENERATOR
    if config.get("mixup_alpha") or config.get("cutmix_alpha"):
        draws["mix"] = MIX_GENERATOR
    return draws


@dataclass
class RunState:
    """Where a run stands besides its weights and optimizer: the epoch and step it has reached,
    the epoch-level decisions so far (best, early stopping, top-k) and the history.

    The one owner of what a checkpoint holds: `to_checkpoint` writes exactly SCHEMA's keys (and
    EMA_SCHEMA's with an EMA), `restore` loads them into a freshly built run.
    """
    epoch: int = 0
    step: int = 0
    samples_done: int = 0
    epoch_samples: int = 0
    global_batch: int = 0
    best_acc: float = 0.0
    best_metric: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0
    top_k: list = field(default_factory=list)
    thresholds: list | None = None  # --multi_label: tuned on the last validation
    ema_thresholds: list | None = None  # the EMA's, with --use_ema
    history: dict = field(default_factory=new_history)
    train_partial: list | None = None  # held from a resume until the interrupted epoch takes it

    def to_checkpoint(self, training, class_names, config, rng, train_partial):
        """The checkpoint dict. `training` holds model, optimizer, scaler, scheduler and ema; `rng`
        and `train_partial` are every rank's, gathered by the caller."""
        checkpoint = dict(
            model_state_dict=unwrap(training.model).state_dict(),
            optimizer_state_dict=training.optimizer.state_dict(),
            scaler_state_dict=training.scaler.state_dict(),
            scheduler_state_dict=training.scheduler.state_dict(),
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "train_partial"},
            class_names=class_names, model_name=config["model"], config=config,
            preprocessing=preprocessing_of(config), crop_generator=CROP_GENERATOR, draws=draws_of(config), rng=rng,
            train_partial=train_partial)
        if training.ema is not None:
            checkpoint.update(ema_state_dict=training.ema.module.state_dict(),
                              ema_num_averaged=int(training.ema.n_averaged))
        return checkpoint

    @classmethod
    def restore(cls, checkpoint, training, rank, load_optimizer=True, load_schedule=True):
        """Load a checkpoint into a built run (weights, optimizer, scaler, schedule, EMA, this
        rank's RNG) and return its state. Without load_optimizer / load_schedule those stay as
        built (resume.resume_run decides, and starts them afresh). A schedule keeps this run's
        horizon (recipe.load_scheduler_state). Older checkpoints lack some keys: defaults."""
        load_trained_weights(unwrap(training.model), checkpoint)
        if load_optimizer:
            training.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if load_schedule:
            load_scheduler_state(training.scheduler, checkpoint["scheduler_state_dict"])
        if checkpoint["scaler_state_dict"] or not training.scaler.is_enabled():  # empty: AMP was off
            training.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        if training.ema is not None and "ema_state_dict" in checkpoint:
            training.ema.module.load_state_dict(checkpoint["ema_state_dict"])
            training.ema.n_averaged.fill_(checkpoint["ema_num_averaged"])
        if checkpoint.get("rng"):
            restore_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
        defaults = cls()
        return cls(**{f.name: checkpoint.get(f.name, getattr(defaults, f.name)) for f in fields(cls)})

    def end_epoch(self, record, monitored, args):
        """Record a finished epoch and take the epoch-level decisions: best checkpoint, early-stopping
        count, top-k. Every rank holds the same all-reduced metrics, so the ranks agree without a
        collective. Returns the checkpoint names to write and the top-k epochs that fell out."""
        epoch = record["epoch"]
        append_history(self.history, record)
        is_best = is_improvement(monitored, self.best_metric, args.monitor_metric)
        improved = is_improvement(monitored, self.best_metric, args.monitor_metric, args.early_stopping_min_delta)
        self.epoch, self.step, self.samples_done, self.epoch_samples = epoch, 0, 0, 0
        self.best_acc = max(self.best_acc, record["val_acc"])
        self.stale_epochs = 0 if improved else self.stale_epochs + 1
        if is_best:
            self.best_metric, self.best_epoch = monitored, epoch
        names = ["checkpoint_latest.pth"] + (["checkpoint_best.pth"] if is_best else [])
        dropped = []
        if args.save_top_k:
            self.top_k, entered, dropped = update_top_k(self.top_k, args.save_top_k, epoch, monitored,
                                                        args.monitor_metric)
            names += [top_k_filename(epoch)] if entered else []
        return names, dropped

    def should_stop_early(self, args):
        return bool(args.early_stopping_patience) and self.stale_epochs >= args.early_stopping_patience


LOWER_IS_BETTER = ("val_loss",)  # the --monitor_metric values that improve downwards


def is_improvement(value, best, monitor, min_delta=0.0):
    """Whether a monitored value beats the best so far by more than min_delta."""
    if best is None:
        return True
    return value < best - min_delta if monitor in LOWER_IS_BETTER else value > best + min_delta


def update_top_k(top_k, k, epoch, value, monitor):
    """Keep the k best (value, epoch) pairs. Returns (new list, whether this epoch entered it,
    the epochs that fell out) so the caller saves and deletes the matching files."""
    entries = sorted(top_k + [[value, epoch]], key=lambda e: (e[0] if monitor in LOWER_IS_BETTER else -e[0], e[1]))
    kept, dropped = entries[:k], entries[k:]
    return kept, any(e[1] == epoch for e in kept), [e[1] for e in dropped]


def top_k_filename(epoch):
    return f"checkpoint_epoch{epoch:03d}.pth"


def write_checkpoints(checkpoint, directory, names):
    """Serialise once under names[0]; the other names (best, top-k) are the same bytes."""
    first = os.path.join(directory, names[0])
    save_checkpoint(checkpoint, first)
    for name in names[1:]:
        copy_checkpoint(first, os.path.join(directory, name))


PREVIOUS_RUNS = "previous"  # the folder, in --checkpoint_dir and --log_dir, that earlier runs' files move into
LOG_FILES = ("config.json", "training_history.json", "best_per_class.json", "sample_trace", "tensorboard")


def run_files(checkpoint_dir, log_dir):
    """{folder: names} of what a run leaves in its two folders: checkpoint_dir's checkpoint_* (the
    checkpoints, exports of them and their .json sidecars) and log_dir's LOG_FILES. wandb keeps each
    run in a folder of its own, so log_dir/wandb stays."""
    found = {}
    for directory, is_run_file in ((checkpoint_dir, lambda name: name.startswith("checkpoint_")),
                                   (log_dir, lambda name: name in LOG_FILES)):
        try:
            names = {name for name in os.listdir(directory) if is_run_file(name)}
        except FileNotFoundError:
            continue
        if names:
            found.setdefault(os.path.realpath(directory), (directory, set()))[1].update(names)
    return {directory: sorted(names) for directory, names in found.values()}


def set_aside_previous_run(checkpoint_dir, log_dir):
    """Move the files of the run before this one (run_files) into previous/<when it ended>/ of each
    folder, the same name in both. Every file is renamed, so at every moment it is whole in one
    place or the other. Returns {old path: new path}, empty when there was nothing to move."""
    found = run_files(checkpoint_dir, log_dir)
    if not found:
        return {}
    ended = max(os.stat(os.path.join(directory, name)).st_mtime for directory, names in found.items()
                for name in names)
    stamp = name = time.strftime("%Y%m%d-%H%M%S", time.localtime(ended))
    copies = 1
    while any(os.path.lexists(os.path.join(directory, PREVIOUS_RUNS, name)) for directory in found):
        copies += 1  # two runs that ended in the same second
        name = f"{stamp}-{copies}"
    moved = {}
    for directory, names in found.items():
        target = os.path.join(directory, PREVIOUS_RUNS, name)
        try:
            os.makedirs(target)
            for entry in names:
                os.rename(os.path.join(directory, entry), os.path.join(target, entry))
                moved[os.path.join(directory, entry)] = os.path.join(target, entry)
        except OSError as exc:
            raise CheckpointError(f"cannot move the previous run's files in {directory}/ aside to {target}/ "
                                  f"({exc.strerror or exc}); move or delete them yourself, or pick another "
                                  "--checkpoint_dir and --log_dir") from None
        fsync_directory(target)
        fsync_directory(directory)
    return moved
