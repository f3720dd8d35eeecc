"""CPU allocator: what distributed.keep_freed_memory (applied by setup_distributed on a CPU) buys.

glibc serves every allocation over 32 MB from a fresh mmap and unmaps it on free, so a CPU
training step page-faults its large tensors (a normalised 224 px batch, big activations) in
again every time. Each configuration runs in its own process (allocator settings are
per-process), default glibc against keep_freed_memory, interleaved round by round:
- normalize (dataset.normalize) of a uint8 batch of 64 x 3 x 224 x 224, ms per call;
- the project's loop (harness.project_loop: train_ddp.train_one_epoch) training ResNet-18 on
  synthetic uint8 batches already in memory: 224 px batch 32, and 64 px batch 64; images/s;
- the process's peak resident memory and its page faults.
--quick: tiny_cnn at 32 px, a few steps.

    python bench/cpu_allocator.py [--quick] [--repeats N] [--results_dir DIR]
"""
import json
import resource
import subprocess
import sys
import time

import common
import harness
import torch

from dataset import normalize
from engine.distributed import keep_freed_memory

FULL = dict(normalize=(64, 224), loops=[("resnet18", 224, 32, 4), ("resnet18", 64, 64, 12)])
QUICK = dict(normalize=(8, 64), loops=[("tiny_cnn", 32, 16, 4)])


def child(mode, quick):
    """One configuration, in this process: prints its figures as one JSON line."""
    if mode == "kept":
        assert keep_freed_memory(), "keep_freed_memory did not apply (MALLOC_* set, or no glibc?)"
    settings = QUICK if quick else FULL
    torch.manual_seed(0)
    batch, size = settings["normalize"]
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    for _ in range(3):
        normalize(images)
    began = time.perf_counter()
    for _ in range(20):
        normalize(images)
    result = {"normalize": (time.perf_counter() - began) / 20 * 1000}
    for model, size, batch, steps in settings["loops"]:
        args = harness.bench_args(model, batch, size)
        data = harness.loader_data(harness.DeviceBatches(batch, size, steps, torch.device("cpu")), steps * batch)
        run = harness.project_loop(args, data, torch.device("cpu"))
        run()  # warm-up epoch: the heap grows to its working size
        result[f"{model} {size}px b{batch}"] = run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(maxrss=usage.ru_maxrss / 1024, faults=usage.ru_minflt)
    print(json.dumps(result), flush=True)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], "--quick" in sys.argv)
    args = common.parser(__doc__, repeats=3).parse_args()
    rounds = {"default": [], "kept": []}
    for _ in range(common.repeats(args)):
        for mode in rounds:
            command = [sys.executable, __file__, "--child", mode] + (["--quick"] if args.quick else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rounds[mode].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for key in rounds["default"][0]:
        default, kept = ([r[key] for r in rounds[mode]] for mode in ("default", "kept"))
        median_default, _, _ = common.summary(default, default)
        median_kept, ratio, spread = common.summary(kept, default)
        if key == "normalize":
            label, digits = "normalize, ms per call (lower is better)", 2
        elif key == "maxrss":
            label, digits = "peak resident memory, MiB", 0
        elif key == "faults":
            label, digits = "page faults, whole process", 0
        else:
            label, digits = f"training {key}, images/s", 1
        rows.append([label, common.fmt(median_default, digits), common.fmt(median_kept, digits), f"{ratio:.3f}",
                     spread])
    batch, size = (QUICK if args.quick else FULL)["normalize"]
    common.write_report(args.results_dir, "cpu_allocator", "CPU allocator: keeping freed memory", common.table(
        ["measure", "glibc default", "keep_freed_memory", "ratio kept / default (median)", "ratio range"], rows),
        notes=[f"{common.repeats(args)} round(s), the two configurations interleaved, each in a fresh process "
               "(after a warm-up epoch per workload).",
               f"normalize: a {batch} x 3 x {size} x {size} uint8 batch, 20 calls after 3 warm-up calls.",
               "Training: the project's loop (train_one_epoch, one process, torch's default threads) on "
               "synthetic batches already in memory, no input pipeline."])


if __name__ == "__main__":
    main()
