"""Versus torchvision's reference: this project and `references/classification/train.py` of
pytorch/vision, same recipe, same generated photos, 2 processes each (torchrun, gloo on the CPU).

The reference script is not part of this repository: pass the path of its train.py (with the
presets.py, transforms.py and utils.py it imports next to it) as --reference. Without it, or when
the path does not exist, the script prints one line saying what to pass and exits 0.

Data: input_pipeline.make_dataset's photo-like 500x375 JPEGs (default 960 training, 160
validation, 10 classes; --quick: 64 and 16 at 160x120). Its photos do not depend on their class,
so each photo is then given its class's colour cast (blended at TINT, re-saved as JPEG quality
90): the classes become learnable and the final top-1 accuracy means something. Both programs read the same folders.

Runs, each a fresh `python -m torch.distributed.run --standalone --nproc_per_node=2 ...`:

- reference: bench/reference_runner.py, which patches a few calls at run time (below)
  and then runs the reference's train.py with runpy as `__main__`, with its own flags;
- project, files: `train_ddp.py` on the JPEG folders (--num_workers W);
- project, --cache_images: the same with --cache_images (its fast path). One run builds the cache
  first (reported on its own row); the timed rounds reuse it;
- outside the shared recipe (--bf16_row, on by default, off with --quick): the project with
  --cache_images --use_amp --amp_dtype bfloat16 (CPU bfloat16 autocast), which the reference
  cannot do on the CPU (its --amp is torch.cuda.amp).

The runs alternate within each round (--repeats rounds, default 2; 1 with --quick). Without
--quick a cost model comes first: milliseconds per training image of the reference's item, the
project's item and the ResNet-18 step, one thread, which bound the speed-up any input path can give.

Recipe, in each program's own flags (`recipe` below): ResNet-18 from scratch (torchvision's
architecture in both), 10 classes, random resized crops (scale 0.08-1, ratio 3/4-4/3, bilinear)
and horizontal flips at --image_size px for training, resize to round(size / 0.875) + center crop
for validation, batch 32 per process (global 64), AdamW (lr 1e-3, weight decay 1e-4, default
betas), constant learning rate (the reference's StepLR with a step beyond the run; the project's
--lr_scheduler none), no warm-up, no label smoothing, W data-loading workers per process,
validation every epoch, checkpoints written every epoch. What cannot be made identical is listed
in the report's notes (NOT_IDENTICAL).

Measured: wall time from the command to its exit; training img/s (all ranks): the project's
history samples_per_second, and for the reference the same quantity timed by the runner around
the reference's own training loop (instrumentation only, see patch 6); final top-1 accuracy
(the project's history val_acc, the reference's last `Acc@1` line).

Run-time patches of the reference (in reference_runner.py; the reference's files are not edited):

1. torch.cuda.set_device: a no-op (utils.init_distributed_mode calls it with LOCAL_RANK; there is
   no GPU).
2. torch.distributed.init_process_group: backend "nccl" becomes "gloo" (utils.init_distributed_mode
   hard-codes nccl).
3. torch.nn.parallel.DistributedDataParallel: device_ids is dropped (train.py passes
   device_ids=[args.gpu]; DDP refuses device_ids for a CPU module).
4. In utils' namespace only, torch.tensor(..., device="cuda") creates the tensor on the CPU
   (SmoothedValue.synchronize_between_processes, and reduce_across_processes where utils has it,
   put the values to all-reduce on "cuda").
5. utils.reduce_across_processes, only when utils lacks it (a utils.py older than the train.py
   that calls it): a CPU all-reduce (sum) of the value, as a tensor.
6. Instrumentation, no change of behaviour: utils.MetricLogger.log_every is wrapped so that, for
   the training loop (header "Epoch: ..."), rank 0 prints the loop's seconds (from the first
   batch request, so the DataLoader's worker start-up is included, as in the project's figure, to
   the end of the last step) and the images it trained times the world size.

And its flag --device cpu (its default is cuda).

--recipe v2: torchvision's "new recipe" (the ResNet-50 v2 command) in both programs' own flags,
scaled to this CPU (`recipe_v2` below): SGD with momentum 0.9, lr 0.1, weight decay 2e-5 and none on
normalisation layers, one epoch of linear warm-up from 0.01x, then cosine; label smoothing 0.1,
TrivialAugment-wide, random erasing 0.1, mixup 0.2 and cutmix 1.0, EMA every EMA_STEPS steps
(the reference's --model-ema-decay rescaled by its own rule into the project's per-update
--ema_decay), FixRes sizes (training crop TRAIN_CROP_FRACTION of the validation crop, validation
resize 232/224 of it) and repeated augmentation (--ra-sampler --ra-reps 4 / --ra_reps 4). Default
data: 1,024 training photos (RASampler trains the size rounded down to 256 per epoch: all of them)
at a 64 px validation crop, 66 px resize and 50 px training crop, 3 epochs. The reference needs no further
patch for it on the CPU: its autocast is torch.cuda.amp.autocast(enabled=False) (a no-op) without
--amp, its EMA (utils.ExponentialMovingAverage, an AveragedModel) is built on --device, and its
mixup/cutmix (transforms.RandomMixup/RandomCutmix in the collate function) are device-agnostic.
The reference prints the EMA's accuracy on `Test: EMA` lines and the project records
ema_val_acc: both are reported. What stays different is listed in NOT_IDENTICAL_V2.

    python bench/vs_reference.py --reference /path/to/vision/references/classification/train.py
        [--quick] [--repeats N] [--data DIR] [--count N] [--val_count N] [--image_size PX]
        [--epochs N] [--workers N] [--no-bf16_row] [--recipe {plain,v2}] [--results_dir DIR]
"""
import os
import sys

import common
from reference_runner import EPOCH_LINE

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_runner.py")

TINT = 0.35  # share of the class colour in each photo's pixels
WORLD = 2
BATCH = 32
REFERENCE = "torchvision reference (train.py)"
BUILD = "project, --cache_images, first run (builds the cache)"
BUILD_IN_ROUND = "project, --cache_images (round 1's run builds the cache)"
BF16_FLAGS = ["--use_amp", "--amp_dtype", "bfloat16"]
BF16 = "outside the shared recipe: project, --cache_images " + " ".join(BF16_FLAGS)
FULL = dict(count=960, val_count=160, image_size=64, epochs=3, model="resnet18", photo_size=(500, 375))
QUICK = dict(count=64, val_count=16, image_size=32, epochs=1, model="resnet18", photo_size=(160, 120))
# v2: RASampler trains the training set's size rounded down to 256 per epoch, so at least 256 photos;
# 2 epochs at least, as the reference's cosine after a 1-epoch warm-up lasts epochs - 1.
FULL_V2 = dict(FULL, count=1024)
QUICK_V2 = dict(QUICK, count=256, epochs=2)
TRAIN_CROP_FRACTION = 176 / 224  # the v2 recipe's FixRes training crop, of the validation crop
VAL_RESIZE_FRACTION = 232 / 224  # and its validation resize
EMA_STEPS = 4  # the v2 recipe's 32, scaled to a run of 16 steps per epoch
REFERENCE_EMA_DECAY = 0.999  # the reference's --model-ema-decay (before its own rescaling)
NOT_IDENTICAL = [
    "Initial weights and sample order: the project is seeded (--seed 0, its own global-order sampler); the "
    "reference has no seed flag and shuffles with DistributedSampler. Both are from-scratch ResNet-18s of the same "
    "architecture and initialisation scheme, so accuracy agrees within run-to-run noise, not exactly.",
    "JPEG decoding: the reference decodes every photo at full size (PIL) and then crops; the project decodes at "
    "the smallest JPEG DCT scale that still covers the crop at the output size (PIL draft mode), or reads its "
    "uint8 cache (--cache_images), so its pixels differ slightly.",
    "Incomplete batches: the reference trains the last partial batch of an epoch; the project trains whole "
    "global batches only. The default counts divide evenly (no difference).",
    "Optimizer implementation: the project's AdamW is fused=True, the reference's is torch's default "
    "(foreach); same update rule and hyper-parameters.",
    "Loader workers: the reference's DataLoader starts its workers again every epoch (and passes "
    "pin_memory=True, a no-op without a GPU); the project's workers persist across epochs.",
    "Checkpoints: the reference saves model_<epoch>.pth and checkpoint.pth every epoch (torch.save); the project "
    "saves checkpoint_latest.pth every epoch and checkpoint_best.pth when validation accuracy improves "
    "(written to a temporary file, fsync'd, renamed).",
    "Step-level host syncs: the reference reads loss, top-1 and top-5 with .item() every step; the project reads "
    "its metrics every --log_every_steps (10) steps.",
]


NOT_IDENTICAL_V2 = [
    "Mixup/cutmix: the reference mixes each whole per-process batch with itself rolled by one, one lambda and one "
    "choice of mixup or cutmix per batch (RandomChoice of RandomMixup/RandomCutmix in the collate function); the "
    "project mixes pairs of consecutive global positions, a lambda and a choice per pair (--mix_switch_prob 0.5). "
    "Each sample's marginal distribution is the same; their correlation within a batch is not.",
    "Policy and erasing draws: the reference draws with torch's global RNG in each loader worker (and applies "
    "TrivialAugmentWide to a PIL image, RandomErasing after normalisation); the project draws from its "
    "counter-based generator and applies torchvision's uint8 tensor operations to the batch of crops in the "
    "worker, erasing in the batch stage after normalisation. Same policy tables, different numbers drawn.",
    "Learning-rate schedule: the reference steps its warm-up and cosine once per epoch (SequentialLR over epochs); "
    "the project steps them every optimizer step over the same epochs.",
    "EMA: the reference updates at in-epoch step i % steps == 0 and resets the average to the weights during the "
    "warm-up epoch(s); the project updates every --ema_steps global steps with timm's decay warm-up "
    "(--ema_warmup: min(decay, (1 + n) / (10 + n))), which also forgets the initial weights quickly but not "
    "identically. The per-update decay is the reference's own rescaling of --model-ema-decay.",
    "Optimizer implementation: the project's SGD is fused=True, the reference's is torch's default (foreach); same "
    "update rule (momentum 0.9, no Nesterov) and hyper-parameters.",
    "Repeated augmentation: the reference's RASampler repeats each index 4 times in a shuffled order drawn with "
    "torch's generator and deals them to ranks; the project's --ra_reps 4 repeats each position 4 times in its "
    "global order (copies on different ranks, each copy with its own sample key). Both train the dataset's size "
    "rounded down to 256 per epoch.",
]


def not_identical(v2):
    """The notes of the plain recipe, with the v2 recipe's in place of its optimizer note."""
    if not v2:
        return NOT_IDENTICAL
    return [text for text in NOT_IDENTICAL if not text.startswith("Optimizer")] + NOT_IDENTICAL_V2


def usage_line(reason):
    return (f"vs_reference: skipped: {reason}; pass --reference PATH/TO/vision/references/classification/train.py "
            "(torchvision's reference script, not part of this repository)")


# --- data -----------------------------------------------------------------------------------------

def class_colour(index, classes):
    import colorsys
    return [round(255 * c) for c in colorsys.hsv_to_rgb(index / classes, 0.9, 0.95)]


def tint_photo(path, colour):
    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels = (1 - TINT) * pixels + TINT * np.asarray(colour, dtype=np.float32)
    Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_photos(root, count, val_count, classes=10, photo_size=(500, 375)):
    """input_pipeline.make_dataset's photos, each given its class's colour cast (once: a marker
    file records it)."""
    import multiprocessing

    from input_pipeline import make_dataset
    make_dataset(root, count, val_count, classes, size=photo_size)
    marker = os.path.join(root, f".tinted-{count}-{val_count}-{classes}-{photo_size[0]}x{photo_size[1]}-{TINT}")
    if os.path.exists(marker):
        return root
    other = [name for name in os.listdir(root) if name.startswith(".tinted-")]
    if other:  # tinting again would compound the casts
        raise SystemExit(f"error: {root} holds photos tinted for another set-up ({other[0]}); use a fresh --data")
    jobs = []
    for split in ("train", "val"):
        for name in sorted(os.listdir(os.path.join(root, split))):
            folder = os.path.join(root, split, name)
            colour = class_colour(int(name.rsplit("_", 1)[1]), classes)
            jobs += [(os.path.join(folder, f), colour) for f in sorted(os.listdir(folder))]
    if len(jobs) <= 200:
        for job in jobs:
            tint_photo(*job)
    else:
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.starmap(tint_photo, jobs)
    open(marker, "w").close()
    return root


# --- the runs -------------------------------------------------------------------------------------

def torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]


def recipe(size, workers):
    """(reference flags, project flags) of the shared recipe."""
    px, epochs = size["image_size"], size["epochs"]
    from dataset import eval_resize_size
    reference = ["--device", "cpu", "--model", size["model"], "--batch-size", str(BATCH), "--epochs", str(epochs),
                 "--workers", str(workers), "--opt", "adamw", "--lr", "0.001", "--wd", "0.0001",
                 "--lr-scheduler", "steplr", "--lr-step-size", str(epochs + 1), "--lr-warmup-epochs", "0",
                 "--label-smoothing", "0", "--train-crop-size", str(px), "--val-crop-size", str(px),
                 "--val-resize-size", str(eval_resize_size(px))]
    project = ["--model", size["model"], "--batch_size", str(BATCH), "--epochs", str(epochs),
               "--num_workers", str(workers), "--optimizer", "adamw", "--learning_rate", "0.001",
               "--weight_decay", "0.0001", "--lr_scheduler", "none", "--warmup_steps", "0", "--label_smoothing", "0",
               "--image_size", str(px), "--num_sanity_val_steps", "0", "--seed", "0"]
    return reference, project


def v2_sizes(size):
    """(training crop, validation crop, validation resize) in px of the v2 recipe at size["image_size"]."""
    px = size["image_size"]
    return round(px * TRAIN_CROP_FRACTION), px, round(px * VAL_RESIZE_FRACTION)


def ema_decay_per_update(epochs):
    """The reference's EMA decay per update: it rescales --model-ema-decay by processes x batch x
    EMA steps / epochs (train.py), which the project takes as --ema_decay as is."""
    return 1.0 - min(1.0, (1.0 - REFERENCE_EMA_DECAY) * WORLD * BATCH * EMA_STEPS / epochs)


def recipe_v2(size, workers):
    """(reference flags, project flags) of torchvision's v2 recipe, scaled to this CPU."""
    epochs = size["epochs"]
    train_crop, val_crop, val_resize = v2_sizes(size)
    reference = ["--device", "cpu", "--model", size["model"], "--batch-size", str(BATCH), "--epochs", str(epochs),
                 "--workers", str(workers), "--opt", "sgd", "--lr", "0.1", "--momentum", "0.9", "--wd", "0.00002",
                 "--norm-weight-decay", "0.0", "--label-smoothing", "0.1", "--mixup-alpha", "0.2",
                 "--cutmix-alpha", "1.0", "--auto-augment", "ta_wide", "--random-erase", "0.1",
                 "--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "1", "--lr-warmup-method", "linear",
                 "--lr-warmup-decay", "0.01", "--model-ema", "--model-ema-steps", str(EMA_STEPS),
                 "--model-ema-decay", str(REFERENCE_EMA_DECAY), "--ra-sampler", "--ra-reps", "4",
                 "--interpolation", "bilinear", "--train-crop-size", str(train_crop), "--val-crop-size",
                 str(val_crop), "--val-resize-size", str(val_resize)]
    project = ["--model", size["model"], "--batch_size", str(BATCH), "--epochs", str(epochs),
               "--num_workers", str(workers), "--optimizer", "sgd", "--learning_rate", "0.1", "--momentum", "0.9",
               "--weight_decay", "0.00002", "--norm_weight_decay", "0.0", "--label_smoothing", "0.1",
               "--mixup_alpha", "0.2", "--cutmix_alpha", "1.0", "--auto_augment", "ta_wide", "--random_erase", "0.1",
               "--lr_scheduler", "cosine", "--lr_warmup_epochs", "1", "--lr_warmup_method", "linear",
               "--lr_warmup_decay", "0.01", "--use_ema", "--ema_warmup", "--ema_steps", str(EMA_STEPS),
               "--ema_decay", f"{ema_decay_per_update(epochs):.6f}", "--ra_reps", "4",
               "--train_crop_size", str(train_crop), "--val_crop_size", str(val_crop),
               "--val_resize_size", str(val_resize), "--num_sanity_val_steps", "0", "--seed", "0"]
    return reference, project


def recipe_flags(recipe_name, size, workers):
    return (recipe_v2 if recipe_name == "v2" else recipe)(size, workers)


def epoch_images(recipe_name, count):
    """Training images per epoch, all ranks: whole global batches of the dataset, or with the v2 recipe's
    repeated augmentation of its size rounded down to 256 (RASampler's length; the project's too)."""
    length = count // 256 * 256 if recipe_name == "v2" else count
    return length // (BATCH * WORLD) * BATCH * WORLD


def reference_run(train_py, root, out, flags):
    import re
    os.makedirs(out, exist_ok=True)
    run = common.run_timed(torchrun() + [RUNNER, train_py,
                                         "--data-path", root, "--output-dir", out, *flags])
    epochs = [(float(s), int(n)) for s, n in re.findall(rf"{EPOCH_LINE} .* seconds ([\d.]+) images (\d+)",
                                                         run["output"])]
    accs = [float(a) for a in re.findall(r"^(?!.*EMA).*Acc@1 ([\d.]+)", run["output"], flags=re.MULTILINE)]
    ema_accs = [float(a) for a in re.findall(r"EMA.*Acc@1 ([\d.]+)", run["output"])]
    if not epochs or not accs:
        raise RuntimeError(f"no epoch timing or Acc@1 in the reference's output:\n{run['output'][-3000:]}")
    return dict(wall=run["wall"], sps=[n / s for s, n in epochs], train_seconds=sum(s for s, _ in epochs),
                images=sum(n for _, n in epochs), accs=accs, ema_accs=ema_accs)


def project_run(root, out, flags):
    import re
    run = common.run_timed(torchrun() + ["train_ddp.py", "--train_dir", f"{root}/train", "--val_dir", f"{root}/val",
                                         "--checkpoint_dir", f"{out}/checkpoints", "--log_dir", f"{out}/logs",
                                         *flags])
    history = common.read_history(f"{out}/logs")
    return dict(wall=run["wall"], sps=list(history["samples_per_second"]), accs=list(history["val_acc"]),
                ema_accs=list(history.get("ema_val_acc", [])), images=None, train_seconds=None,
                cache_build=sum(float(s) for s in re.findall(r"built in ([\d.]+) s", run["output"])))


def run_rounds(train_py, root, scratch, size, workers, rounds, prebuild=True, bf16=False, recipe_name="plain"):
    """{name: [result per round]}: first (if `prebuild`) the project's --cache_images run that
    builds the cache, on its own row, then `rounds` rounds of the reference, the project on files
    and the project with the cache (and with it in bfloat16 autocast if `bf16`), alternating
    (without `prebuild` the first round's --cache_images run builds it)."""
    import shutil
    reference_flags, project_flags = recipe_flags(recipe_name, size, workers)
    cache = os.path.join(scratch, "cache")
    runs = {
        REFERENCE: lambda out: reference_run(train_py, root, out, reference_flags),
        "project, JPEG files": lambda out: project_run(root, out, project_flags),
        "project, --cache_images (cache built)": lambda out: project_run(root, out,
                                                                         project_flags + ["--cache_images", cache]),
    }
    if bf16:
        runs[BF16] = lambda out: project_run(root, out, project_flags + ["--cache_images", cache, *BF16_FLAGS])

    def run(name, out):
        try:
            return runs[name](out)
        finally:
            shutil.rmtree(out, ignore_errors=True)  # checkpoints: hundreds of MB per run

    build = run("project, --cache_images (cache built)", os.path.join(scratch, "out-build")) if prebuild else None
    results = {name: [] for name in runs}
    for round_index in range(rounds):
        for name in runs:
            results[name].append(run(name, os.path.join(scratch, f"out-{round_index}-{list(runs).index(name)}")))
    bf16_runs = results.pop(BF16, None)
    if build is not None:
        results[BUILD] = [build]
    else:  # the first --cache_images run built the cache
        results[BUILD_IN_ROUND] = results.pop("project, --cache_images (cache built)")
    if bf16_runs:
        results[BF16] = bf16_runs  # last
    return results


def train_seconds(result, images_per_epoch):
    """Training-loop seconds summed over the epochs."""
    return result["train_seconds"] or sum(images_per_epoch / v for v in result["sps"])


def train_sps(result, images_per_epoch):
    """Training images (all ranks) over training seconds, all epochs together."""
    images = result["images"] or len(result["sps"]) * images_per_epoch
    return images / train_seconds(result, images_per_epoch)


def report_rows(results, images_per_epoch, ema=False):
    """One row per run; with `ema`, a last column of the EMA's final top-1 per round."""
    import statistics
    base = results[REFERENCE]
    rows = []
    for name, runs in results.items():
        walls = [r["wall"] for r in runs]
        train = [train_seconds(r, images_per_epoch) for r in runs]
        sps = [train_sps(r, images_per_epoch) for r in runs]
        wall_ratios = [b["wall"] / r["wall"] for b, r in zip(base, runs)]
        sps_ratios = [s / train_sps(b, images_per_epoch) for b, s in zip(base, sps)]
        rows.append([name, f"{statistics.median(walls):.1f}", "; ".join(f"{w:.1f}" for w in walls),
                     f"{statistics.median(wall_ratios):.2f}", f"{min(wall_ratios):.2f}..{max(wall_ratios):.2f}",
                     f"{statistics.median(train):.1f}", f"{statistics.median(w - t for w, t in zip(walls, train)):.1f}",
                     f"{statistics.median(sps):.1f}", f"{statistics.median(sps_ratios):.2f}",
                     "; ".join(f"{r['accs'][-1]:.1f}" for r in runs),
                     "; ".join(" ".join(f"{a:.1f}" for a in r["accs"]) for r in runs)]
                    + (["; ".join(f"{r['ema_accs'][-1]:.1f}" for r in runs)] if ema else []))
    return rows


def cost_model(train_py, root, size, photos=128, steps=10):
    """Milliseconds per training image of each part, one thread (as each torchrun process has):
    the reference's training item (ImageFolder + its presets.ClassificationPresetTrain, loaded
    from next to train.py), the project's (dataset.AugmentedImageFolder: decode, crop, flip), and
    the ResNet-18 step (forward, backward, AdamW) at batch BATCH, fused and foreach AdamW."""
    import glob
    import importlib.util
    import statistics
    import time

    import torch
    import torchvision

    from dataset import AugmentedImageFolder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = importlib.util.spec_from_file_location("vsref_presets", os.path.join(os.path.dirname(train_py),
                                                                                    "presets.py"))
        presets = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(presets)
        px, train_dir = size["image_size"], os.path.join(root, "train")
        count = min(photos, len(glob.glob(os.path.join(train_dir, "*", "*.jpg"))))
        reference_set = torchvision.datasets.ImageFolder(train_dir, presets.ClassificationPresetTrain(crop_size=px))
        project_set = AugmentedImageFolder(train_dir, px, train=True, seed=0)

        items = {"reference item (decode full size, RandomResizedCrop, flip, to float, Normalize)":
                 lambda i: reference_set[i],
                 "project item (draft-mode decode, crop, flip; uint8)": lambda i: project_set[(1, i)]}
        item_seconds = {name: 0.0 for name in items}
        for _ in range(2):  # two passes, the two items alternating image by image (the machine's load drifts)
            for i in range(count):
                for name, item in items.items():
                    began = time.perf_counter()
                    item(i)
                    item_seconds[name] += time.perf_counter() - began
        costs = {name: 1000 * seconds / (2 * count) for name, seconds in item_seconds.items()}
        images, labels = torch.randn(BATCH, 3, px, px), torch.randint(0, 10, (BATCH,))
        runs = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = torchvision.models.resnet18(num_classes=10)
            runs[fused] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4,
                                                    fused=fused or None), [])
        for _ in range(steps + 2):  # the two optimizers alternating step by step; the first 2 dropped
            for model, optimizer, times in runs.values():
                began = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - began)
        for fused, (_, _, times) in runs.items():
            costs[f"ResNet-18 step per image (forward, backward, AdamW {'fused' if fused else 'foreach'})"] = \
                1000 * statistics.median(times[2:]) / BATCH
        return costs
    finally:
        torch.set_num_threads(threads)


def cost_model_v2(train_py, root, size, photos=128, steps=10):
    """cost_model's parts for the v2 recipe, one thread: the reference's item (its presets with
    TrivialAugment-wide and random erasing), the project's worker batch (AugmentedImageFolder's
    __getitems__ with the policy, per image), the project's batch stage (normalise, erase, mix; per
    image) and the ResNet-18 step with SGD (foreach, the reference's; fused, the project's), at the
    training crop."""
    import importlib.util
    import statistics
    import time

    import numpy as np
    import torch
    import torchvision

    from dataset import AugmentedImageFolder
    from engine.batches import BatchStage
    from inputs.mixing import Mixing
    from inputs.policies import Policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = importlib.util.spec_from_file_location("vsref_presets", os.path.join(os.path.dirname(train_py),
                                                                                    "presets.py"))
        presets = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(presets)
        px, train_dir = v2_sizes(size)[0], os.path.join(root, "train")
        reference_set = torchvision.datasets.ImageFolder(train_dir, presets.ClassificationPresetTrain(
            crop_size=px, auto_augment_policy="ta_wide", random_erase_prob=0.1))
        project_set = AugmentedImageFolder(train_dir, px, train=True, seed=0, policy=Policy("ta_wide"))
        stage = BatchStage(torch.device("cpu"), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.contiguous_format,
                           num_classes=10, random_erase=0.1, mixing=Mixing(0.2, 1.0))
        batches = [list(range(start, start + BATCH)) for start in range(0, min(photos, len(project_set)), BATCH)]
        labels = torch.randint(0, 10, (BATCH,))
        seconds = {"reference": 0.0, "project worker": 0.0, "project stage": 0.0}
        for _ in range(2):  # two passes, the programs alternating batch by batch (the machine's load drifts)
            for keys in batches:
                began = time.perf_counter()
                for i in keys:
                    reference_set[i]
                seconds["reference"] += time.perf_counter() - began
                began = time.perf_counter()
                items = project_set.__getitems__([(1, i) for i in keys])
                seconds["project worker"] += time.perf_counter() - began
                images = torch.stack([item[0] for item in items])
                began = time.perf_counter()
                stage.train_batch(images, labels, 1, np.asarray(keys, dtype=np.uint64))
                seconds["project stage"] += time.perf_counter() - began
        per_image = 1000 / (2 * len(batches) * BATCH)
        costs = {"reference item (decode full size, RandomResizedCrop, flip, TrivialAugmentWide on PIL, to float, "
                 "Normalize, RandomErasing)": seconds["reference"] * per_image,
                 "project worker batch per image (draft-mode decode, crop, flip, batched TrivialAugment-wide; uint8)":
                 seconds["project worker"] * per_image,
                 "project batch stage per image (normalise, random erasing, mixup/cutmix)":
                 seconds["project stage"] * per_image}
        images, targets = torch.randn(BATCH, 3, px, px), torch.softmax(torch.randn(BATCH, 10), 1)
        runs = {}
        for fused in (False, True):
            torch.manual_seed(0)
            model = torchvision.models.resnet18(num_classes=10)
            runs[fused] = (model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-5,
                                                  fused=fused or None), [])
        for _ in range(steps + 2):  # the two optimizers alternating step by step; the first 2 dropped
            for model, optimizer, times in runs.values():
                began = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(images), targets, label_smoothing=0.1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - began)
        for fused, (_, _, times) in runs.items():
            costs[f"ResNet-18 step per image (forward, backward, SGD {'fused' if fused else 'foreach'})"] = \
                1000 * statistics.median(times[2:]) / BATCH
        return costs
    finally:
        torch.set_num_threads(threads)


def cost_rows_v2(costs):
    """The v2 cost model's rows and its bounds: (reference step + item) over (project step + worker
    + stage) on files, and over (project step + stage) with the cache (whose policy is in the stage
    there: the worker's row is then paid in the stage instead)."""
    reference_item, worker, stage, step_foreach, step_fused = costs.values()
    rows = [[name, f"{ms:.2f}"] for name, ms in costs.items()]
    return rows, (step_foreach + reference_item) / (step_fused + worker + stage), \
        (step_foreach + reference_item) / (step_fused + stage)


def cost_rows(costs):
    reference_item, project_item, step_foreach, step_fused = costs.values()
    rows = [[name, f"{ms:.2f}"] for name, ms in costs.items()]
    files = (step_foreach + reference_item) / (step_fused + project_item)
    cache = (step_foreach + reference_item) / step_fused
    return rows, files, cache


def main():
    import argparse

    p = common.parser(__doc__, repeats=2)
    p.add_argument("--reference", help="torchvision's references/classification/train.py (or its folder)")
    p.add_argument("--data", help="dataset folder to reuse (made there if missing); default: a temp dir")
    p.add_argument("--count", type=int,
                   help=f"training photos (default {FULL['count']}, {QUICK['count']} with --quick)")
    p.add_argument("--val_count", type=int, help=f"validation photos (default {FULL['val_count']})")
    p.add_argument("--image_size", type=int, help=f"crop size in px (default {FULL['image_size']})")
    p.add_argument("--epochs", type=int, help=f"epochs (default {FULL['epochs']})")
    p.add_argument("--workers", type=int, default=1, help="data-loading workers per process, both programs "
                                                          "(default 1: 2 processes x 1 worker on 2 cores)")
    p.add_argument("--recipe", choices=["plain", "v2"], default="plain",
                   help="plain: crops and flips, AdamW, constant rate (default); v2: torchvision's new recipe "
                        "scaled to this CPU (report vs_reference_v2.md)")
    p.add_argument("--bf16_row", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the project with --cache_images " + " ".join(BF16_FLAGS) + " (default: on, off "
                        "with --quick)")
    args = p.parse_args()
    train_py = args.reference
    if train_py and os.path.isdir(train_py):
        train_py = os.path.join(train_py, "train.py")
    if not train_py:
        print(usage_line("no --reference given"), flush=True)
        return 0
    if not os.path.isfile(train_py):
        print(usage_line(f"{train_py} does not exist"), flush=True)
        return 0
    return measure(args, os.path.abspath(train_py))


def measure(args, train_py):
    import shutil
    import tempfile

    import harness  # noqa: F401  (puts the repository on sys.path)
    from input_pipeline import folder_stats

    v2 = args.recipe == "v2"
    size = dict((QUICK_V2 if v2 else QUICK) if args.quick else (FULL_V2 if v2 else FULL))
    for key in ("count", "val_count", "image_size", "epochs"):
        size[key] = getattr(args, key) or size[key]
    rounds = common.repeats(args)
    scratch = tempfile.mkdtemp(prefix="bench-vsref-")
    try:
        root = make_photos(args.data or os.path.join(scratch, "data"), size["count"], size["val_count"],
                           photo_size=size["photo_size"])
        files, mean_bytes = folder_stats(os.path.join(root, "train"))
        costs = None if args.quick else (cost_model_v2 if v2 else cost_model)(train_py, root, size)
        bf16 = not args.quick if args.bf16_row is None else args.bf16_row
        results = run_rounds(train_py, root, scratch, size, args.workers, rounds, prebuild=not args.quick, bf16=bf16,
                             recipe_name=args.recipe)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference_flags, project_flags = recipe_flags(args.recipe, size, args.workers)
    steps = epoch_images(args.recipe, size["count"]) // (BATCH * WORLD)
    body = (common.table(["run", "wall s (median)", "wall s per round", "speed-up: reference wall / wall (median)",
                          "speed-up range", "training s (median)", "rest of wall s (median)",
                          "training img/s, all ranks (median)", "img/s ratio to reference (median)",
                          "final top-1 % per round", "top-1 % per epoch, per round"]
                         + (["final EMA top-1 % per round"] if v2 else []),
                         report_rows(results, steps * BATCH * WORLD, ema=v2))
            + "\n\nFlags (each program's own; data and output paths added per run):\n\n"
            + f"- reference: `torchrun --standalone --nproc_per_node={WORLD} {train_py} {' '.join(reference_flags)}` "
              "(through this script's runner, which applies the patches below)\n"
            + f"- project: `torchrun --standalone --nproc_per_node={WORLD} train_ddp.py {' '.join(project_flags)}` "
              "(and `--cache_images DIR`)\n"
            + "\nRun-time patches of the reference (its files are not edited; see this script's docstring):\n\n"
            + "\n".join(f"{i}. {text}" for i, text in enumerate(PATCHES, 1)))
    if costs and v2:
        rows, files_bound, cache_bound = cost_rows_v2(costs)
        body += ("\n\nWhat each training image costs with the v2 recipe, one thread, in this process (the "
                 "reference's item from its own presets.py):\n\n" + common.table(["part", "ms per image"], rows)
                 + f"\n\nIf training were only these parts, CPU-bound on both cores, the project's speed-up over the "
                   f"reference would be at most (reference step + reference item) / (project step + worker batch + "
                   f"batch stage) = **{files_bound:.2f}** on files and (reference step + reference item) / (project "
                   f"step + batch stage) = **{cache_bound:.2f}** with the cache, leaving out the policy's cost there "
                   f"(the cache path runs the batched policy in the batch stage: add the worker row's policy share).")
    elif costs:
        rows, files_bound, cache_bound = cost_rows(costs)
        body += ("\n\nWhat each training image costs, one thread, in this process (the reference's item from its own "
                 "presets.py):\n\n" + common.table(["part", "ms per image"], rows)
                 + f"\n\nIf training were only these parts, CPU-bound on both cores, the project's speed-up over the "
                   f"reference would be at most (reference step + reference item) / (project step + project item) "
                   f"= **{files_bound:.2f}** on files and (reference step + reference item) / project step = "
                   f"**{cache_bound:.2f}** with the cache (whose per-image work is a uint8 copy and a crop).")
    title = "Versus torchvision's reference classification script" + (": the v2 recipe" if v2 else "")
    common.write_report(args.results_dir, "vs_reference_v2" if v2 else "vs_reference", title, body, [
        f"Data: {files} training photos (input_pipeline.make_dataset, {'x'.join(map(str, size['photo_size']))} JPEG, "
        f"mean {mean_bytes / 1024:.0f} "
        f"KiB) and {size['val_count']} validation, 10 classes, each photo blended {TINT:.0%} with its class's colour "
        f"so the classes are learnable; {size['model']}, {size['image_size']} px, batch {BATCH} x {WORLD} processes, "
        f"{steps} steps per epoch, {size['epochs']} epoch(s), {args.workers} loader worker(s) per process, CPU "
        "float32, gloo; torchrun sets 1 intra-op thread per process.",
        f"First the project's --cache_images run that builds the cache (its own row), then {rounds} round(s) of the "
        "runs alternating; each run is a fresh torchrun; speed-ups are per round (reference wall / run wall; "
        "the first-run row against round 1's reference), then median and range. Wall time is from the command to "
        "its exit: start-up, data set-up (the cache build in the first run), training, validation every epoch and "
        "checkpoints; training s is the training loops' seconds summed over the epochs, and the rest is wall minus "
        "training.",
        "Training img/s: training images (all ranks) over the training loops' seconds; the first epoch's loop "
        "includes the loader's worker start-up in both programs.",
        *([f"The first run's cache build (decoding the {files} training and {size['val_count']} validation photos "
           f"into uint8 caches, as the project prints it): {results[BUILD][0]['cache_build']:.1f} s of its wall "
           "time; its speed-up is against round 1's reference, a single pair on a machine whose load drifts."]
          if BUILD in results else []),
        *([f"Recipe: torchvision's v2 recipe scaled to this CPU ({size['epochs']} epochs, training crop "
           f"{v2_sizes(size)[0]} px, validation crop {v2_sizes(size)[1]} px after a {v2_sizes(size)[2]} px resize; "
           f"EMA every {EMA_STEPS} steps, the reference's --model-ema-decay {REFERENCE_EMA_DECAY} being "
           f"{ema_decay_per_update(size['epochs']):.6f} per update by its own rescaling, the project's "
           "--ema_decay). Training-accuracy logging under mixing differs (soft targets); validation accuracy is "
           "plain top-1 in both."] if v2 else []),
        *[f"Not identical: {text}" for text in not_identical(v2)],
        *([f"The row marked outside the shared recipe: {' '.join(BF16_FLAGS)} runs the project's forward pass "
           "and loss under CPU bfloat16 autocast (weights, gradients and the optimizer stay float32). The "
           "reference has no CPU equivalent: its --amp is torch.cuda.amp (CUDA only), so it would need editing."]
          if bf16 else [])])
    return 0


PATCHES = [
    "`torch.cuda.set_device`: a no-op (utils.init_distributed_mode calls it; no GPU).",
    "`torch.distributed.init_process_group`: backend nccl -> gloo (utils.init_distributed_mode hard-codes nccl).",
    "`torch.nn.parallel.DistributedDataParallel`: device_ids dropped (train.py passes device_ids=[args.gpu]; "
    "DDP refuses them for a CPU module).",
    "In utils' namespace only, `torch.tensor(..., device=\"cuda\")` makes a CPU tensor (the metric all-reduces).",
    "`utils.reduce_across_processes` supplied (a CPU all-reduce) only where the given utils.py lacks it (a "
    "utils.py older than its train.py).",
    "Instrumentation only: `utils.MetricLogger.log_every` timed around the training loop (rank 0 prints its "
    "seconds and images).",
]


if __name__ == "__main__":
    sys.exit(main())
