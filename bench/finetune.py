"""Fine-tuning costs on this machine: what a frozen backbone (--freeze_backbone_epochs) and AMP
(--use_amp: bfloat16 on a CPU, float16 on a GPU) change in step time and memory.

Each configuration trains in a fresh process (so its peak memory is its own): the project loop
(train_ddp.train_one_epoch, built by training.build_training) on in-memory uint8 images, one
warm-up epoch then a timed epoch. On a CPU: ResNet-18 at 64 px, batch 32, and the process's peak
RSS; with CUDA (bench/gpu.sh runs it): 224 px, batch 128, and the peak GPU memory allocated
(--quick: 32 px, batch 8). Rounds interleave the configurations; images/s over training steps.

    python bench/finetune.py [--quick] [--repeats N] [--results_dir DIR]
"""
import argparse
import json
import resource
import subprocess
import sys

import common

FROZEN = ["--freeze_backbone_epochs", "1000000"]


def configs(amp_dtype):
    amp = ["--use_amp", "--amp_dtype", amp_dtype]
    return {"full training": [], "frozen backbone": FROZEN, f"AMP {amp_dtype}": amp, f"frozen + AMP {amp_dtype}":
            FROZEN + amp}


def measure(flags, size, batch, count, epochs):
    """In this process: images/s of each timed epoch, and the peak memory in MiB (the process's
    RSS on a CPU, GPU memory allocated on a GPU)."""
    import warnings

    import harness
    import torch
    warnings.filterwarnings("ignore", message=".*bfloat16.*")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = harness.synthetic_images(count, size)
    args = harness.bench_args("resnet18", batch, size, flags, device)
    run = harness.project_loop(args, harness.in_memory_data(images, labels, batch, device), device)
    rates = [run() for _ in range(epochs + 1)][1:]
    if device.type == "cuda":
        return rates, torch.cuda.max_memory_allocated() / 2**20
    return rates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = common.parser(__doc__, repeats=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a child
    args = parser.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    size, batch, count = (32, 8, 16) if args.quick else (224, 128, 2048) if gpu else (64, 32, 640)
    if args.worker:
        rates, rss = measure(json.loads(args.worker), size, batch, count, epochs=1)
        print(json.dumps(dict(rate=rates[0], rss=rss)))
        return
    rounds = common.repeats(args)
    variants = configs("float16" if gpu else "bfloat16")
    results = {name: dict(rates=[], rss=[]) for name in variants}
    for _ in range(rounds):
        for name, flags in variants.items():
            worker = [sys.executable, __file__, "--worker", json.dumps(flags)] + (["--quick"] if args.quick else [])
            line = subprocess.run(worker, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            measured = json.loads(line)
            results[name]["rates"].append(measured["rate"])
            results[name]["rss"].append(measured["rss"])
    base = results["full training"]
    rows = []
    for name, measured in results.items():
        median, ratio, spread = common.summary(measured["rates"], base["rates"])
        rss = sorted(measured["rss"])[len(measured["rss"]) // 2]
        rows.append([name, common.fmt(median), f"{ratio:.3f}", spread, common.fmt(rss),
                     f"{rss / sorted(base['rss'])[len(base['rss']) // 2]:.2f}"])
    memory = "peak GPU memory" if gpu else "peak RSS"
    body = common.table(["configuration", "images/s (median)", "ratio to full", "ratio range", f"{memory} (MiB)",
                         "memory ratio"], rows)
    common.write_report(args.results_dir, "finetune", "Fine-tuning: frozen backbone and AMP on this machine", body,
                        notes=[f"ResNet-18 at {size} px, batch {batch}, {count} images per epoch, one process "
                               f"({'CUDA' if gpu else 'CPU'}); "
                               f"{rounds} round(s), each configuration in a fresh process per round (a warm-up "
                               "epoch, then one timed epoch).",
                               "Peak RSS is the whole process's (Python, torch, the images), so its ratios understate "
                               "what the training state itself saves; peak GPU memory is torch's allocations."])


if __name__ == "__main__":
    main()
