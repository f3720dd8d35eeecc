"""What the compressed cache (--cache_format jpeg) costs in accuracy: the same training run from
the files, from the raw cache and from the compressed cache at a few JPEG qualities, at a few
image sizes; the validation accuracy of the last epoch and the best one, against the files' run.

Every run is a fresh `train_ddp.py` process with the same seed and recipe (--model, --epochs,
batch 32, default augmentation, 1 worker); the caches are built in a temporary folder first (the
build is not timed). The compressed cache holds the training images only: the evaluation split is
cached raw (image_cache.build_cached_loaders), so every row is validated on the files' pixels and
the differences are what training on re-encoded images costs. The files' and the raw cache's rows
train on the same crops of the same pixels (within the resize filter's rounding).

Data: --data DIR (an ImageFolder root with train/ and val/, e.g. real photos), else the digits
demo's images (scikit-learn's scans of handwritten digits, dataset.prepare_digits_demo). --quick:
one size, one quality, one short epoch, which checks the script, not the accuracy.

    python bench/cache_accuracy.py [--quick] [--data DIR] [--sizes 32 64] [--qualities 75 90 95]
                                   [--model resnet18] [--epochs 6] [--results_dir DIR]
"""
import os
import re
import shutil
import sys
import tempfile

import common

sys.path.insert(0, common.REPO)
from dataset import prepare_digits_demo  # noqa: E402

QUICK_FLAGS = ["--limit_train_batches", "2", "--limit_val_batches", "2"]
CACHE_LINE = re.compile(r"Image cache (\S+): ([\d.]+) MiB")


def train(data, out, size, flags, args):
    """One run; (last validation accuracy, best, the training cache's MiB or None)."""
    command = [sys.executable, "train_ddp.py", "--train_dir", data["train"], "--val_dir", data["val"],
               "--model", args.model, "--image_size", str(size), "--batch_size", "32", "--epochs", str(args.epochs),
               "--num_workers", "1", "--seed", "0", "--checkpoint_dir", f"{out}/checkpoints", "--log_dir",
               f"{out}/logs", *flags, *(QUICK_FLAGS if args.quick else [])]
    run = common.run_timed(command)
    accuracy = common.read_history(f"{out}/logs")["val_acc"]
    stem = os.path.basename(os.path.normpath(data["train"])) + "-"
    caches = [float(mib) for path, mib in CACHE_LINE.findall(run["output"]) if os.path.basename(path).startswith(stem)]
    return accuracy[-1], max(accuracy), caches[0] if caches else None


def main():
    parser = common.parser(__doc__, repeats=1)
    parser.add_argument("--data", default=None, help="an ImageFolder root with train/ and val/ (default: the digits)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="--image_size values (default 32 64)")
    parser.add_argument("--qualities", type=int, nargs="+", default=None, help="JPEG qualities (default 75 90 95)")
    parser.add_argument("--model", default=None, help="default resnet18 (tiny_cnn with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 6 (1 with --quick)")
    args = parser.parse_args()
    args.sizes = args.sizes or ([16] if args.quick else [32, 64])
    args.qualities = args.qualities or ([90] if args.quick else [75, 90, 95])
    args.model = args.model or ("tiny_cnn" if args.quick else "resnet18")
    args.epochs = args.epochs or (1 if args.quick else 6)
    scratch = tempfile.mkdtemp(prefix="cache-accuracy-")
    try:
        if args.data:
            data = dict(train=os.path.join(args.data, "train"), val=os.path.join(args.data, "val"))
            described = f"`{args.data}`"
        else:
            train_dir, val_dir = prepare_digits_demo(os.path.join(scratch, "digits"))
            data = dict(train=train_dir, val=val_dir)
            described = "the digits demo's images (scikit-learn's 8 x 8 scans, upscaled; 1,437 train / 360 val)"
        cache = os.path.join(scratch, "cache")
        paths = [("files", [])] + [("raw cache", ["--cache_images", cache, "--cache_format", "raw"])]
        paths += [(f"compressed cache, quality {q}", ["--cache_images", cache, "--cache_format", "jpeg",
                                                      "--cache_quality", str(q)]) for q in args.qualities]
        rows = []
        for size in args.sizes:
            baseline = None
            for number, (name, flags) in enumerate(paths):
                last, best, mib = train(data, os.path.join(scratch, f"run-{size}-{number}"), size, flags, args)
                baseline = baseline or (last, best)
                rows.append([size, name, f"{last:.2f}", f"{best:.2f}", f"{last - baseline[0]:+.2f}",
                             f"{best - baseline[1]:+.2f}", "" if mib is None else f"{mib:.1f}"])
                print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
        header = ["image size", "training input", "val acc, last epoch (%)", "best (%)", "last vs files (pp)",
                  "best vs files (pp)", "training cache (MiB)"]
        common.write_report(
            args.results_dir, "cache_accuracy", "Compressed cache: what re-encoding the training images costs",
            common.table(header, rows),
            notes=[f"data: {described}", f"{args.model}, {args.epochs} epoch(s), batch 32, seed 0, default "
                   "augmentation; one run per row",
                   "validation always reads the files' decoded pixels (the evaluation split is cached raw)"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
