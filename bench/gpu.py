"""ResNet-18 training throughput on a GPU, through the project's own loop (train_one_epoch):
precision (fp32, AMP fp16, AMP bf16) x channels_last x torch.compile on synthetic data already on
the GPU (the ceiling), then the real input pipelines on ~500x375 JPEGs: the decoded-image cache
(crops on the GPU) and the file path (PIL workers). Peak GPU memory per configuration.

    python bench/gpu.py [--batch_size 256] [--steps 60] [--images 8000] [--quick] [--device cpu] [--pipelines]
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch

from harness import DeviceBatches, project_loop
from input_pipeline import make_dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import AugmentedImageFolder, build_loaders  # noqa: E402
from image_cache import CachedBatches, build_or_open  # noqa: E402
from dataset import EpochTaggedSampler  # noqa: E402

PRECISIONS = {"fp32": [], "fp16": ["--use_amp", "--amp_dtype", "float16"], "bf16": ["--use_amp", "--amp_dtype", "bfloat16"]}


def measure(label, make_runner, device, repeats=2):
    """Best of `repeats` epochs after one warm-up epoch (compile and cuDNN autotuning happen there)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    run = make_runner()
    run()
    warmup = time.perf_counter() - began
    rate = max(run() for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"| {label} | {rate:,.0f} | {peak:.2f} | {warmup:.0f} |", flush=True)
    return rate


def loader_only(label, loader, device):
    """Images/s of an input pipeline with no model: what it could feed at most."""
    loader.sampler.set_epoch(1)
    for _ in loader:  # warm-up: workers, page cache
        pass
    loader.sampler.set_epoch(2)
    began, count = time.perf_counter(), 0
    for images, *_ in loader:
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"| {label} | {count / (time.perf_counter() - began):,.0f} | | |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count()))
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "gpu_bench_photos"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="measure only the torch.compile configurations (slow to warm up: run it separately)")
    parser.add_argument("--pipelines", action="store_true",
                        help="only the synthetic ceiling for AMP fp16 + channels_last, then the real pipelines")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.images = 8, 3, 64
    device = torch.device(args.device)
    size, bs = (224, args.batch_size) if not args.quick else (64, args.batch_size)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"`python bench/gpu.py {' '.join(sys.argv[1:])}` on {name}, torch {torch.__version__}, "
          f"ResNet-18 {size} px, batch {bs}\n")
    print("| configuration | images/s | peak GPU memory (GiB) | warm-up s |\n| --- | --- | --- | --- |")
    rates = {}
    for precision, flags in PRECISIONS.items():
        for channels_last in (False, True):
            for compiled in ((True,) if args.compile else (False,)):
                if compiled and precision == "fp32":
                    continue  # compile cost is paid for the mixed-precision configurations only
                if args.pipelines and (precision, channels_last) != ("fp16", True):
                    continue
                extra = flags + (["--channels_last"] if channels_last else []) + (["--compile"] if compiled else [])
                label = f"synthetic, {precision}{', channels_last' if channels_last else ''}{', compile' if compiled else ''}"
                rates[label] = measure(label, lambda: project_loop(
                    "resnet18", None, None, bs, device, flags=extra, image_size=size,
                    loader=DeviceBatches(bs, size, args.steps, device)), device)
    if args.compile:
        return
    best_label = max(rates, key=rates.get)
    best_flags = [f for p, fl in PRECISIONS.items() if p in best_label for f in fl]
    best_flags += ["--channels_last"] if "channels_last" in best_label else []
    print(f"\nReal pipelines with the best uncompiled setting ({best_label}):\n")
    print("| configuration | images/s | peak GPU memory (GiB) | warm-up s |\n| --- | --- | --- | --- |")
    began = time.perf_counter()
    folder = os.path.join(make_dataset(args.data, args.images), "train")
    print(f"| (generated {args.images} JPEGs in {time.perf_counter() - began:.0f} s) | | | |")
    dataset = AugmentedImageFolder(folder, size, train=True)
    began = time.perf_counter()
    images, path, _ = build_or_open(dataset, size, args.data.rstrip("/") + "_cache", args.workers, lambda: None)
    print(f"| (cache: {images.nbytes / 2**30:.2f} GiB, ready in {time.perf_counter() - began:.0f} s) | | | |")
    sampler = EpochTaggedSampler(dataset, 1, 0, seed=0)
    cached = CachedBatches(images, dataset.targets, sampler, bs, True, size, device, drop_last=True)
    loader_only(f"JPEG cache loader alone (no model), crops on {device.type}", cached, device)
    rates["cache"] = measure(f"JPEG cache, crops on {device.type}", lambda: project_loop(
        "resnet18", None, None, bs, device, flags=best_flags, image_size=size, loader=cached), device)
    train_loader, _ = build_loaders(dataset, dataset, bs, args.workers, 0, 1, 0, pin_memory=device.type == "cuda")
    loader_only(f"JPEG files loader alone (no model), {args.workers} PIL workers", train_loader, device)
    rates["files"] = measure(f"JPEG files, {args.workers} PIL workers", lambda: project_loop(
        "resnet18", None, None, bs, device, flags=best_flags, image_size=size, loader=train_loader), device)
    ceiling = rates[best_label]
    print(f"\nRatios to synthetic ({best_label}): cache {rates['cache'] / ceiling:.2f}, files {rates['files'] / ceiling:.2f}")
    if args.pipelines:
        return
    fp32 = rates["synthetic, fp32"]
    for label in ("synthetic, fp16", "synthetic, bf16", "synthetic, bf16, channels_last", "synthetic, fp16, channels_last"):
        print(f"AMP speed-up over fp32: {label}: {rates[label] / fp32:.2f}x")


if __name__ == "__main__":
    main()
