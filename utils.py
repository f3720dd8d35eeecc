"""The run's logs: the per-epoch training history, its JSON files and its plot.

`python utils.py --history logs/training_history.json --output curves.png` draws the curves.
"""
import argparse
import json
import os
import sys


def write_json_atomic(path, data):
    """Write JSON to a temp file beside `path` and rename it in, so readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:  # unserialisable data, a full disk, a stop signal: the old file stays
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
