"""Shared pieces of the benchmarks: the project's own training loop (train_ddp.train_one_epoch)
driven over in-memory uint8 images, and a bare minimal loop on the same data, so the two are
compared step for step. Run the scripts from the repository root: `python bench/<script>.py`."""
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import parse_args  # noqa: E402
from dataset import EpochTaggedSampler, normalize  # noqa: E402
from image_cache import CachedBatches  # noqa: E402
from model import build_model  # noqa: E402
from recipe import build_optimizer, build_scheduler  # noqa: E402
from train_ddp import Training, train_one_epoch  # noqa: E402
from utils import DistContext, StopRequest  # noqa: E402


def synthetic_images(count, size, classes=10, seed=0):
    """Random uint8 images (count, size, size, 3) and labels: the in-memory data every loop shares."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), rng.integers(0, classes, count)


def project_loop(model_name, images, labels, batch_size, device, flags=(), augment=False, classes=10, loader=None,
                 image_size=None):
    """A callable running one epoch of the project's loop over `images` (a cached-data loader), or
    over `loader` when given; returns images/s measured over training steps, as the history's
    samples_per_second."""
    size = image_size or images.shape[1]
    args = parse_args(["--model", model_name, "--batch_size", str(batch_size), "--epochs", "1000",
                       "--log_every_steps", "1000000", "--image_size", str(size),
                       "--lr_scheduler", "none", *flags])
    ctx = DistContext(0, 0, 1, device)
    torch.manual_seed(0)
    model = build_model(model_name, classes).to(device, memory_format=memory_format(args))
    optimizer = build_optimizer(model, args, args.learning_rate)
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_amp and amp_dtype == torch.float16)
    if loader is None:
        sampler = EpochTaggedSampler(range(len(images)), num_replicas=1, rank=0, seed=0)
        loader = CachedBatches(images, labels, sampler, batch_size, True, size, device, drop_last=True,
                               augment=augment)
    train_model = torch.compile(model) if args.compile else model
    training = Training(train_model, optimizer, build_scheduler(optimizer, args, len(loader)), scaler, None,
                        amp_dtype, memory_format(args), len(loader), SimpleNamespace(log=lambda *a, **k: None),
                        StopRequest(), lambda *a, **k: None)
    epochs = iter(range(1, 10**6))

    def run_epoch():
        run = dict(step=0, train_partial=None)
        return train_one_epoch(training, loader, next(epochs), run, args, ctx)["samples_per_second"]
    return run_epoch


class DeviceBatches:
    """Synthetic data already on the device: `steps` batches cycled from a few resident ones, so
    the loop's throughput is measured without any input pipeline (the ceiling)."""

    def __init__(self, batch_size, image_size, steps, device, classes=10, resident=4):
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [(torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                                       generator=generator).to(device),
                         torch.randint(0, classes, (batch_size,), generator=generator).to(device))
                        for _ in range(resident)]
        self.image_size, self.steps = image_size, steps
        self.sampler = SimpleNamespace(set_epoch=lambda epoch, start=0: None)

    def __len__(self):
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            images, labels = self.batches[step % len(self.batches)]
            yield images, labels, None, 0


def memory_format(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


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


def interleave(runners, repeats):
    """Call each runner once per round, round after round, so machine noise hits all alike.
    Returns {name: [images/s per round]}; the first round is a warm-up and is dropped."""
    results = {name: [] for name in runners}
    for round_index in range(repeats + 1):
        for name, run in runners.items():
            value = run()
            if round_index:
                results[name].append(value)
    return results
