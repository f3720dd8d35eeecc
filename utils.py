"""The run's logs: the per-epoch training history, its JSON files and their plots.

`python utils.py --history logs/training_history.json --output curves.png` draws the curves;
`python utils.py --confusion logs/best_per_class.json --output confusion.png` draws the best
checkpoint's confusion matrix.
"""
import json
import sys

from core.cli import Parser, run_command
from core.errors import UsageError


def new_history():
    return {key: [] for key in HISTORY_KEYS}


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "learning_rate",
                "epoch_seconds", "samples_per_second", "skipped_images", "nonfinite_steps")


def append_history(history, record):
    """Add one epoch's values; optional metrics (the EMA's, top-5 accuracy) get their own lists."""
    missing = [key for key in HISTORY_KEYS if key not in record]
    if missing:
        raise KeyError(f"history record lacks {missing}")
    for key, value in record.items():
        history.setdefault(key, []).append(value)


def plot_history(history, output):
    """Loss, accuracy, learning rate and throughput per epoch, as a PNG (no display needed)."""
    import matplotlib.pyplot as plt

    fig = history_figure(history)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def history_figure(history):
    """The figure plot_history saves. Epochs are whole numbers on the x axes; the loss axis is
    logarithmic, so a large first-epoch loss does not flatten the later ones; the throughput axis
    starts at 0, so run-to-run noise of a few percent does not look like a swing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = history["epoch"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0, 0], "Loss", [("train_loss", "train"), ("val_loss", "val")]),
        (axes[0, 1], "Accuracy (%)", [("train_acc", "train"), ("val_acc", "val"), ("val_acc5", "val top-5")]),
        (axes[1, 0], "Learning rate", [("learning_rate", "lr")]),
        (axes[1, 1], "Training samples/s", [("samples_per_second", "all ranks")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            if key not in history:  # top-5: only with more than 5 classes
                continue
            values = history[key]  # an optional metric may start later: a run resumed from an older version
            ax.plot(epochs[len(epochs) - len(values):], values, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:  # half an epoch either side: a one-epoch run gets its one tick too
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0, 0].set_yscale("log")
    label_in_plain_numbers(axes[0, 0].yaxis)
    fastest = max(history["samples_per_second"], default=0)
    axes[1, 1].set_ylim(0, 1.1 * fastest if fastest > 0 else None)
    fig.tight_layout()
    return fig


def label_in_plain_numbers(log_axis):
    """A log axis labelled 0.5, 2, 30 rather than 5x10^-1, 2x10^0, 3x10^1, on the ticks matplotlib
    labels; within two decades some ticks between the powers of ten are labelled too."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainNumbers(LogFormatterSciNotation):
        def __call__(self, value, position=None):
            return f"{value:g}" if super().__call__(value, position) else ""

    log_axis.set_major_formatter(PlainNumbers())
    log_axis.set_minor_formatter(PlainNumbers(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def read_confusion(path):
    """(class names, confusion matrix as floats, epoch) of a best_per_class.json; ValueError
    says what is wrong with it."""
    import numpy as np

    with open(path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or not isinstance(report.get("class_names"), list):
        raise ValueError("expected a JSON object with class_names and confusion_matrix")
    names = report["class_names"]
    try:
        counts = np.asarray(report.get("confusion_matrix"), dtype=float)
    except TypeError as exc:  # numpy says ValueError for some malformed matrices, TypeError for others
        raise ValueError(str(exc)) from None
    if counts.shape != (len(names), len(names)) or not names or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"confusion_matrix must be {len(names)} x {len(names)} non-negative counts, a row "
                         f"and a column per class name")
    return names, counts, report.get("epoch")


def plot_confusion(names, counts, epoch, output, title=None):
    """Rows normalised to shares of each true class's images; readable up to ~100 classes: small
    tick labels, a colour bar, per-cell counts only for a few classes. `title` names what was
    evaluated (evaluate.py's test set); by default the best checkpoint of a training run's epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(names)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # no images: a blank row
    side = min(max(6.0, 3 + 0.13 * n), 20.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class's images")
    fontsize = min(10.0, max(5.0, 600 / n))  # about one row high: 90 classes get 6.7 pt
    ax.set_xticks(range(n), [str(name) for name in names], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), [str(name) for name in names], fontsize=fontsize)
    if n <= 20:
        for (row, column), count in np.ndenumerate(counts):
            ax.text(column, row, f"{count:g}", ha="center", va="center", fontsize=fontsize,
                    color="white" if shares[row, column] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    at_epoch = f" (epoch {epoch})" if epoch is not None else ""
    ax.set_title(title or f"Confusion matrix of the best checkpoint{at_epoch}, rows normalised")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def run(argv):
    parser = Parser(description="Plot a training history, or the best checkpoint's confusion matrix, written by "
                                "train_ddp.py.")
    parser.add_argument("--history", default="logs/training_history.json", help="history JSON file")
    parser.add_argument("--confusion", help="draw this per-class JSON (logs/best_per_class.json) instead")
    parser.add_argument("--output", help="PNG file to write (default curves.png, or confusion.png with --confusion)")
    args = parser.parse_args(argv)
    if args.confusion:
        return draw_confusion(args.confusion, args.output or "confusion.png")
    history = read_history(args.history)
    output = args.output or "curves.png"
    plot_history(history, output)
    print(f"wrote {output} ({len(history['epoch'])} epochs)")


def read_history(path):
    """A training_history.json's per-epoch lists; a UsageError says what is wrong with the file."""
    try:
        with open(path) as f:
            history = json.load(f)
        if not isinstance(history, dict):
            raise ValueError("expected a JSON object of per-epoch lists")
        missing = [k for k in HISTORY_KEYS if k not in history]
        if missing:
            raise ValueError(f"missing keys {missing}")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read history {path}: {exc}") from None
    return history


def draw_confusion(path, output):
    try:
        names, counts, epoch = read_confusion(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read confusion matrix {path}: {exc}") from None
    plot_confusion(names, counts, epoch, output)
    print(f"wrote {output} ({len(names)} classes)")


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
