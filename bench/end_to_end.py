"""End to end: one training epoch through the real CLI vs the in-memory ceiling.

On a generated JPEG folder (input_pipeline's generator: ~500x375 photo-like JPEGs; default 1,000
training and 64 validation images, --quick 128 and 32), ResNet-18 at --image_size 64, batch 64,
one process, `python train_ddp.py ... --epochs 1 --num_sanity_val_steps 0 --limit_val_batches 1`:

- (a) file path, --num_workers 2;
- (b) --cache_images (the warm-up round builds the cache; timed rounds reuse it);
- (c) the in-memory ceiling: harness.project_loop (train_ddp.train_one_epoch over CachedBatches)
  on synthetic uint8 images stored at 73 px (what the cache stores for 64 px), cropped to 64 px
  with the cache's batched random crops, in this process; (c0) the same with a plain center crop.

Throughput is the history's samples_per_second (training steps only). Also measured:
time from command to the first training step (runs with --limit_train_batches 1: the moment the
epoch's progress bar appears, and the first output after it, which follows the first step), and
the checkpoint save time (checkpoint.save_checkpoint of a ResNet-18 training-state dict, as
train_ddp saves it) as a fraction of the measured epoch time.

    python bench/end_to_end.py [--quick] [--data DIR] [--count N] [--repeats N]
"""
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import common
import harness
from checkpoint import rng_state, save_checkpoint
from config import parse_args
from input_pipeline import folder_stats, make_dataset
from model import build_model
from recipe import build_optimizer, build_scheduler

BAR_START = r"\| 0/\d+ \["             # the epoch's progress bar, printed as the loop starts
AFTER_FIRST = r"\| 0/\d+ \[[^\r]*\r"   # tqdm's next write (update or close) follows the first step


def cli(root, scratch, name, extra):
    out = os.path.join(scratch, name)
    return [sys.executable, "train_ddp.py", "--train_dir", f"{root}/train", "--val_dir", f"{root}/val",
            "--model", "resnet18", "--image_size", "64", "--batch_size", "64", "--epochs", "1",
            "--num_sanity_val_steps", "0", "--limit_val_batches", "1", "--seed", "0",
            "--checkpoint_dir", f"{out}/checkpoints", "--log_dir", f"{out}/logs", *extra], f"{out}/logs"


def cli_runner(command, log_dir, epoch_seconds):
    def run():
        common.run_timed(command)
        history = common.read_history(log_dir)
        epoch_seconds.append(history["epoch_seconds"][-1])
        return history["samples_per_second"][-1]
    return run


def checkpoint_seconds(scratch, repeats):
    """Median time of save_checkpoint for the dict train_ddp saves (ResNet-18, AdamW state filled)."""
    args = parse_args(["--model", "resnet18", "--image_size", "64", "--batch_size", "64", "--epochs", "1",
                       "--checkpoint_dir", scratch, "--log_dir", scratch])
    model = build_model("resnet18", 10)
    optimizer = build_optimizer(model, args, args.learning_rate)
    scheduler = build_scheduler(optimizer, args, 15)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4)).backward()
    optimizer.step()
    scheduler.step()
    state = dict(model_state_dict=model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                 scaler_state_dict=torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                 scheduler_state_dict=scheduler.state_dict(), class_names=[f"class_{i:02d}" for i in range(10)],
                 model_name="resnet18", config=vars(args), rng=[rng_state()], epoch=1, step=0, best_acc=10.0,
                 best_metric=10.0, best_epoch=1, stale_epochs=0, top_k=[], history={}, train_partial=None)
    path, times = os.path.join(scratch, "checkpoint_latest.pth"), []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        save_checkpoint(state, path)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), os.path.getsize(path)


def main():
    p = common.parser(__doc__, repeats=3)
    p.add_argument("--data", help="dataset folder to reuse (made there if missing); default: a temp dir")
    p.add_argument("--count", type=int, help="training JPEGs (default 1000, 128 with --quick)")
    args = p.parse_args()
    count = args.count or (128 if args.quick else 1000)
    val_count = 32 if args.quick else 64
    rounds = common.repeats(args)
    scratch = tempfile.mkdtemp(prefix="bench-e2e-")
    try:
        root = args.data or os.path.join(scratch, "data")
        make_dataset(root, count, val_count)
        files, mean_bytes = folder_stats(os.path.join(root, "train"))
        cache = ["--cache_images", os.path.join(scratch, "cache"), "--num_workers", "2"]
        files_flags = ["--num_workers", "2"]
        seconds = {"a": [], "b": []}
        images, labels = harness.synthetic_images(count, 73)
        cpu = torch.device("cpu")
        runners = {"(a) CLI, files, 2 workers": cli_runner(*cli(root, scratch, "a", files_flags), seconds["a"]),
                   "(b) CLI, --cache_images": cli_runner(*cli(root, scratch, "b", cache), seconds["b"]),
                   "(c) in-memory, batched crops": harness.project_loop("resnet18", images, labels, 64, cpu,
                                                                        augment=True, image_size=64),
                   "(c0) in-memory, center crop": harness.project_loop("resnet18", images, labels, 64, cpu,
                                                                       augment=False, image_size=64)}
        results = harness.interleave(runners, rounds)
        rows = []
        for name, values in results.items():
            median, ratio, spread = common.summary(values, results["(c) in-memory, batched crops"])
            rows.append([name, common.fmt(median), f"{ratio:.3f}", spread])

        first_rows = []
        for label, flags in (("(a) files, 2 workers", files_flags), ("(b) --cache_images (built)", cache)):
            starts, afters, walls = [], [], []
            for _ in range(rounds):
                command, _ = cli(root, scratch, "first", flags + ["--limit_train_batches", "1"])
                run = common.run_timed(command, patterns=(BAR_START, AFTER_FIRST))
                starts.append(run["seen"][BAR_START])
                afters.append(run["seen"].get(AFTER_FIRST, float("nan")))
                walls.append(run["wall"])
            first_rows.append([label, f"{statistics.median(starts):.2f}", f"{statistics.median(afters):.2f}",
                               f"{statistics.median(walls):.2f}"])

        save, size = checkpoint_seconds(scratch, 2 if args.quick else 5)
        same_fs = os.stat(scratch).st_dev == os.stat(common.REPO).st_dev
        save_rows = [[label, f"{statistics.median(seconds[key][1:]):.2f}", f"{save:.3f}",
                      f"{100 * save / statistics.median(seconds[key][1:]):.1f}%"]
                     for key, label in (("a", "(a) files, 2 workers"), ("b", "(b) --cache_images"))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = (common.table(["path", "images/s (median)", "ratio to (c) (median)", "ratio range"], rows)
            + "\n\nTime from command to the first training step (`--limit_train_batches 1` runs; seconds, median):\n\n"
            + common.table(["path", "command -> epoch loop starts", "command -> first step done",
                            "command -> exit (1 step, 1 val batch, 2 checkpoint saves)"], first_rows)
            + f"\n\nCheckpoint save (checkpoint.save_checkpoint, ResNet-18 + AdamW state, {size / 2**20:.1f} MiB, "
              f"fsync'd; median of {2 if args.quick else 5}):\n\n"
            + common.table(["epoch of", "epoch seconds (train + 1 val batch, median)", "one save (s)",
                            "one save / epoch"], save_rows))
    common.write_report("end_to_end", "End to end: one CLI training epoch vs the in-memory ceiling", body, [
        f"Data: {files} training JPEGs (mean {mean_bytes / 1024:.0f} KiB, ~500x375) + {val_count} validation; "
        f"ResNet-18, 64 px, batch 64, {files // 64} steps per epoch, one process, CPU float32.",
        f"{rounds} timed round(s) after 1 warm-up round (which also builds the cache for (b)); each CLI run is a "
        "fresh process; (a) and (b) report the history's samples_per_second, which includes the epoch's first batch "
        "wait (worker start-up for (a)) but not process start, validation or checkpointing.",
        "(c) does the cache path's per-batch work (uint8 batch read; crops and flips made by the reader threads) on in-memory "
        "random images: the ceiling for (b); (c0) skips the random crops (center crop only).",
        "Each epoch saves checkpoint_latest.pth and, when validation accuracy improves, checkpoint_best.pth too: "
        "up to two saves per epoch.",
        f"Checkpoints were written to a temporary folder {'on the same' if same_fs else 'NOT on the same'} file "
        "system as the repository."])


if __name__ == "__main__":
    main()
