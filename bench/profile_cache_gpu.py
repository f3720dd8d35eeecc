"""Where the cache path's time goes on a GPU (ResNet-18, 224 px, AMP fp16, channels_last, batch 256).

    python3 bench/profile_cache_gpu.py kernels   # torch.profiler: GPU time per kernel over one epoch
    python3 bench/profile_cache_gpu.py crop      # GPU time of the batch crop alone, per batch
    python3 bench/profile_cache_gpu.py sweep     # training rate by reader threads, and without augmentation
    py-spy record --threads --idle --format raw -o profile.txt -- python3 bench/profile_cache_gpu.py epochs
"""
import os
import sys
import tempfile

import torch

from harness import DeviceBatches, project_loop
from input_pipeline import make_dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import image_cache  # noqa: E402
from dataset import AugmentedImageFolder, EpochTaggedSampler  # noqa: E402
from image_cache import CachedBatches, build_or_open, crop_and_flip  # noqa: E402

CUDA = torch.device("cuda")
FLAGS = ["--use_amp", "--amp_dtype", "float16", "--channels_last"]


def cached_loader():
    data = os.path.join(tempfile.gettempdir(), "gpu_bench_photos")
    folder = os.path.join(make_dataset(data, 8000), "train")
    dataset = AugmentedImageFolder(folder, 224, train=True)
    images, _, _ = build_or_open(dataset, 224, data + "_cache", 16, lambda: None)
    return CachedBatches(images, dataset.targets, EpochTaggedSampler(dataset, 1, 0, seed=0), 256, True, 224,
                         CUDA, drop_last=True)


def kernels(loader):
    """GPU time by kernel over one epoch after a warm-up epoch: how much of it the crop takes."""
    run = project_loop("resnet18", None, None, 256, CUDA, image_size=224, loader=loader, flags=FLAGS)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        rate = run()
        torch.cuda.synchronize()
    print(f"epoch under the profiler: {rate:,.0f} images/s")
    print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


def crop(loader):
    """The crop's own GPU time per batch (stored pixels already on the GPU), by CUDA events."""
    keys = list(iter(loader.sampler))
    pixels, _, _, boxes, flips = loader.read_batch(keys[:256])
    pixels, boxes, flips = pixels.to(CUDA), boxes.to(CUDA), flips.to(CUDA)
    pinned = loader.read_batch(keys[:256])[0]
    for name, fn in [("copy to GPU (pinned, 256 x 256 x 256 x 3 uint8)", lambda: pinned.to(CUDA, non_blocking=True)),
                     ("crop_and_flip, 256 crops to 224 x 224", lambda: crop_and_flip(pixels, boxes, flips, 224))]:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"{name}: {start.elapsed_time(end) / 20:.2f} ms per batch")


def sweep(loader):
    """Images/s: synthetic, then the cache path with 2, 4 and 8 reader threads, then without
    augmentation (center crops: no box drawing, no resize), each best of 3 epochs after a warm-up."""
    def rate(label, data):
        run = project_loop("resnet18", None, None, 256, CUDA, image_size=224, loader=data, flags=FLAGS)
        run()
        print(f"{label}: {max(run() for _ in range(3)):,.0f} images/s", flush=True)

    rate("synthetic", DeviceBatches(256, 224, 31, CUDA))
    for threads in (2, 4, 8):
        image_cache.READER_THREADS = threads
        rate(f"cache, {threads} reader threads", loader)
    image_cache.READER_THREADS = 4
    loader.augment = False
    rate("cache, 4 reader threads, no augmentation", loader)


def epochs(loader):
    run = project_loop("resnet18", None, None, 256, CUDA, image_size=224, loader=loader, flags=FLAGS)
    for epoch in range(4):
        print(f"epoch {epoch}: {run():,.0f} images/s", flush=True)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    {"kernels": kernels, "crop": crop, "sweep": sweep, "epochs": epochs}[sys.argv[1] if len(sys.argv) > 1 else "epochs"](cached_loader())
