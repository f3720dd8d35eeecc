"""End to end: one training epoch through the real CLI vs the in-memory ceiling.

On a generated JPEG folder (input_pipeline's generator: ~500x375 photo-like JPEGs; default 1,000
training and 64 validation images), ResNet-18 at --image_size 64, batch 64, one process,
`python train_ddp.py ... --epochs 1 --num_sanity_val_steps 0 --limit_val_batches 1`:

- (a) file path, --num_workers 2;
- (b) --cache_images (the warm-up round builds the cache; timed rounds reuse it); (b2) the same with
  --cache_format jpeg (the compressed cache);
- (c) the in-memory ceiling: harness.project_loop (the run training.build_training builds, trained
  by train_ddp.train_one_epoch over CachedBatches) on synthetic uint8 images stored at 73 px (what
  the cache stores for 64 px), cropped to 64 px with the cache's batched random crops, in this
  process; (c0) the same with a plain center crop;
- (d) a bare loop (harness.bare_loop: index, normalise, forward, backward, step) on the same images
  pre-cropped to 64 px, in this process: the issue's "bare loop on pre-cropped in-memory tensors".

Throughput is the history's samples_per_second (training steps only). Also measured:
time from command to the first training step (runs with --limit_train_batches 1: the moment the
epoch's progress bar appears, and the first output after it, which follows the first step), and
the checkpoint save time (checkpoint.save_checkpoint of the checkpoint train_ddp writes at an
epoch's end, RunState.to_checkpoint of a ResNet-18 run) as a fraction of the measured epoch time.
--quick: 64 training and 16 validation images, tiny_cnn at 32 px, batch 16, no warm-up round.

    python bench/end_to_end.py [--quick] [--data DIR] [--count N] [--model M] [--batch_size B] [--repeats N]
                               [--results_dir DIR]
"""
import os
import shutil
import statistics
import sys
import tempfile
import time

import common
import harness
import torch
from input_pipeline import folder_stats, make_dataset

from dataset import eval_resize_size
from engine.checkpoint import RunState, rng_state, save_checkpoint
from train_ddp import train_one_epoch

BAR_START = r"\| 0/\d+ \["             # the epoch's progress bar, printed as the loop starts
AFTER_FIRST = r"\| 0/\d+ \[[^\r]*\r"   # tqdm's next write (update or close) follows the first step
FULL = dict(count=1000, val_count=64, model="resnet18", image_size=64, batch=64)
QUICK = dict(count=64, val_count=16, model="tiny_cnn", image_size=32, batch=16)
FILES = ["--num_workers", "2"]


def cli(root, scratch, name, extra, size):
    out = os.path.join(scratch, name)
    return [sys.executable, "train_ddp.py", "--train_dir", f"{root}/train", "--val_dir", f"{root}/val",
            "--model", size["model"], "--image_size", str(size["image_size"]), "--batch_size", str(size["batch"]),
            "--epochs", "1", "--num_sanity_val_steps", "0", "--limit_val_batches", "1", "--seed", "0",
            "--checkpoint_dir", f"{out}/checkpoints", "--log_dir", f"{out}/logs", *extra], f"{out}/logs"


def cache_flags(scratch):
    return ["--cache_images", os.path.join(scratch, "cache"), "--num_workers", "2"]


def cli_runner(command, log_dir, epoch_seconds):
    def run():
        common.run_timed(command)
        history = common.read_history(log_dir)
        epoch_seconds.append(history["epoch_seconds"][-1])
        return history["samples_per_second"][-1]
    return run


def throughput_rows(root, scratch, size, rounds, warmup, epoch_seconds):
    """images/s of (a), (b), (c), (c0) and (d), interleaved; fills epoch_seconds["a"] and ["b"]."""
    images, labels = harness.synthetic_images(size["count"], eval_resize_size(size["image_size"]))
    cpu = torch.device("cpu")

    def in_memory(augment):
        data = harness.in_memory_data(images, labels, size["batch"], cpu, augment=augment,
                                      image_size=size["image_size"])
        return harness.project_loop(harness.bench_args(size["model"], size["batch"], size["image_size"]), data, cpu)

    runners = {"(a) CLI, files, 2 workers": cli_runner(*cli(root, scratch, "a", FILES, size), epoch_seconds["a"]),
               "(b) CLI, --cache_images": cli_runner(*cli(root, scratch, "b", cache_flags(scratch), size),
                                                     epoch_seconds["b"]),
               "(b2) CLI, --cache_images --cache_format jpeg": cli_runner(
                   *cli(root, scratch, "b2", cache_flags(scratch) + ["--cache_format", "jpeg"], size), []),
               "(c) in-memory, batched crops": in_memory(augment=True),
               "(c0) in-memory, center crop": in_memory(augment=False),
               "(d) bare loop, pre-cropped in-memory tensors": harness.bare_loop(
                   size["model"], images[:, :size["image_size"], :size["image_size"]].copy(), labels, size["batch"],
                   cpu)}
    results = harness.interleave(runners, rounds, warmup)
    rows = []
    for name, values in results.items():
        median, ratio, spread = common.summary(values, results["(c) in-memory, batched crops"])
        rows.append([name, common.fmt(median), f"{ratio:.3f}", spread])
    return rows


def first_step_rows(root, scratch, size, rounds):
    """Seconds from the command to the epoch loop's start, to the first step done, to exit."""
    rows = []
    for label, flags in (("(a) files, 2 workers", FILES), ("(b) --cache_images (built)", cache_flags(scratch))):
        starts, afters, walls = [], [], []
        for _ in range(rounds):
            command, _ = cli(root, scratch, "first", flags + ["--limit_train_batches", "1"], size)
            run = common.run_timed(command, patterns=(BAR_START, AFTER_FIRST))
            starts.append(run["seen"][BAR_START])
            afters.append(run["seen"].get(AFTER_FIRST, float("nan")))
            walls.append(run["wall"])
        rows.append([label, f"{statistics.median(starts):.2f}", f"{statistics.median(afters):.2f}",
                     f"{statistics.median(walls):.2f}"])
    return rows


def checkpoint_seconds(scratch, size, repeats):
    """Median seconds of save_checkpoint for the checkpoint train_ddp writes at an epoch's end: the
    CLI runs' run built by training.build_training, trained one step (its AdamW state filled),
    written by RunState.to_checkpoint. Returns (seconds, file size)."""
    cpu, px, batch = torch.device("cpu"), size["image_size"], size["batch"]
    args = harness.bench_args(size["model"], batch, px, ["--checkpoint_dir", scratch, "--log_dir", scratch])
    data = harness.in_memory_data(*harness.synthetic_images(batch, px), batch, cpu)
    ctx = harness.one_process(cpu)
    training = harness.project_training(args, data, ctx)
    record = train_one_epoch(training, data, 1, RunState(), args, ctx).epoch_totals()
    state = RunState(epoch=1, best_acc=record["train_acc"], best_metric=record["train_acc"], best_epoch=1)
    checkpoint = state.to_checkpoint(training, data.class_names, vars(args), [rng_state()], None)
    path, times = os.path.join(scratch, "checkpoint_latest.pth"), []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        save_checkpoint(checkpoint, path)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), os.path.getsize(path)


def main():
    p = common.parser(__doc__, repeats=3)
    p.add_argument("--data", help="dataset folder to reuse (made there if missing); default: a temp dir")
    p.add_argument("--count", type=int, help="training JPEGs (default 1000, 64 with --quick)")
    p.add_argument("--model", help="torchvision model (default resnet18, tiny_cnn with --quick)")
    p.add_argument("--batch_size", type=int, help="batch size (default 64, 16 with --quick)")
    args = p.parse_args()
    size = dict(QUICK if args.quick else FULL)
    size.update(count=args.count or size["count"], model=args.model or size["model"],
                batch=args.batch_size or size["batch"])
    rounds, saves = common.repeats(args), 2 if args.quick else 5
    scratch = tempfile.mkdtemp(prefix="bench-e2e-")
    try:
        root = args.data or os.path.join(scratch, "data")
        make_dataset(root, size["count"], size["val_count"])
        files, mean_bytes = folder_stats(os.path.join(root, "train"))
        epoch_seconds = {"a": [], "b": []}
        rows = throughput_rows(root, scratch, size, rounds, not args.quick, epoch_seconds)
        first_rows = first_step_rows(root, scratch, size, rounds)
        save, checkpoint_bytes = checkpoint_seconds(scratch, size, saves)
        same_fs = os.stat(scratch).st_dev == os.stat(common.REPO).st_dev
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timed_epoch = {key: statistics.median(seconds[-rounds:]) for key, seconds in epoch_seconds.items()}
    save_rows = [[label, f"{timed_epoch[key]:.2f}", f"{save:.3f}", f"{100 * save / timed_epoch[key]:.1f}%"]
                 for key, label in (("a", "(a) files, 2 workers"), ("b", "(b) --cache_images"))]
    model, px, batch = size["model"], size["image_size"], size["batch"]
    body = (common.table(["path", "images/s (median)", "ratio to (c) (median)", "ratio range"], rows)
            + "\n\nTime from command to the first training step (`--limit_train_batches 1` runs; seconds, median):\n\n"
            + common.table(["path", "command -> epoch loop starts", "command -> first step done",
                            "command -> exit (1 step, 1 val batch, 2 checkpoint saves)"], first_rows)
            + f"\n\nCheckpoint save (checkpoint.save_checkpoint, {model} + AdamW state, "
              f"{checkpoint_bytes / 2**20:.1f} MiB, fsync'd; median of {saves}):\n\n"
            + common.table(["epoch of", "epoch seconds (train + 1 val batch, median)", "one save (s)",
                            "one save / epoch"], save_rows))
    common.write_report(args.results_dir, "end_to_end", "End to end: one CLI training epoch vs the in-memory ceiling",
                        body, [
        f"Data: {files} training JPEGs (mean {mean_bytes / 1024:.0f} KiB, ~500x375) + {size['val_count']} validation; "
        f"{model}, {px} px, batch {batch}, {files // batch} steps per epoch, one process, CPU float32.",
        f"{rounds} timed round(s){'' if args.quick else ' after 1 warm-up round'} (the first builds the cache for "
        "(b)); each CLI run is a fresh process; (a) and (b) report the history's samples_per_second, which "
        "includes the epoch's first batch wait (worker start-up for (a)) but not process start, validation or "
        "checkpointing.",
        "(c) does the cache path's per-batch work (uint8 batch read; crops and flips made by the reader threads) on "
        f"in-memory random images stored at {eval_resize_size(px)} px: the ceiling for (b); (c0) skips the random "
        "crops (center crop only); (d) is a bare loop (no loader, no metrics, no checks) on the same images "
        f"pre-cropped to {px} px.",
        "Each epoch saves checkpoint_latest.pth and, when validation accuracy improves, checkpoint_best.pth too: "
        "up to two saves per epoch.",
        f"Checkpoints were written to a temporary folder {'on the same' if same_fs else 'NOT on the same'} file "
        "system as the repository."])


if __name__ == "__main__":
    main()
