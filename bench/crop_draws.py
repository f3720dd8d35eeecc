"""Crop draws: the host time to draw a batch's random-resized-crop boxes and flips, per batch.

The cache path's reader threads draw every batch's boxes beside the thread that launches the
training kernels; on an H100 the per-sample
Python draws held the GIL about 2.4 ms per 256-image batch (BENCHMARKS.md). Measured, one thread,
batch 256 (64 with --quick) of a 256 px stored image cropped to 224:
- (a) the previous implementation: a Python random.Random per sample, seeded from
  (seed, epoch, index), and RandomResizedCrop.get_params' rule in Python (commit 95d5adc);
- (b) torchvision's RandomResizedCrop.get_params per sample, from a per-sample torch.Generator;
- (c) augment.draw_crop one sample at a time (the same generator as (d), unbatched);
- (d) augment.draw_crops for the whole batch (the project's).

    python bench/crop_draws.py [--quick] [--repeats N] [--results_dir DIR]
"""
import math
import random
import time

import common
import harness  # noqa: F401  (puts the repository on sys.path)
import torch
from torchvision.transforms import RandomResizedCrop

from inputs.augment import CROP_RATIO, draw_crop, draw_crops

STORED, SCALE = 256, (0.08, 1.0)  # the cache's 256 px images, cropped for 224 px training


def python_random_draws(epoch, indices):
    """(a): one random.Random per sample and get_params' rule, as the project drew them before."""
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    out = []
    for index in indices:
        rng = random.Random((epoch * 1_000_000_007 + index) % 2**63)  # seed 0
        box = 0, 0, STORED, STORED  # the fallback for a square image: all of it
        for _ in range(10):
            target = STORED * STORED * rng.uniform(*SCALE)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= STORED and 0 < h <= STORED:
                box = rng.randint(0, STORED - w), rng.randint(0, STORED - h), w, h
                break
        out.append((box, rng.random() < 0.5))
    return out


def torchvision_draws(epoch, indices):
    """(b): get_params and a flip from a torch.Generator seeded per sample."""
    image = torch.empty(3, STORED, STORED)
    out = []
    for index in indices:
        generator = torch.Generator().manual_seed(epoch * 1_000_000_007 + index)
        with torch.random.fork_rng():
            torch.set_rng_state(generator.get_state())
            box = RandomResizedCrop.get_params(image, list(SCALE), list(CROP_RATIO))
            out.append((box, torch.rand(1).item() < 0.5))
    return out


def main():
    args = common.parser(__doc__, repeats=5).parse_args()
    torch.set_num_threads(1)
    batch = 64 if args.quick else 256
    indices = list(range(batch))
    ways = {
        "(a) Python random.Random per sample (before)": lambda: python_random_draws(1, indices),
        "(b) torchvision get_params, torch.Generator per sample": lambda: torchvision_draws(1, indices),
        "(c) augment.draw_crop, one sample per call": lambda: [draw_crop(0, 1, i, STORED, STORED, SCALE, 0.5)
                                                              for i in indices],
        "(d) augment.draw_crops, the whole batch (the project's)":
            lambda: draw_crops(0, 1, indices, STORED, STORED, SCALE, 0.5),
    }
    rounds = common.repeats(args)
    times = {name: [] for name in ways}
    for round_number in range(rounds + 1):  # round 0 warms up
        for name, way in ways.items():
            began = time.perf_counter()
            calls = 0
            while calls < 3 or time.perf_counter() - began < (0.05 if args.quick else 0.5):
                way()
                calls += 1
            if round_number:
                times[name].append((time.perf_counter() - began) / calls * 1000)
    base = times[next(iter(ways))]
    rows = []
    for name, values in times.items():
        median, ratio, spread = common.summary(values, base)
        rows.append([name, f"{median:.3f}", f"{1000 * median / batch:.2f}", f"{1 / ratio:.2f}"])
    common.write_report(args.results_dir, "crop_draws", "Crop draws: host time per batch", common.table(
        ["way", f"ms per batch of {batch}", "µs per sample", "speed-up over (a)"], rows), notes=[
        f"{rounds} timed round(s) after a warm-up round; each way called repeatedly for at least "
        f"{0.05 if args.quick else 0.5} s per round, the ways interleaved; medians.",
        f"Boxes of a {STORED} x {STORED} stored image, scale {SCALE}, flip probability 0.5.",
        "One intra-op thread (torch.set_num_threads(1)), as in a reader thread."])


if __name__ == "__main__":
    main()
