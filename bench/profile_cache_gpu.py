"""Where the cache path's time goes on a GPU (ResNet-18, 224 px, AMP fp16, channels_last, batch
256): the project's run (harness.project_loop) over training.build_data's cache loader
(gpu.pipeline_data: the same generated JPEGs and cache as bench/gpu.py).

    python3 bench/profile_cache_gpu.py kernels   # torch.profiler: GPU time per kernel over one epoch
    python3 bench/profile_cache_gpu.py crop      # time of the batch crop alone, per batch
    python3 bench/profile_cache_gpu.py sweep     # training rate by reader threads, and without augmentation
    py-spy record --threads --idle --format raw -o profile.txt -- python3 bench/profile_cache_gpu.py epochs
    python3 bench/profile_cache_gpu.py --quick kernels crop sweep epochs   # tiny sizes: checks the script

Without CUDA it runs only with --quick or --device cpu (on the CPU, where the profiler reports CPU time).
"""
import argparse
import os
import tempfile
import time

import harness
import torch
from gpu import pick_device, pipeline_data

from fastload import readahead
from inputs.augment import crop_and_flip

FLAGS = ["--use_amp", "--amp_dtype", "float16", "--channels_last"]
FULL = dict(model="resnet18", images=8000, image_size=224, batch_size=256, workers=16, epochs=4, best_of=3)
QUICK = dict(model="tiny_cnn", images=20, image_size=32, batch_size=4, workers=2, epochs=2, best_of=1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels(run_args, data, settings, device):
    """Device time by kernel over one epoch after a warm-up epoch: how much of it the crop takes."""
    run = harness.project_loop(run_args, data, device)
    run()
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as profile:
        rate = run()
        synchronize(device)
    print(f"epoch under the profiler: {rate:,.0f} images/s")
    print(profile.key_averages().table(sort_by=f"self_{device.type}_time_total", row_limit=25,
                                       max_name_column_width=70))


def seconds_per_call(fn, device, calls=20):
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def crop(run_args, data, settings, device):
    """The crop's own time per batch (stored pixels already on the device), the copy before it, and
    the reader thread's drawing of the batch's boxes and flips (on the host)."""
    loader = data.train_loader
    keys = list(iter(loader.sampler))[:loader.batch_size]
    indices = torch.tensor([index for _, index in keys])
    epochs = [epoch for epoch, _ in keys]
    boxes, flips = (torch.from_numpy(a) for a in loader.draw_crops(epochs, indices))
    stored = loader.pixels[indices]
    host = stored.pin_memory() if device.type == "cuda" else stored
    pixels, boxes, flips = stored.to(device), boxes.to(device), flips.to(device)
    shape, size = " x ".join(map(str, stored.shape)), loader.image_size
    for name, fn in [(f"host: draw_crops, {len(indices)} boxes and flips", lambda: loader.draw_crops(epochs, indices)),
                     (f"copy to {device.type} ({shape} uint8)", lambda: host.to(device, non_blocking=True, copy=True)),
                     (f"crop_and_flip, {len(indices)} crops to {size} x {size}",
                      lambda: crop_and_flip(pixels, boxes, flips, size))]:
        print(f"{name}: {seconds_per_call(fn, device) * 1000:.3f} ms per batch")


def sweep(run_args, data, settings, device):
    """Images/s: synthetic, then the cache path with 2, 4 and 8 reader threads, then without
    augmentation (center crops: no box drawing, no resize), each best of a few epochs after a warm-up."""
    def rate(label, rate_data):
        run = harness.project_loop(run_args, rate_data, device)
        run()
        print(f"{label}: {max(run() for _ in range(settings.best_of)):,.0f} images/s", flush=True)

    batch, steps = settings.batch_size, len(data.train_loader)
    rate("synthetic", harness.loader_data(harness.DeviceBatches(batch, settings.image_size, steps, device),
                                          batch * steps))
    default_threads = readahead.READER_THREADS
    for threads in (2, 4, 8):
        readahead.READER_THREADS = threads
        rate(f"cache, {threads} reader threads", data)
    readahead.READER_THREADS = default_threads
    data.train_loader.augment = False
    rate(f"cache, {default_threads} reader threads, no augmentation", data)
    data.train_loader.augment = True


def epochs(run_args, data, settings, device):
    run = harness.project_loop(run_args, data, device)
    for epoch in range(settings.epochs):
        print(f"epoch {epoch}: {run():,.0f} images/s", flush=True)


MODES = {"kernels": kernels, "crop": crop, "sweep": sweep, "epochs": epochs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modes", nargs="*", metavar="MODE",
                        help=f"what to measure, in order: {', '.join(MODES)} (default epochs)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK}): checks the script runs")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "gpu_bench_photos"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.modes = args.modes or ["epochs"]
    if set(args.modes) - set(MODES):
        parser.error(f"unknown mode(s) {sorted(set(args.modes) - set(MODES))}; choose from {', '.join(MODES)}")
    vars(args).update(QUICK if args.quick else FULL)
    device = pick_device(args)
    torch.backends.cudnn.benchmark = True
    run_args, data = pipeline_data(args, FLAGS, device, ["--cache_images", args.data.rstrip("/") + "_cache"])
    for mode in args.modes:
        print(f"== {mode}", flush=True)
        MODES[mode](run_args, data, args, device)


if __name__ == "__main__":
    main()
