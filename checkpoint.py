"""Checkpoints: one schema of plain types, atomic writes, safe (weights_only) loads.

Schema: model_state_dict (unwrapped: no `module.`/`_orig_mod.`), optimizer_state_dict,
scaler_state_dict, scheduler_state_dict, epoch (epochs completed), best_acc, class_names,
model_name, config (flag values), history. Everything is a tensor, str, int, float, bool, list
or dict, so `torch.load(path)` works under PyTorch's default `weights_only=True`.
"""
import os
import pickle

import torch

from model import strip_wrapper_prefixes

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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Load a checkpoint safely; refuse anything that is not a plain-data checkpoint dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than plain data "
            f"(weights_only=True rejected it: {str(exc).splitlines()[0][:200]}); "
            "only load checkpoints from sources you trust, re-saved as plain state dicts") from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
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
