"""Input pipeline: images/s of producing model-ready training batches from real-size JPEGs.

Generates N photo-like JPEGs (~500x375: smooth gradients, random shapes, noise; quality 90) in an
ImageFolder (a temporary folder, or --data DIR, reused when already complete), then measures, at
--image_size 224 and 64, batch 64, shuffled, one pass per round:

- (a) baseline: torchvision ImageFolder + Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize]) through a DataLoader (persistent workers);
- (b) project, file path: dataset.AugmentedImageFolder(train=True) (JPEG draft-mode decode, uint8)
  through dataset.build_loaders' train loader (dataset.train_sampler), normalised in the main process
  with dataset.normalize, so every path ends with the same normalised float batch;
- (c) the same with fast_decode=False (full-size decode): isolates the draft-mode gain;
- (d) project, cache path: the train loader training.build_data makes with --cache_images
  (image_cache.CachedBatches over the cache it builds once, reported separately) in the main
  process (its crops run batched), normalised likewise;
- (e) the same over the compressed cache (--cache_format jpeg: JPEGs at the storage size, decoded
  by the reader threads).

(a)-(c) run at num_workers 1 and 2; (d) and (e) run in the main process and are compared with both.
Ratios are to the baseline at the same worker count, per round, then median and range.

    python bench/input_pipeline.py [--quick] [--data DIR] [--count N] [--repeats N] [--results_dir DIR]
    python bench/input_pipeline.py --profile   # milliseconds per image of each stage, one thread
"""
import glob
import itertools
import multiprocessing
import os
import shutil
import tempfile
import time

import common
import harness
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.io import decode_jpeg
from torchvision.transforms import functional as TF

from dataset import IMAGENET_MEAN, IMAGENET_STD, AugmentedImageFolder, build_loaders, normalize, planar, resized_crop
from engine.distributed import keep_freed_memory
from engine.training import build_data
from fastload.cache_file import storage_size
from fastload.cache_jpeg import EncodeForCache
from inputs.augment import draw_crops

IN_PROCESS_PHOTOS = 200  # at ~30 ms a photo, fewer are made faster here than by a pool of fresh processes
VAL_PHOTOS = 10  # one per class: the validation folder training.build_data needs
CACHED_PATHS = dict(raw="(d) project cache", jpeg="(e) project compressed cache")


def photo(path, seed, size=(500, 375)):
    """One photo-like JPEG: a smooth two-colour gradient with low-frequency shading, a dozen
    filled shapes, a slight blur (soft edges, as a lens gives) and sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(size) + 1) / 2
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    shade = 25 * np.sin(xx / rng.uniform(30, 90) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(30, 90))
    pixels = low + (high - low) * t[..., None] + shade[..., None]
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(-50, width)), int(rng.integers(-50, height))
        box = [x0, y0, x0 + int(rng.integers(20, 220)), y0 + int(rng.integers(20, 220))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(int(box[0] + rng.integers(0, 200)), int(box[1] + rng.integers(0, 200))) for _ in range(5)],
                         fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(root, train_count, val_count=0, classes=10, size=(500, 375)):
    """root/train/<class>/*.jpg (and root/val/...), made once: a complete folder is reused."""
    marker = os.path.join(root, f".complete-{train_count}-{val_count}-{classes}-{size[0]}x{size[1]}")
    if os.path.exists(marker):
        return root
    jobs = []
    for split, count in (("train", train_count), ("val", val_count)):
        for i in range(count):
            folder = os.path.join(root, split, f"class_{i % classes:02d}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{i:06d}.jpg"), i + (10**6 if split == "val" else 0), size))
    if len(jobs) <= IN_PROCESS_PHOTOS:  # each spawned worker re-imports the calling script, torch included
        list(itertools.starmap(photo, jobs))
    else:  # spawn, not fork: a fork after torch has started its thread pools can deadlock the children.
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.starmap(photo, jobs)
    open(marker, "w").close()
    return root


def photo_data(data_dir, images, batch_size, image_size, device, flags=()):
    """training.build_data over `images` generated training photos in data_dir (and VAL_PHOTOS
    validation ones), train_ddp `flags` added (--cache_images DIR: the cache path). Returns
    (the train_ddp args, the Data)."""
    root = make_dataset(data_dir, images, VAL_PHOTOS)
    args = harness.bench_args("resnet18", batch_size, image_size,
                              ["--train_dir", f"{root}/train", "--val_dir", f"{root}/val", *flags], device)
    return args, build_data(args, harness.one_process(device))


def folder_stats(folder):
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files if f.endswith(".jpg")]
    return len(sizes), float(np.mean(sizes))


def timed_pass(loader, epoch, to_model_input):
    """images/s of one full pass, from creating the iterator to the last normalised batch."""
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        images = to_model_input(batch[0])
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def runner(loader, to_model_input):
    epochs = iter(range(1, 10**6))
    return lambda: timed_pass(loader, next(epochs), to_model_input)


def measure(root, count, image_size, batch, rounds, cache_dir):
    train_dir = os.path.join(root, "train")
    baseline_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                      transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    baseline_set = datasets.ImageFolder(train_dir, transform=baseline_tf)
    fast_set = AugmentedImageFolder(train_dir, image_size, train=True, seed=0)
    full_set = AugmentedImageFolder(train_dir, image_size, train=True, seed=0, fast_decode=False)
    runners, groups = {}, {}
    for workers in (1, 2):
        loader = DataLoader(baseline_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=True)
        runners[f"(a) baseline, {workers}w"] = runner(loader, lambda x: x)
        for label, dataset in (("(b) project files", fast_set), ("(c) project files, fast_decode=False", full_set)):
            loader = build_loaders(dataset, dataset, batch, workers, 0, 1, seed=0, pin_memory=False)[0]
            runners[f"{label}, {workers}w"] = runner(loader, normalize)
        groups[workers] = [name for name in runners if name.endswith(f"{workers}w")]
    builds = []
    for name, cache_format in (CACHED_PATHS["raw"], "raw"), (CACHED_PATHS["jpeg"], "jpeg"):
        began = time.perf_counter()
        _, data = photo_data(root, count, batch, image_size, torch.device("cpu"),
                             ["--cache_images", cache_dir, "--num_workers", "2", "--cache_format", cache_format])
        images = data.train_loader.images
        builds.append(dict(format=cache_format, seconds=time.perf_counter() - began, mib=images.nbytes / 2**20,
                           shape=images.shape))
        runners[name] = runner(data.train_loader, normalize)
    results = harness.interleave(runners, rounds)
    rows = []
    for workers, names in groups.items():
        base = results[names[0]]
        for name in names + list(CACHED_PATHS.values()):
            median, ratio, spread = common.summary(results[name], base)
            cached = name in CACHED_PATHS.values()
            label = name if cached else name.rsplit(",", 1)[0]
            shown = "main process" if cached else str(workers)
            rows.append([image_size, f"{workers} worker(s)", label, shown, common.fmt(median), f"{ratio:.2f}", spread])
    return rows, builds


def profile_stages(train_dir, count):
    """Milliseconds per image of each stage of the file paths, one thread, over the same photos:
    what a path could gain at most by removing a stage."""
    torch.set_num_threads(1)
    files = sorted(glob.glob(os.path.join(train_dir, "*", "*.jpg")))[:count]
    encoded = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
    decoded = [Image.open(f).convert("RGB") for f in files]
    widths, heights = zip(*(image.size for image in decoded))
    boxes = draw_crops(0, 0, range(len(decoded)), widths, heights, (0.08, 1.0), 0.5)[0].tolist()
    tensors = [TF.pil_to_tensor(image) for image in decoded]

    def per_image(stage):
        stage(0)
        began = time.perf_counter()
        for i in range(len(files)):
            stage(i)
        return f"{(time.perf_counter() - began) / len(files) * 1000:.2f}"

    def draft(scale):
        def stage(i):
            with Image.open(files[i]) as image:
                image.draft("RGB", (image.width // scale, image.height // scale))
                return image.convert("RGB")
        return stage

    def edges(i):
        left, top, width, height = boxes[i]
        return left, top, left + width, top + height

    rows = [["-", "JPEG decode, full size (PIL)", per_image(lambda i: Image.open(files[i]).convert("RGB"))],
            ["-", "JPEG decode, full size (torchvision.io.decode_jpeg)", per_image(lambda i: decode_jpeg(encoded[i]))]]
    rows += [["-", f"JPEG decode at 1/{scale} scale (PIL draft: libjpeg DCT scaling)", per_image(draft(scale))]
             for scale in (2, 4, 8)]
    for size in (224, 64):
        baseline = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = datasets.ImageFolder(train_dir, transform=baseline)
        project = AugmentedImageFolder(train_dir, size, train=True, seed=0)
        rows += [
            [size, "baseline: ImageFolder item (decode, RandomResizedCrop, flip, ToTensor, Normalize)",
             per_image(lambda i: folder[i])],
            [size, "baseline transforms alone, on a decoded image", per_image(lambda i: baseline(decoded[i]))],
            [size, "project: AugmentedImageFolder item (decode, crop, flip; uint8)",
             per_image(lambda i: project[(1, i)])],
            [size, "crop + resize alone: PIL crop, then resize (the project's)",
             per_image(lambda i: decoded[i].crop(edges(i)).resize((size, size), Image.BILINEAR))],
            [size, "crop + resize alone: PIL resize with a box",
             per_image(lambda i: decoded[i].resize((size, size), Image.BILINEAR, box=edges(i)))],
            [size, "crop + resize alone: torch uint8 resized_crop (antialias)",
             per_image(lambda i: TF.resized_crop(tensors[i], boxes[i][1], boxes[i][0], boxes[i][3], boxes[i][2],
                                                 [size, size], antialias=True))]]
        crops = [decoded[i].resize((size, size), Image.BILINEAR, box=edges(i)) for i in range(len(files))]
        rows += [[size, "a crop's planes (CHW): numpy transpose of its HWC pixels",
                  per_image(lambda i: np.ascontiguousarray(np.asarray(crops[i]).transpose(2, 0, 1)))],
                 [size, "a crop's planes (CHW): dataset.planar (the project's)", per_image(lambda i: planar(crops[i]))]]
        rows += compressed_cache_stages(project, size, len(files), per_image)
    return rows


def compressed_cache_stages(dataset, size, count, per_image):
    """The compressed cache's reader work per image: its stored JPEG (S x S, quality 90) decoded,
    then cropped like the raw cache's (dataset.resized_crop in the S x S frame)."""
    side = storage_size(size)
    encoder = EncodeForCache(dataset.samples[:count], size, side, 90)
    blobs = [torch.from_numpy(encoder[i][1]) for i in range(count)]
    boxes = draw_crops(0, 0, range(count), side, side, (0.08, 1.0), 0.5)[0].tolist()

    def reader_work(i):
        left, top, width, height = boxes[i]
        pixels = decode_jpeg(blobs[i]).permute(1, 2, 0).numpy()
        return resized_crop(pixels, (left, top, left + width, top + height), size, False)
    return [[size, f"compressed cache: decode its {side} px JPEG ({np.mean([len(b) for b in blobs]) / 1024:.1f} "
                   "KiB, decode_jpeg)", per_image(lambda i: decode_jpeg(blobs[i]))],
            [size, "compressed cache: a reader's work (decode, crop + resize)", per_image(reader_work)]]


def main():
    p = common.parser(__doc__, repeats=5)
    p.add_argument("--profile", action="store_true", help="only the per-stage costs, one thread (see profile_stages)")
    p.add_argument("--data", help="dataset folder to reuse (made there if missing or incomplete); default: a temp dir")
    p.add_argument("--count", type=int, help="training JPEGs to generate (default 400, 60 with --quick)")
    p.add_argument("--batch_size", type=int, help="batch size (default 64, 16 with --quick: 60 images)")
    args = p.parse_args()
    count = args.count or (60 if args.quick else 400)
    batch = args.batch_size or (16 if args.quick else 64)
    rounds = common.repeats(args)
    scratch = tempfile.mkdtemp(prefix="bench-input-")
    try:
        root = args.data or os.path.join(scratch, "data")
        began = time.perf_counter()
        make_dataset(root, count, VAL_PHOTOS)
        files, mean_bytes = folder_stats(os.path.join(root, "train"))
        made = time.perf_counter() - began
        if args.profile:
            body = common.table(["image size", "stage", "ms per image"],
                                profile_stages(os.path.join(root, "train"), min(files, 200)))
            title = "Input pipeline: per-image cost of each stage"
            common.write_report(args.results_dir, "input_pipeline_profile", title, body, [
                f"Data: {min(files, 200)} of {files} generated JPEGs, mean {mean_bytes / 1024:.0f} KiB; one thread "
                "(torch.set_num_threads(1)), in this process, no DataLoader."])
            return
        keep_freed_memory()  # as setup_distributed does for a training process on a CPU
        rows, builds = [], []
        for image_size in (224, 64):
            size_rows, size_builds = measure(root, count, image_size, batch, rounds, os.path.join(scratch, "cache"))
            rows += size_rows
            builds += [[image_size, build["format"], "x".join(map(str, build["shape"])), f"{build['mib']:.1f}",
                        f"{build['mib'] / size_builds[0]['mib']:.3f}", f"{build['seconds']:.2f}",
                        common.fmt(files / build["seconds"])] for build in size_builds]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = (common.table(["image size", "group", "path", "workers", "images/s (median)",
                          "ratio to baseline, same group (median)", "ratio range"], rows)
            + "\n\nOne-time cache build (training.build_data with --cache_images: the training cache and the "
              f"{VAL_PHOTOS}-image validation one, 2 decode workers; images/s counts training images):\n\n"
            + common.table(["image size", "format", "cache shape (decoded)", "size (MiB)", "size / raw",
                            "build time (s)", "images/s"], builds))
    title = "Input pipeline: batches from JPEG files and from the image cache"
    common.write_report(args.results_dir, "input_pipeline", title, body, [
        f"Data: {files} JPEGs, mean {mean_bytes / 1024:.0f} KiB ({'reused ' + root if args.data else 'generated'}"
        f" in {made:.1f} s), 10 classes; batch {batch}, drop_last, shuffled; "
        f"one pass = {files // batch * batch} images.",
        f"{rounds} timed round(s) after 1 warm-up round; all paths interleaved within a round; persistent workers, "
        "so worker start-up is excluded but each pass's pipeline fill is included.",
        "Every path ends with the same normalised float32 NCHW batch in the main process (the project paths "
        "normalise their uint8 batches with dataset.normalize; the baseline's workers do it with Normalize).",
        "The main process keeps freed memory (distributed.keep_freed_memory), as a training process on a CPU does; "
        "the baseline's workers are forked from it.",
        "The cache paths run in the main process (no workers; on a CPU one reader thread, "
        "readahead.CPU_READER_THREADS, which also decodes the compressed cache's JPEGs); "
        "each is measured once per round and listed in both groups, "
        "compared with that group's baseline."])


if __name__ == "__main__":
    main()
