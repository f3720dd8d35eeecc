"""Joint checks: what the ranks' stop decision (signal, non-finite streak) costs, and why it runs
about every 0.25 s of training instead of every step.

Two gloo processes (1 intra-op thread each, as torchrun sets) on this machine:
- one check alone: distributed.JointChecks.run (a host read of the streak, an all-reduce of three
  numbers, their read back), median seconds per call;
- the project's loop (train_ddp.train_one_epoch, built by training.build_training over in-memory
  uint8 images, each rank its share) with the default cadence against a check at every step
  (JointChecks(seconds=0)), interleaved round by round; images/s over all ranks.
Workloads: tiny_cnn and ResNet-18 at 32 px, batch 64 per process (--quick: tiny_cnn, batch 16).

    python bench/joint_checks.py [--quick] [--repeats N] [--results_dir DIR]
"""
import itertools
import os
import socket
import statistics
import tempfile
import time

import common
import harness
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataset import train_sampler
from engine.checkpoint import RunState
from engine.distributed import DistContext, JointChecks, StopRequest
from fastload.image_cache import CachedBatches
from train_ddp import train_one_epoch

WORKLOADS = [("tiny_cnn", 64, 2560), ("resnet18", 64, 1280)]  # model, batch per process, images
QUICK = [("tiny_cnn", 16, 256)]


def worker(rank, port, workloads, rounds, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    lines = [f"check {check_seconds(ctx)}"]
    for model, batch, count in workloads:
        for cadence, rates in loop_rates(ctx, model, batch, count, rounds).items():
            lines.append("\t".join([model, cadence, " ".join(map(str, rates))]))
    if rank == 0:
        with open(result_path, "w") as f:
            f.write("\n".join(lines))
    dist.destroy_process_group()


def check_seconds(ctx, calls=300):
    """Median seconds of one joint check, every call a check (no cadence)."""
    checks, stop, times = JointChecks(ctx.device, seconds=0), StopRequest(), []
    stop.defer()
    streak = torch.zeros((), dtype=torch.float64)
    for step in range(1, calls + 4):
        dist.barrier()
        start = time.perf_counter()
        checks.run(step, stop, streak.item(), ctx.is_main)
        if step > 3:  # three warm-up calls
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_rates(ctx, model, batch, count, rounds):
    """{cadence: [images/s over both ranks per round]}, the first round a warm-up and dropped."""
    images, labels = harness.synthetic_images(count, 32)
    args = harness.bench_args(model, batch, 32, device=ctx.device)
    sampler = train_sampler(range(count), batch, ctx.rank, ctx.world_size, seed=0)
    loader = CachedBatches(images, labels, sampler, batch, True, 32, ctx.device, drop_last=True, augment=False)
    data = harness.loader_data(loader, count)
    runs = {"every 0.25 s (default)": JointChecks(ctx.device), "every step": JointChecks(ctx.device, seconds=0)}
    trainings = {name: harness.project_training(args, data, ctx) for name in runs}
    for name, checks in runs.items():
        trainings[name].checks = checks
    epochs, rates = itertools.count(1), {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, training in trainings.items():
            sums = train_one_epoch(training, data, next(epochs), RunState(), args, ctx)
            rate = sums.epoch_totals()["samples_per_second"]
            if round_index:
                rates[name].append(rate)
    return rates


def main():
    args = common.parser(__doc__, repeats=5).parse_args()
    rounds = common.repeats(args)
    workloads = QUICK if args.quick else WORKLOADS
    with tempfile.TemporaryDirectory() as scratch, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        path = os.path.join(scratch, "result")
        mp.spawn(worker, args=(port, workloads, rounds, path), nprocs=2)
        lines = open(path).read().splitlines()
    check = float(lines[0].split()[1])
    results = {}
    for line in lines[1:]:
        model, cadence, rates = line.split("\t")
        results.setdefault(model, {})[cadence] = [float(v) for v in rates.split()]
    rows = []
    for (model, batch, count), per_cadence in zip(workloads, results.values()):
        default = per_cadence["every 0.25 s (default)"]
        for cadence, values in per_cadence.items():
            median, ratio, spread = common.summary(values, default)
            step_ms = 1000 * 2 * batch / median
            rows.append([f"{model} 32px b{batch} x 2 processes", cadence, common.fmt(median), f"{step_ms:.1f}",
                         f"{ratio:.3f}", spread])
    body = (f"One joint check (2 gloo processes): median {1e6 * check:.0f} µs per call.\n\n"
            + common.table(["workload", "joint checks", "images/s (median)", "ms per step", "ratio to default",
                            "ratio range"], rows))
    common.write_report(args.results_dir, "joint_checks", "Joint checks: cost per call and per step", body, notes=[
        f"{rounds} timed round(s) after 1 warm-up round, the two cadences interleaved within each round.",
        "Epochs: " + "; ".join(f"{m}: {c} images ({c // (2 * b)} steps)" for m, b, c in workloads) + ".",
        "The default cadence checks at the first step, each epoch's last and about every 0.25 s between."])


if __name__ == "__main__":
    main()
