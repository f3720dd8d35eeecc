"""ResNet-18 (--model) training throughput on a GPU, through the project's own run (built by
training.build_training, trained by train_ddp.train_one_epoch): precision (fp32, AMP fp16, AMP
bf16) x channels_last x torch.compile on synthetic data already on the GPU (the ceiling), then
the real input pipelines from training.build_data on ~500x375 JPEGs: the decoded-image cache
(crops on the GPU) and the file path (PIL workers). Peak GPU memory per configuration.

Without CUDA it runs only with --quick (tiny sizes and model, on the CPU: checks the script) or
--device cpu.

    python bench/gpu.py [--batch_size 256] [--steps 60] [--images 8000] [--quick] [--device cpu] [--pipelines]
    python bench/gpu.py --compile
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import harness
import torch
from input_pipeline import photo_data

PRECISIONS = {"fp32": [], "fp16": ["--use_amp", "--amp_dtype", "float16"],
              "bf16": ["--use_amp", "--amp_dtype", "bfloat16"]}
QUICK = dict(model="tiny_cnn", batch_size=4, steps=2, images=20, workers=2, image_size=32, repeats=1)
TABLE_HEAD = "| configuration | images/s | peak GPU memory (GiB) | warm-up s |\n| --- | --- | --- | --- |"


def measure(label, make_runner, device, repeats):
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


def synthetic_configurations(args):
    """{label: train_ddp flags} of the synthetic-data runs this invocation measures."""
    configurations = {}
    for precision, flags in PRECISIONS.items():
        for channels_last in (False, True):
            if args.pipelines and (precision, channels_last) != ("fp16", True):
                continue
            if args.compile and precision == "fp32":
                continue  # compile cost is paid for the mixed-precision configurations only
            label = (f"synthetic, {precision}{', channels_last' if channels_last else ''}"
                     f"{', compile' if args.compile else ''}")
            configurations[label] = flags + (["--channels_last"] if channels_last else []) + (
                ["--compile"] if args.compile else [])
    return configurations


def pipeline_data(args, flags, device, path_flags):
    """input_pipeline.photo_data over --images JPEGs in --data, with the input path's flags (a
    cache goes to --data + "_cache"). Returns (train_ddp args, Data)."""
    flags = [*flags, "--model", args.model, "--num_workers", str(args.workers), *path_flags]
    return photo_data(args.data, args.images, args.batch_size, args.image_size, device, flags)


def real_pipelines(args, flags, device):
    """Images/s of the cache paths (raw; compressed, decoded by nvjpeg) and the file path, loader
    alone and training."""
    began = time.perf_counter()
    cache = ["--cache_images", args.data.rstrip("/") + "_cache", "--cache_format"]
    paths = dict(cache=cache + ["raw"], compressed=cache + ["jpeg"], files=[], device_decode=["--decode_on_device"])
    built = {name: pipeline_data(args, flags, device, path_flags) for name, path_flags in paths.items()}
    print(f"({args.images} JPEGs and their caches ready in {time.perf_counter() - began:.0f} s)\n")
    print(TABLE_HEAD)
    rates = {}
    for name, label in (("cache", f"JPEG cache, crops on {device.type}"),
                        ("compressed", f"compressed cache, decoded and cropped on {device.type}"),
                        ("files", f"JPEG files, {args.workers} PIL workers"),
                        ("device_decode", f"JPEG files decoded in batches on {device.type}")):
        run_args, data = built[name]
        loader_only(f"{label}: loader alone (no model)", data.train_loader, device)
        rates[name] = measure(label, lambda: harness.project_loop(run_args, data, device), device, args.repeats)
    return rates


def pick_device(args):
    """--device; without CUDA, the CPU for --quick, else a one-line exit."""
    if args.device != "cuda" or torch.cuda.is_available():
        return torch.device(args.device)
    if args.quick:
        return torch.device("cpu")
    sys.exit(f"bench/{os.path.basename(sys.argv[0])} measures a GPU and this machine has no CUDA device "
             "(--quick checks the script on the CPU; --device cpu measures the CPU)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch on synthetic data")
    parser.add_argument("--images", type=int, default=8000, help="generated training JPEGs for the real pipelines")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count()))
    parser.add_argument("--repeats", type=int, default=2, help="epochs measured after the warm-up one (best kept)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "gpu_bench_photos"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({QUICK}): checks the script runs")
    parser.add_argument("--compile", action="store_true",
                        help="measure only the torch.compile configurations (slow to warm up: run it separately)")
    parser.add_argument("--pipelines", action="store_true",
                        help="only the synthetic ceiling for AMP fp16 + channels_last, then the real pipelines")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return args


def main():
    args = parse_args()
    device, size, bs = pick_device(args), args.image_size, args.batch_size
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"`python bench/gpu.py {' '.join(sys.argv[1:])}` on {name}, torch {torch.__version__}, "
          f"{args.model} {size} px, batch {bs}\n")
    print(TABLE_HEAD)
    configurations, rates = synthetic_configurations(args), {}
    for label, flags in configurations.items():
        data = harness.loader_data(harness.DeviceBatches(bs, size, args.steps, device), bs * args.steps)
        run_args = harness.bench_args(args.model, bs, size, flags, device)
        rates[label] = measure(label, lambda: harness.project_loop(run_args, data, device), device, args.repeats)
    if args.compile:
        return
    best_label = max(rates, key=rates.get)
    print(f"\nReal pipelines with the best uncompiled setting ({best_label}):\n")
    rates.update(real_pipelines(args, configurations[best_label], device))
    ceiling = rates[best_label]
    print(f"\nRatios to synthetic ({best_label}): cache {rates['cache'] / ceiling:.2f}, compressed cache "
          f"{rates['compressed'] / ceiling:.2f}, files {rates['files'] / ceiling:.2f}, files decoded on the "
          f"device {rates['device_decode'] / ceiling:.2f}")
    if args.pipelines:
        return
    fp32 = rates["synthetic, fp32"]
    for label in ("synthetic, fp16", "synthetic, bf16", "synthetic, bf16, channels_last",
                  "synthetic, fp16, channels_last"):
        print(f"AMP speed-up over fp32: {label}: {rates[label] / fp32:.2f}x")


if __name__ == "__main__":
    main()
