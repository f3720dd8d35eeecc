"""Shared pieces of the benchmarks: the project's own training run, built as train_ddp.py builds
it (training.build_training) and trained by train_ddp.train_one_epoch, over in-memory uint8
images or any loader; and a bare minimal loop on the same data, so the two are compared step for
step. Run the scripts from the repository root: `python bench/<script>.py`."""
import itertools
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import parse_args  # noqa: E402
from dataset import normalize, train_sampler  # noqa: E402
from engine.checkpoint import RunState  # noqa: E402
from engine.distributed import DistContext  # noqa: E402
from engine.training import Data, build_training, settle  # noqa: E402
from fastload.image_cache import CachedBatches  # noqa: E402
from model import build_model  # noqa: E402
from train_ddp import train_one_epoch  # noqa: E402


def synthetic_images(count, size, classes=10, seed=0):
    """Random uint8 images (count, size, size, 3) and labels: the in-memory data every loop shares."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), rng.integers(0, classes, count)


def bench_args(model_name, batch_size, image_size, flags=(), device=torch.device("cpu")):
    """train_ddp's settled configuration (training.settle) for a benchmark run on `device` (which
    the AMP dtype depends on): a constant learning rate (every epoch alike), seed 0 (the bare
    loop's initial weights), one micro-batch per optimizer step, one log point per epoch; `flags`
    add or override."""
    args = parse_args(["--model", model_name, "--batch_size", str(batch_size), "--image_size", str(image_size),
                       "--epochs", "1000000", "--log_every_steps", "1000000", "--lr_scheduler", "none",
                       "--seed", "0", "--gradient_accumulation_steps", "1", *flags])
    return settle(args, one_process(device))[0]


def one_process(device):
    return DistContext(rank=0, local_rank=0, world_size=1, device=device)


def loader_data(loader, train_size, classes=10):
    """A training.Data around a training loader alone (benchmarks do not validate)."""
    return Data(loader, None, [f"class_{i}" for i in range(classes)], train_size, 0)


def in_memory_data(images, labels, batch_size, device, augment=False, image_size=None, classes=10):
    """Uint8 images (N, H, W, 3) held in memory, batched by the cache path's loader
    (image_cache.CachedBatches): random crops to `image_size` with `augment`, else center crops."""
    sampler = train_sampler(range(len(images)), batch_size, rank=0, world_size=1, seed=0)
    loader = CachedBatches(images, labels, sampler, batch_size, True, image_size or images.shape[1], device,
                           drop_last=True, augment=augment)
    return loader_data(loader, len(images), classes)


def project_training(args, data, ctx):
    """The run train_ddp.py would build for `args` (settled: bench_args), by its own builder
    (training.build_training)."""
    training = build_training(args, ctx, len(data.class_names), len(data.train_loader))
    # Ctrl-C ends a benchmark at once: undo the run's StopRequest handlers, which would stop at a
    # step boundary and save a checkpoint.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return training


def project_loop(args, data, device):
    """A callable running one epoch of train_ddp.train_one_epoch over `data` (a training.Data), one
    process; returns images/s measured over training steps, as the history's samples_per_second."""
    ctx = one_process(device)
    training, epochs = project_training(args, data, ctx), itertools.count(1)

    def run_epoch():
        return train_one_epoch(training, data, next(epochs), RunState(), args, ctx).epoch_totals()["samples_per_second"]
    return run_epoch


class DeviceBatches:
    """Synthetic data already on the device: `steps` batches per epoch cycled from a few resident
    ones, so the loop's throughput is measured without any input pipeline (the ceiling). Its
    sampler is the training loaders' own (dataset.train_sampler), which the loop positions. A
    training loader: wrap it with loader_data."""

    def __init__(self, batch_size, image_size, steps, device, classes=10, resident=4):
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [(torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                       generator=generator).to(device),
                         torch.randint(0, classes, (batch_size,), generator=generator).to(device))
                        for _ in range(resident)]
        self.batch_size = batch_size
        self.sampler = train_sampler(range(steps * batch_size), batch_size, rank=0, world_size=1, seed=0)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        for step in range(len(self)):
            images, labels = self.batches[step % len(self.batches)]
            yield images, labels, None, 0


def bare_loop(model_name, images, labels, batch_size, device, classes=10):
    """The minimal loop a person would write: index, normalise, forward, backward, step."""
    torch.manual_seed(0)
    model = build_model(model_name, classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pixels = torch.from_numpy(images)
    targets = torch.as_tensor(labels)

    def run_epoch():
        model.train()
        order = torch.randperm(len(images))
        steps = len(images) // batch_size
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            x = normalize(pixels[index].to(device).permute(0, 3, 1, 2).contiguous())  # NCHW, as a DataLoader gives
            loss = F.cross_entropy(model(x), targets[index].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - start)
    return run_epoch


def interleave(runners, repeats, warmup=True):
    """Call each runner once per round, round after round, so machine noise hits all alike.
    Returns {name: [images/s per round]}; a first warm-up round is run and dropped with `warmup`."""
    results, warmup_rounds = {name: [] for name in runners}, 1 if warmup else 0
    for round_index in range(warmup_rounds + repeats):
        for name, run in runners.items():
            value = run()
            if round_index >= warmup_rounds:
                results[name].append(value)
    return results
