"""Recipe costs per batch: what each part of the modern recipe costs on a batch of B images, on the
two sides where the project runs it, side by side in one process, and the batched policies against
torchvision's own v2 transforms applied sample by sample.

Sides (CPU here):
- worker: a file-path loader worker's share, AugmentedImageFolder.__getitems__ after the crops:
  inputs.policies.augment_batch on the worker's uint8 batch, with the one intra-op thread a
  DataLoader worker has;
- stage: the batch stage (engine/batches.py) as the cache and device-decode paths run it, with the
  process's intra-op threads: the same policy on the uint8 batch, then the float steps (progressive
  resize, normalisation, random erasing, mixup/cutmix), each timed alone with the project's own
  functions; last, BatchStage.train_batch with the whole v2 recipe at once.

Parts: the batched crop of the cache path (augment.draw_crops + crop_and_flip from stored images of
STORED_FRACTION x the crop), each policy (TrivialAugment-wide, RandAugment, AugMix, AutoAugment's
imagenet policy), colour jitter (COLOR_JITTER), random erasing (probability ERASE_PROB, the v2
recipe's, on the normalised float batch), mixup 0.2 / cutmix 1.0 (draw_pairs + mix_batch on the
float batch), progressive resize (the crop to PROGRESSIVE_FRACTION of it, antialiased, as the stage
does) and normalisation (dataset.normalize).

Versus torchvision: its transforms.v2 TrivialAugmentWide, RandAugment, AugMix, AutoAugment,
ColorJitter and RandomErasing called on each uint8 (float for erasing) image of the same batch, one
at a time, as a loader worker of torchvision's reference does, one thread; mixup/cutmix as its
RandomChoice([MixUp, CutMix]) on the whole batch. The ratio is per round (torchvision / project),
then median and range.

Measurement: one warm-up round, then --repeats rounds; every round times every measurement once, in
the same order, so the machine's drifting load reaches all of them alike. Reported: medians and
ranges of the rounds.

    python bench/recipe_costs.py [--quick] [--repeats N] [--batch B] [--size PX] [--results_dir DIR]
"""
import statistics
import sys
import time

import common
import harness  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dataset import IMAGENET_MEAN, IMAGENET_STD, normalize
from engine.batches import BatchStage
from inputs.augment import crop_and_flip, draw_crops
from inputs.mixing import Mixing, draw_pairs, mix_batch
from inputs.policies import Policy, augment_batch, erase_batch

SEED, EPOCH, CLASSES = 0, 1, 10
STORED_FRACTION = 256 / 224  # stored (cached) image side, of the crop: the cache's 256 px for a 224 px crop
PROGRESSIVE_FRACTION = 160 / 224
COLOR_JITTER = 0.4
ERASE_PROB = 0.1
MIXING = Mixing(mixup_alpha=0.2, cutmix_alpha=1.0)
POLICIES = {  # row name: (the project's policy, torchvision's per-sample transform)
    "TrivialAugment-wide (ta_wide)": (Policy("ta_wide"), v2.TrivialAugmentWide()),
    "RandAugment (ra, 2 ops, magnitude 9)": (Policy("ra"), v2.RandAugment()),
    "AugMix (augmix, severity 3)": (Policy("augmix"), v2.AugMix()),
    "AutoAugment imagenet (imagenet)": (Policy("imagenet"), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)),
    f"colour jitter {COLOR_JITTER}": (Policy(color_jitter=COLOR_JITTER),
                                      v2.ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER)),
}
CROP = "crop alone (draw_crops + crop_and_flip from stored images)"
ERASE = f"random erasing p={ERASE_PROB} (erase_batch, float batch)"
MIX = "mixup 0.2 / cutmix 1.0 (draw_pairs + mix_batch, float batch)"
NORMALIZE = "normalisation (dataset.normalize)"
WHOLE = "whole v2 stage: ta_wide, normalise, erase, mix (BatchStage.train_batch)"


def one_thread(function):
    """`function` run with one intra-op thread, as in a DataLoader worker."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function()
        finally:
            torch.set_num_threads(threads)
    return run


def inputs(batch, size):
    """Stored uint8 images (B, S, S, 3) with their crop draws, the uint8 crops (B, 3, size, size), the
    normalised float batch, labels and sample keys; the crops are of smooth random images (blurred
    noise) so histogram operations see photo-like spreads."""
    generator = torch.Generator().manual_seed(0)
    stored_side = round(size * STORED_FRACTION)
    noise = torch.rand(batch, 3, stored_side // 8, stored_side // 8, generator=generator) * 255
    stored = TF.resize(noise, [stored_side, stored_side], antialias=True).round().clamp(0, 255).to(torch.uint8)
    stored = stored.permute(0, 2, 3, 1).contiguous()
    keys = np.arange(batch, dtype=np.uint64)
    boxes, flips = draw_crops(SEED, EPOCH, keys, stored_side, stored_side, (0.08, 1.0), 0.5)
    crops = crop_and_flip(stored, torch.from_numpy(boxes), torch.from_numpy(flips), size)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return stored, crops, normalize(crops), labels, keys


def measurements(batch, size):
    """{(table, row, column): callable} of everything timed, in the order each round runs them."""
    stored, crops, floats, labels, keys = inputs(batch, size)
    stored_side = stored.shape[1]
    low = round(size * PROGRESSIVE_FRACTION)

    def crop():
        boxes, flips = draw_crops(SEED, EPOCH, keys, stored_side, stored_side, (0.08, 1.0), 0.5)
        return crop_and_flip(stored, torch.from_numpy(boxes), torch.from_numpy(flips), size)

    def mix():
        return mix_batch(floats, labels, CLASSES, draw_pairs(MIXING, SEED, EPOCH, keys[0::2], size, size))

    stage = BatchStage(torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD, torch.contiguous_format, seed=SEED,
                       num_classes=CLASSES, policy=Policy("ta_wide"), random_erase=ERASE_PROB, mixing=MIXING)
    runs = {("parts", CROP, "worker"): one_thread(crop), ("parts", CROP, "stage"): crop}
    for name, (policy, transform) in POLICIES.items():
        def project(policy=policy):
            return augment_batch(crops, policy, SEED, EPOCH, keys)

        def per_sample(transform=transform):
            return [transform(image) for image in crops]
        runs[("parts", name, "worker")] = one_thread(project)
        runs[("parts", name, "stage")] = project
        runs[("torchvision", name, "project")] = one_thread(project)
        runs[("torchvision", name, "torchvision")] = one_thread(per_sample)
    erasing = v2.RandomErasing(ERASE_PROB)
    mixing = v2.RandomChoice([v2.MixUp(alpha=MIXING.mixup_alpha, num_classes=CLASSES),
                              v2.CutMix(alpha=MIXING.cutmix_alpha, num_classes=CLASSES)])
    runs.update({
        ("parts", ERASE, "stage"): lambda: erase_batch(floats, ERASE_PROB, SEED, EPOCH, keys),
        ("parts", MIX, "stage"): mix,
        ("parts", f"progressive resize {size} -> {low} px (uint8, antialiased)", "stage"):
            lambda: TF.resize(crops, [low, low], antialias=True),
        ("parts", NORMALIZE, "stage"): lambda: normalize(crops),
        ("parts", WHOLE, "stage"): lambda: stage.train_batch(crops, labels, EPOCH, keys),
        ("torchvision", ERASE, "project"): one_thread(lambda: erase_batch(floats, ERASE_PROB, SEED, EPOCH, keys)),
        ("torchvision", ERASE, "torchvision"): one_thread(lambda: [erasing(image) for image in floats]),
        ("torchvision", MIX, "project"): one_thread(mix),
        ("torchvision", MIX, "torchvision"): one_thread(lambda: mixing(floats, labels)),
    })
    return runs


def time_rounds(runs, repeats):
    """{key: [seconds per round]}: a warm-up round dropped, then `repeats` rounds of every run in turn."""
    seconds = {key: [] for key in runs}
    for round_index in range(1 + repeats):
        for key, run in runs.items():
            began = time.perf_counter()
            run()
            if round_index:
                seconds[key].append(time.perf_counter() - began)
    return seconds


def ms(values):
    return f"{1000 * statistics.median(values):.2f}"


def spread(values):
    return f"{1000 * min(values):.2f}..{1000 * max(values):.2f}"


def report_tables(seconds, batch):
    parts, names = [], list(dict.fromkeys(row for table, row, _ in seconds if table == "parts"))
    for name in names:
        cells = [name]
        for side in ("worker", "stage"):
            values = seconds.get(("parts", name, side))
            cells += [ms(values), spread(values)] if values else ["-", "-"]
        stage_values = seconds[("parts", name, "stage")]
        parts.append(cells + [f"{1e6 * statistics.median(stage_values) / batch:.0f}"])
    versus = []
    for name in dict.fromkeys(row for table, row, _ in seconds if table == "torchvision"):
        ours, theirs = seconds[("torchvision", name, "project")], seconds[("torchvision", name, "torchvision")]
        ratios = [t / o for t, o in zip(theirs, ours)]
        versus.append([name, ms(ours), ms(theirs), f"{statistics.median(ratios):.2f}",
                       f"{min(ratios):.2f}..{max(ratios):.2f}"])
    return parts, versus


def main():
    p = common.parser(__doc__, repeats=7)
    p.add_argument("--batch", type=int, help="images per batch (default 64; 8 with --quick)")
    p.add_argument("--size", type=int, help="crop size in px (default 224; 32 with --quick)")
    args = p.parse_args()
    batch = args.batch or (8 if args.quick else 64)
    size = args.size or (32 if args.quick else 224)
    repeats = common.repeats(args)
    seconds = time_rounds(measurements(batch, size), repeats)
    parts, versus = report_tables(seconds, batch)
    threads = torch.get_num_threads()
    body = (f"Batch of {batch} images, {size} px crops, CPU; worker side: 1 intra-op thread (a DataLoader "
            f"worker's); batch stage: {threads} threads (this process's). Milliseconds per batch, median of "
            f"{repeats} rounds and range.\n\n"
            + common.table(["part", "worker ms/batch (median)", "worker range", "stage ms/batch (median)",
                            "stage range", "stage µs per image"], parts)
            + "\n\nThe project's batched policies and erasing/mixing against torchvision's v2 transforms called "
              "per sample on the same images (mixup/cutmix: per batch), both with one thread:\n\n"
            + common.table(["part", "project ms/batch (median)", "torchvision ms/batch (median)",
                            "ratio torchvision / project (median)", "ratio range"], versus))
    common.write_report(args.results_dir, "recipe_costs", "Recipe costs per batch", body, [
        "Worker side: what a file-path loader worker adds to its batch after decoding and cropping (the policy "
        "runs there; erasing, resizing, normalisation and mixing never do, hence '-'). Stage side: the same "
        "functions as the batch stage runs them on the cache and device-decode paths (here on the CPU).",
        "Each stage row is that part alone: the policy rows on the uint8 crops, erasing and mixing on the "
        "normalised float batch; the last row is the whole v2 stage in one BatchStage.train_batch call.",
        f"Crops: smooth random images (noise blurred by an 8x upscale) stored at {round(size * STORED_FRACTION)} "
        f"px, cropped by the cache path's batched crop; random erasing at p={ERASE_PROB} (the v2 recipe's), so "
        "torchvision's per-sample RandomErasing does nothing for most samples, while erase_batch builds one mask "
        "for the batch.",
        "Ratios are per round (torchvision / project), then median and range; above 1 means the project's "
        "batched version is faster."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
