"""Fine-tuning costs on this machine: what a frozen backbone (--freeze_backbone_epochs) and AMP
(--use_amp, bfloat16 on a CPU) change in step time and memory.

Each configuration trains in a fresh process (so its peak resident memory is its own): the project
loop (train_ddp.train_one_epoch, built by training.build_training) on in-memory uint8 images,
ResNet-18 at 64 px, batch 32, one warm-up epoch then timed epochs (--quick: 32 px, batch 8).
Rounds interleave the configurations; images/s over training steps and the process's peak RSS.

    python bench/finetune.py [--quick] [--repeats N] [--results_dir DIR]
"""
import argparse
import json
import resource
import subprocess
import sys

import common

CONFIGS = {"full training": [], "frozen backbone": ["--freeze_backbone_epochs", "1000000"],
           "AMP bfloat16": ["--use_amp", "--amp_dtype", "bfloat16"],
           "frozen + AMP bfloat16": ["--freeze_backbone_epochs", "1000000", "--use_amp", "--amp_dtype", "bfloat16"]}


def measure(flags, size, batch, count, epochs):
    """In this process: images/s of each timed epoch, and the peak RSS in MiB."""
    import warnings

    import torch

    import harness
    warnings.filterwarnings("ignore", message=".*bfloat16.*")
    images, labels = harness.synthetic_images(count, size)
    args = harness.bench_args("resnet18", batch, size, flags)
    run = harness.project_loop(args, harness.in_memory_data(images, labels, batch, torch.device("cpu")),
                               torch.device("cpu"))
    rates = [run() for _ in range(epochs + 1)][1:]
    return rates, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = common.parser(__doc__, repeats=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a child
    args = parser.parse_args()
    size, batch, count = (32, 8, 16) if args.quick else (64, 32, 640)
    if args.worker:
        rates, rss = measure(json.loads(args.worker), size, batch, count, epochs=1)
        print(json.dumps(dict(rate=rates[0], rss=rss)))
        return
    rounds = common.repeats(args)
    results = {name: dict(rates=[], rss=[]) for name in CONFIGS}
    for _ in range(rounds):
        for name, flags in CONFIGS.items():
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
    body = common.table(["configuration", "images/s (median)", "ratio to full", "ratio range", "peak RSS (MiB)",
                         "RSS ratio"], rows)
    common.write_report(args.results_dir, "finetune", "Fine-tuning: frozen backbone and AMP on this machine", body,
                        notes=[f"ResNet-18 at {size} px, batch {batch}, {count} images per epoch, one process; "
                               f"{rounds} round(s), each configuration in a fresh process per round (a warm-up "
                               "epoch, then one timed epoch).",
                               "Peak RSS is the whole process's (Python, torch, the images), so ratios understate "
                               "what the training state itself saves."])


if __name__ == "__main__":
    main()
