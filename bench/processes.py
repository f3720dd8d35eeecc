"""Processes: 1 vs 2 training processes on CPU (gloo) through the real torchrun, and what the
gradient all-reduce costs.

`python -m torch.distributed.run --standalone --nproc_per_node=N train_ddp.py ... --cache_images`
on a generated JPEG folder (so data loading is cheap and the same for every run), tiny_cnn and
resnet18 at 32 px, batch 64 per process, 2 epochs (--quick: tiny_cnn, batch 16, 1 epoch, 1 process
and 2 with accumulation, no preparation run); throughput = the last epoch's history
samples_per_second (all ranks counted). Configurations: 1 process, 2 processes, 2 processes with
--gradient_accumulation_steps 4, and 1 process with accumulation 4 (its own cost, no all-reduce).
One preparation run builds the cache; then every configuration runs once per round, interleaved;
ratios are to 1 process in the same round.

The all-reduce is measured directly: dist.all_reduce of one flat float32 tensor the size of the
model's gradients in a 2-process gloo group (1 thread each, as torchrun sets), median per call;
and the all-reduces that accumulation saves are counted from the loop's rule (one per optimizer
step instead of one per micro-batch).

    python bench/processes.py [--quick] [--count N] [--repeats N] [--results_dir DIR]
"""
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import common
import harness  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from input_pipeline import make_dataset

from model import build_model

SIZE = 32


def torchrun(root, scratch, nproc, model, batch, extra=(), epochs=2):
    out = os.path.join(scratch, f"run-{nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_ddp.py",
            "--train_dir", f"{root}/train", "--val_dir", f"{root}/val", "--cache_images", f"{scratch}/cache",
            "--model", model, "--image_size", str(SIZE), "--batch_size", str(batch), "--epochs", str(epochs),
            "--num_workers", "1", "--num_sanity_val_steps", "0", "--limit_val_batches", "1", "--seed", "0",
            "--checkpoint_dir", f"{out}/checkpoints", "--log_dir", f"{out}/logs", *extra], f"{out}/logs"


def throughput(command, log_dir):
    def run():
        common.run_timed(command)
        return common.read_history(log_dir)["samples_per_second"][-1]
    return run


def all_reduce_worker(rank, port, sizes, calls, result_path):
    """Median seconds of dist.all_reduce for each flat float32 size, in a 2-process gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    medians = []
    for numel in sizes:
        tensor, times = torch.randn(numel), []
        for call in range(calls + 3):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if call >= 3:  # three warm-up calls
                times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    if rank == 0:
        with open(result_path, "w") as f:
            f.write(" ".join(map(str, medians)))
    dist.destroy_process_group()


def all_reduce_seconds(sizes, calls, scratch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(scratch, "allreduce")
    mp.spawn(all_reduce_worker, args=(port, sizes, calls, path), nprocs=2)
    with open(path) as f:
        return [float(value) for value in f.read().split()]


def throughput_rows(root, scratch, models, configs, batch, epochs, rounds):
    """Rows of images/s per model and configuration, and {model: {configuration: [per round]}}."""
    rows, results = [], {}
    for model in models:
        runners = {label: throughput(*torchrun(root, scratch, nproc, model, batch, extra, epochs))
                   for label, nproc, extra in configs}
        results[model] = {name: [] for name in runners}
        for _ in range(rounds):  # fresh processes every run: the preparation run was the warm-up
            for name, run in runners.items():
                results[model][name].append(run())
        for name, values in results[model].items():
            median, ratio, spread = common.summary(values, results[model]["1 process"])
            rows.append([model, name, common.fmt(median), f"{ratio:.2f}", spread])
    return rows, results


def all_reduce_rows(results, count, batch, calls, scratch):
    """Rows of the measured all-reduce cost per model, and of the all-reduces accumulation 4 saves."""
    sizes = {model: sum(p.numel() for p in build_model(model, 10).parameters()) for model in ("tiny_cnn", "resnet18")}
    seconds = dict(zip(sizes, all_reduce_seconds(list(sizes.values()), calls, scratch)))
    comm_rows, saved_rows = [], []
    for model, numel in sizes.items():
        two_processes = results.get(model, {}).get("2 processes")
        step_2p = 2 * batch / statistics.median(two_processes) if two_processes else None
        comm_rows.append([model, f"{numel:,}", f"{numel * 4 / 2**20:.1f}", f"{seconds[model] * 1000:.2f}",
                          f"{step_2p * 1000:.0f}" if step_2p else "-",
                          f"{100 * seconds[model] / step_2p:.1f}%" if step_2p else "-"])
        micro = (math.ceil(count / 2)) // batch  # per process and epoch (whole batches only)
        updates = math.ceil(micro / 4)
        saved_rows.append([model, micro, micro, updates, micro - updates,
                           f"{(micro - updates) * seconds[model] * 1000:.0f}"])
    return comm_rows, saved_rows


def main():
    p = common.parser(__doc__, repeats=3)
    p.add_argument("--count", type=int, help="training JPEGs (default 1024, 128 with --quick)")
    args = p.parse_args()
    count = args.count or (128 if args.quick else 1024)
    batch, epochs = (16, 1) if args.quick else (64, 2)
    rounds = common.repeats(args)
    configs = [("1 process", 1, ()), ("2 processes", 2, ()),
               ("2 processes, accumulation 4", 2, ("--gradient_accumulation_steps", "4")),
               ("1 process, accumulation 4", 1, ("--gradient_accumulation_steps", "4"))]
    configs = [configs[0], configs[2]] if args.quick else configs
    models = ("tiny_cnn",) if args.quick else ("tiny_cnn", "resnet18")  # --quick: torchrun runs of tiny_cnn only
    scratch = tempfile.mkdtemp(prefix="bench-procs-")
    try:
        root = make_dataset(os.path.join(scratch, "data"), count, 64, size=(160, 120))
        if not args.quick:  # builds the cache, warms the page cache (--quick: its first run does)
            prep, _ = torchrun(root, scratch, 1, "tiny_cnn", batch, ["--limit_train_batches", "1"], epochs=1)
            common.run_timed(prep)
        rows, results = throughput_rows(root, scratch, models, configs, batch, epochs, rounds)
        comm_rows, saved_rows = all_reduce_rows(results, count, batch, 5 if args.quick else 20, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = (common.table(["model", "configuration", "images/s, all ranks (median)", "ratio to 1 process (median)",
                          "ratio range"], rows)
            + "\n\nGradient all-reduce measured directly (2-process gloo group, one flat float32 tensor of all "
              "parameters, median per call):\n\n"
            + common.table(["model", "parameters", "MiB", "all-reduce (ms)", "2-process step (ms, from above)",
                            "all-reduce / step"], comm_rows)
            + "\n\nAll-reduces per process and epoch with --gradient_accumulation_steps 4 (2 processes):\n\n"
            + common.table(["model", "micro-batches", "all-reduces without accumulation", "all-reduces with 4",
                            "saved", "saved time per epoch at the measured cost (ms)"], saved_rows))
    common.write_report(args.results_dir, "processes", "Processes: 1 vs 2 gloo processes through torchrun", body, [
        f"Data: {count} training JPEGs 160x120 (cached at 37 px: --cache_images, 32 px crops), batch {batch} per "
        f"process, so 2 processes train on a global batch of {2 * batch} (and {8 * batch} with accumulation 4): "
        "a data-parallel job's throughput at equal per-process batch, not the same optimisation.",
        f"{rounds} round(s){'' if args.quick else ' after one preparation run (cache build)'}; each run is a fresh "
        "torchrun; throughput is the "
        f"{'only' if epochs == 1 else 'last'} epoch's samples_per_second (training steps only, all ranks).",
        "torchrun sets OMP_NUM_THREADS=1 per process when nproc_per_node > 1; with 1 process torch uses both "
        "cores. On 2 cores the 2 processes also share the cores with any data loading.",
        "DDP all-reduces gradients in ~25 MiB buckets, overlapped with backward; the flat tensor measures the "
        "same bytes in one call. Counts follow train_ddp.train_one_epoch: one all-reduce per optimizer step, "
        "micro-batches inside model.no_sync() skip it."])


if __name__ == "__main__":
    main()
