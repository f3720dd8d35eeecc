"""The training order: one global sample sequence per epoch, whatever the ranks.

Epoch e trains a permutation of the dataset drawn from (seed, e), the same one torch's
DistributedSampler draws. Micro-batch row q of the epoch is positions [q·R, (q+1)·R) of it, R =
per-process batch × processes, and rank r takes every processes-th position from r, as
DistributedSampler would. An optimizer step takes `accumulation` rows, so global step s consumes
positions [s·G, (s+1)·G), G = R × accumulation, on any number of processes. A run's progress is
therefore a position in that sequence, and a resume on another world size or per-process batch
continues at exactly the next sample when G is kept (resume.keep_global_batch keeps it).

Two recipe options shape the sequence, still as a pure function of (seed, epoch):
- Mixing (mixup/cutmix, inputs/mixing.py) pairs positions (2k, 2k+1), and ranks take whole
  pairs (units of 2) in turn, so a pair is always in one process's micro-batch, on any layout
  with an even per-process batch.
- Weighted sampling (--sampling class_balanced or sqrt): the epoch's order is not a permutation
  but draws with replacement, position p taking the sample whose cumulative weight its counter
  uniform (augment.uniforms keyed by (seed, epoch, p)) falls in: the same draws on any layout,
  and no position's draw depends on another's.
- Repeated augmentation (--ra_reps N, torchvision's RASampler) repeats each unit N times in a
  row; taken in turn by the ranks, the copies land on different processes. Copy c of dataset
  image i has the sample key i + c × dataset size, from which its augmentation is drawn
  (augment.py), so every copy is augmented differently; loaders read image key % dataset size.
  An epoch then trains the dataset's size rounded down to a multiple of 256, as RASampler does.

The epoch has no padding: it trains its whole rows, up to --limit_train_batches of them, and
the rest of the sequence waits for the next epoch's shuffle (as drop_last does).
"""
import json
import math
import os
import time

import numpy as np
import torch
from torch.utils.data import Sampler

from core.errors import ConfigError, DataError
from engine.distributed import broadcast_object
from inputs.augment import sample_keys, uniforms
from inputs.mixing import pair_trace

WEIGHTED_SALT = 0x5A3D_71C2  # the weighted draws' seed differs from the crops' (same counter generator)


def sample_weights(labels, sampling):
    """Per-sample weights of --sampling: None for uniform; class_balanced: 1 / class size (each class
    drawn equally often); sqrt: 1 / sqrt(class size) (a class drawn in proportion to the square root
    of its size)."""
    if sampling == "uniform":
        return None
    labels = np.asarray(labels)
    counts = np.bincount(labels).astype(np.float64)
    per_class = 1 / counts if sampling == "class_balanced" else 1 / np.sqrt(counts)
    return per_class[labels]


def occurrences(values):
    """For each position, how many earlier positions hold the same value (0 for a first draw)."""
    sorter = np.argsort(values, kind="stable")
    ordered = values[sorter]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    within = np.arange(len(values)) - np.repeat(starts, np.diff(np.r_[starts, len(values)]))
    counts = np.empty_like(within)
    counts[sorter] = within
    return torch.from_numpy(counts)


class GlobalOrderSampler(Sampler):
    """This rank's share of the epoch's sequence from position `start` to `end`, yielding
    (epoch, sample key) so a loader worker knows which epoch it augments for. `unit`: positions
    a rank takes together (2 with mixing); `repeats`: --ra_reps."""

    def __init__(self, dataset_size, batch_size, rank, world_size, seed, max_rows=None, unit=1, repeats=1,
                 weights=None):
        self.dataset_size, self.batch_size, self.rank, self.world_size = dataset_size, batch_size, rank, world_size
        self.seed, self.max_rows, self.unit, self.repeats = seed, max_rows, unit, repeats
        # Weighted sampling: the cumulative share of each sample, for inverse-CDF draws.
        self.cumulative = None if weights is None else np.cumsum(np.asarray(weights, np.float64) / np.sum(weights))
        self.row = batch_size * world_size  # one micro-batch on every rank
        if self.row > dataset_size:
            raise DataError(f"the training set has {dataset_size} images, {dataset_size // world_size} per "
                            f"process: fewer than --batch_size {batch_size}; lower --batch_size")
        if batch_size % unit:
            raise ConfigError(f"mixing pairs samples within a process's batch: --batch_size must be even, "
                              f"got {batch_size}")
        self.set_epoch(0)

    def epoch_length(self):
        """Positions a whole epoch trains: its full rows, at most max_rows of them. With repeats,
        the dataset's size rounded down to a multiple of 256 (RASampler's length)."""
        length = self.dataset_size if self.repeats == 1 or self.dataset_size < 256 else self.dataset_size // 256 * 256
        rows = length // self.row
        return min(rows, self.max_rows or rows) * self.row

    def set_epoch(self, epoch, start=0, end=None):
        """Train epoch `epoch` from position `start` (samples already trained, on all ranks) to
        `end` (the epoch's planned length; default: this layout's whole epoch)."""
        self.epoch, self.start = epoch, start
        self.end = self.epoch_length() if end is None else end
        if self.end == 0:
            raise DataError(f"an epoch of --ra_reps {self.repeats} trains the dataset's {self.dataset_size} images "
                            f"rounded down to a multiple of 256, fewer than one batch on every process "
                            f"({self.row}); lower --batch_size or --ra_reps")
        if start % self.unit:
            raise ConfigError(f"epoch {epoch} stopped at position {start}, inside a pair that mixing would train "
                              "together: turn mixing on at an epoch's start (resume with the mixing flags of the "
                              "run that saved the checkpoint until its epoch ends)")
        tail = (self.end - self.start) % self.row // self.unit
        if 0 < tail < self.world_size:  # some rank would have no last micro-batch: a collective would hang
            raise ConfigError(
                f"epoch {epoch} cannot be continued exactly on {self.world_size} processes: its last "
                f"{tail * self.unit} sample(s) cannot be shared among them; resume with at most {tail} processes, "
                "or let the epoch finish where it was started")

    def permutation(self):
        """The epoch's order: a permutation (torch's, as DistributedSampler draws it), or weighted
        draws with replacement."""
        if self.cumulative is not None:
            draws = uniforms(sample_keys(self.seed ^ WEIGHTED_SALT, self.epoch, np.arange(self.dataset_size)), 1)[:, 0]
            chosen = np.searchsorted(self.cumulative, draws * self.cumulative[-1], side="right")
            return torch.from_numpy(np.minimum(chosen, self.dataset_size - 1))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def sequence(self):
        """The epoch's sample keys in global order: the permutation's units, each repeated. Under
        weighted draws an image drawn again gets another key (its k-th draw: index + k x repeats x
        dataset size), so each draw is augmented differently."""
        order = self.permutation()
        if self.cumulative is not None:
            order = order + occurrences(order.numpy()) * self.repeats * self.dataset_size
        if self.unit == 1 and self.repeats == 1:
            return order.tolist()
        units = order[:len(order) // self.unit * self.unit].view(-1, 1, self.unit)
        copies = torch.arange(self.repeats).view(1, -1, 1) * self.dataset_size
        return (units + copies).flatten().tolist()

    def positions(self):
        """This rank's positions: every world_size-th unit from `start`."""
        first_units = range(self.start // self.unit + self.rank, self.end // self.unit, self.world_size)
        return (unit * self.unit + offset for unit in first_units for offset in range(self.unit))

    def __iter__(self):
        order = self.sequence()
        return ((self.epoch, order[p]) for p in self.positions())

    def __len__(self):
        return len(range(self.start // self.unit + self.rank, self.end // self.unit, self.world_size)) * self.unit

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
        self.pending, self.pending_pairs = [], []

    def add(self, keys, pairs=None):
        """A micro-batch's sample keys and, when it was mixed, its pairs: [first key, second key,
        lambda, mixup|cutmix|none] each (mixing.pair_trace)."""
        keys = keys.tolist()
        self.pending += keys
        if pairs is not None:
            self.pending_pairs += [[first, second, *drawn]
                                   for first, second, drawn in zip(keys[0::2], keys[1::2], pair_trace(pairs))]

    def write(self, epoch, step):
        line = dict(run=self.run, epoch=epoch, step=step, indices=self.pending)
        if self.pending_pairs:
            line["pairs"] = self.pending_pairs
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.pending, self.pending_pairs = [], []


def read_trace(log_dir, field="indices"):
    """{(epoch, step): sorted indices trained by all ranks} from a run's trace files, each step
    taken from the last run that trained it; field="pairs": the step's mixed pairs instead."""
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
            steps.setdefault(key, []).extend(line.get(field, []))
    return {key: sorted(indices) for key, indices in sorted(steps.items())}
