"""Checkpoints: one schema of plain types, atomic writes, safe (weights_only) loads.

Schema: model_state_dict (unwrapped: no `module.`/`_orig_mod.`), optimizer_state_dict,
scaler_state_dict, scheduler_state_dict, epoch (epochs completed), step (optimizer steps done in
the next epoch: non-zero in a mid-epoch checkpoint), best_acc, class_names, model_name,
config (flag values), history, rng (per-rank RNG states), train_partial (per-rank running sums
of the epoch in progress), nonfinite (non-finite step counters). Everything is a tensor, str, int, float, bool, list
or dict, so `torch.load(path)` works under PyTorch's default `weights_only=True`.
"""
import os
import pickle
import shutil

import torch

from model import first_line, strip_wrapper_prefixes

REQUIRED_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "class_names", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or resumed; the message names the file and the fix."""


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(state, path):
    """Write to a temp file in the same directory, flush to disk, then rename over `path`:
    a kill at any moment leaves either the old or the new file, never a truncated one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, permission denied, file too large: the old file stays
        remove_quietly(tmp)
        raise save_failed(path, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def copy_checkpoint(source, path):
    """Give a just-written checkpoint a second name without serialising it again: a hard link
    (no copy; the next save of `source` renames a new file over it, so this name keeps its
    content), or a copy where links are not supported. Atomic like save_checkpoint."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise save_failed(path, exc) from None


def save_failed(path, exc):
    return CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}; the previous "
                           "checkpoint there is untouched; free space or pick another --checkpoint_dir")


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


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


def check_resumable(checkpoint, path, class_names, model_name):
    """Refuse a checkpoint of another class set or another model, before touching any state."""
    if checkpoint["class_names"] != class_names:
        raise CheckpointError(
            f"{path} was trained on {len(checkpoint['class_names'])} classes "
            f"({', '.join(checkpoint['class_names'][:5])}...), but --train_dir has "
            f"{len(class_names)} ({', '.join(class_names[:5])}...); resume needs the same classes")
    saved_model = checkpoint["config"].get("model", "resnet18")
    if saved_model != model_name:
        raise CheckpointError(f"{path} holds a '{saved_model}' model, but --model is "
                              f"'{model_name}'; pass --model {saved_model} to resume it")
