"""The training order: one global sample sequence per epoch, whatever the ranks.

Epoch e trains a permutation of the dataset drawn from (seed, e), the same one torch's
DistributedSampler draws. Micro-batch row q of the epoch is positions [q·R, (q+1)·R) of it, R =
per-process batch × processes, and rank r takes every processes-th position from r, as
DistributedSampler would. An optimizer step takes `accumulation` rows, so global step s consumes
positions [s·G, (s+1)·G), G = R × accumulation, on any number of processes. A run's progress is
therefore a position in that sequence, and a resume on another world size or per-process batch
continues at exactly the next sample when G is kept (resume.keep_global_batch keeps it).

The epoch has no padding: it trains its whole rows, up to --limit_train_batches of them, and
the rest of the permutation waits for the next epoch's shuffle (as drop_last does).
"""
import json
import math
import os
import time

import torch
from torch.utils.data import Sampler

from core.errors import ConfigError, DataError
from engine.distributed import broadcast_object


class GlobalOrderSampler(Sampler):
    """This rank's share of the epoch's sequence from position `start` to `end`, yielding
    (epoch, index) so a loader worker knows which epoch it augments for."""

    def __init__(self, dataset_size, batch_size, rank, world_size, seed, max_rows=None):
        self.dataset_size, self.batch_size, self.rank, self.world_size = dataset_size, batch_size, rank, world_size
        self.seed, self.max_rows = seed, max_rows
        self.row = batch_size * world_size  # one micro-batch on every rank
        if self.row > dataset_size:
            raise DataError(f"the training set has {dataset_size} images, {dataset_size // world_size} per "
                            f"process: fewer than --batch_size {batch_size}; lower --batch_size")
        self.set_epoch(0)

    def epoch_length(self):
        """Positions a whole epoch trains: its full rows, at most max_rows of them."""
        rows = self.dataset_size // self.row
        return min(rows, self.max_rows or rows) * self.row

    def set_epoch(self, epoch, start=0, end=None):
        """Train epoch `epoch` from position `start` (samples already trained, on all ranks) to
        `end` (the epoch's planned length; default: this layout's whole epoch)."""
        self.epoch, self.start = epoch, start
        self.end = self.epoch_length() if end is None else end
        tail = (self.end - self.start) % self.row
        if 0 < tail < self.world_size:  # some rank would have no last micro-batch: a collective would hang
            raise ConfigError(
                f"epoch {epoch} cannot be continued exactly on {self.world_size} processes: its last "
                f"{tail} sample(s) cannot be shared among them; resume with at most {tail} processes, "
                "or let the epoch finish where it was started")

    def permutation(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def __iter__(self):
        positions = range(self.start + self.rank, self.end, self.world_size)
        order = self.permutation()
        return ((self.epoch, order[p]) for p in positions)

    def __len__(self):
        return len(range(self.start + self.rank, self.end, self.world_size))

    def batches(self):
        """Micro-batches this rank loads from `start` on: the same count on every rank."""
        return math.ceil((self.end - self.start) / self.row)


class SampleTrace:
    """--trace_samples: the dataset indices this rank trained at each optimizer step, one JSON line
    per step in log_dir/sample_trace/rank<R>.jsonl. A resumed run appends; every line carries its
    run's id (shared by the run's ranks), so for steps trained twice (after the last checkpoint,
    before a kill) the later run's lines are the ones that count (read_trace)."""

    def __init__(self, log_dir, ctx):
        self.path = os.path.join(log_dir, "sample_trace", f"rank{ctx.rank}.jsonl")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.run = broadcast_object(time.time_ns())
        self.pending = []

    def add(self, indices):
        self.pending += indices.tolist()

    def write(self, epoch, step):
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(run=self.run, epoch=epoch, step=step, indices=self.pending)) + "\n")
        self.pending = []


def read_trace(log_dir):
    """{(epoch, step): sorted indices trained by all ranks} from a run's trace files, each step
    taken from the last run that trained it."""
    lines = []
    for name in sorted(os.listdir(os.path.join(log_dir, "sample_trace"))):
        with open(os.path.join(log_dir, "sample_trace", name)) as f:
            lines += [json.loads(line) for line in f]
    latest = {}
    for line in lines:
        key = (line["epoch"], line["step"])
        latest[key] = max(latest.get(key, 0), line["run"])
    steps = {}
    for line in lines:
        key = (line["epoch"], line["step"])
        if line["run"] == latest[key]:
            steps.setdefault(key, []).extend(line["indices"])
    return {key: sorted(indices) for key, indices in sorted(steps.items())}
