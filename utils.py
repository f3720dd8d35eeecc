"""Distributed helpers, training history and its plot.

`python utils.py --history logs/training_history.json --output curves.png` draws the curves.
"""
import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(timeout_minutes=10.0):
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU).

    Run without torchrun it is one process and no process group.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    else:
        device = torch.device("cpu")
    if world_size > 1:
        timeout = timedelta(minutes=timeout_minutes)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across worker-group restarts: without a per-attempt prefix a
        # restarted group reads the dead workers' addresses and fails to connect (pytorch#167288).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, local_rank, world_size, device)


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place (a no-op in a one-process run)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """One collective decision from a local observation: True on every rank if True on any.

    Early stops (signal, non-finite abort) go through here at the same step on every rank, so no
    rank is left waiting in a collective the others skipped."""
    value = torch.tensor(float(flag), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_from_ranks(obj):
    """Every rank's `obj`, as a list in rank order (a one-element list in a one-process run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class StopRequest:
    """SIGTERM/SIGINT only record the request here; the loop acts on it at a step boundary,
    after an all-reduced decision, so every rank saves and exits at the same step."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.record)

    def record(self, signum, _frame):
        self.signal = signum

    @property
    def requested(self):
        return self.signal is not None


def broadcast_buffers(module, src=0):
    """Copy rank `src`'s buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank holds statistics updated by its own last batch; evaluating with those would mix models.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def main_print(ctx, *args, **kwargs):
    """Only rank 0 prints progress; errors are printed by the rank that hits them."""
    if ctx.is_main:
        print(*args, **kwargs, flush=True)


def write_json_atomic(path, data):
    """Write JSON to a temp file beside `path` and rename it in, so readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def new_history():
    return {key: [] for key in HISTORY_KEYS}


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "learning_rate",
                "epoch_seconds", "samples_per_second", "skipped_images", "nonfinite_steps")


def append_history(history, record):
    """Add one epoch's values; optional metrics (the EMA's) get their own lists."""
    missing = [key for key in HISTORY_KEYS if key not in record]
    if missing:
        raise KeyError(f"history record lacks {missing}")
    for key, value in record.items():
        history.setdefault(key, []).append(value)


def plot_history(history, output):
    """Loss, accuracy, learning rate and throughput per epoch, as a PNG (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0, 0], "Loss", [("train_loss", "train"), ("val_loss", "val")]),
        (axes[0, 1], "Accuracy (%)", [("train_acc", "train"), ("val_acc", "val")]),
        (axes[1, 0], "Learning rate", [("learning_rate", "lr")]),
        (axes[1, 1], "Training samples/s", [("samples_per_second", "all ranks")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            ax.plot(epochs, history[key], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a training history written by train_ddp.py.")
    parser.add_argument("--history", default="logs/training_history.json", help="history JSON file")
    parser.add_argument("--output", default="curves.png", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        with open(args.history) as f:
            history = json.load(f)
        if not isinstance(history, dict):
            raise ValueError("expected a JSON object of per-epoch lists")
        missing = [k for k in HISTORY_KEYS if k not in history]
        if missing:
            raise ValueError(f"missing keys {missing}")
    except (OSError, ValueError) as exc:
        print(f"error: cannot read history {args.history}: {exc}", file=sys.stderr)
        return 2
    plot_history(history, args.output)
    print(f"wrote {args.output} ({len(history['epoch'])} epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
