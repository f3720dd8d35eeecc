"""The batch stage: the one way from a loader's batch to the model, for every input path.

Each loader (image files through DataLoader workers, the image cache, --decode_on_device) yields
uint8 NCHW images, labels and sample keys, on the host or already on the device; training
(train_ddp.forward_backward) and evaluation (metrics.evaluate_classes) both pass them through the
run's BatchStage, built once with the run's pieces (training.build_training).

A training batch goes through the recipe's batch-level steps here, in torchvision's order:
the per-sample policy (on the cache and device-decode paths; the file path's loader workers
apply the same function to their batches: inputs/policies.py), the epoch's progressive size,
normalisation, random erasing, then mixing of pairs (inputs/mixing.py). Every draw is keyed by
(seed, epoch, sample key), so the batch's composition, its device and the run's layout do not
change what a sample gets.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from dataset import normalize
from inputs.mixing import Mixing, draw_pairs, mix_batch
from inputs.policies import Policy, augment_batch, erase_batch

PROGRESSIVE_STEP = 16  # progressive sizes are multiples of this (FFCV uses 32; 16 keeps small images useful)


def progressive_size(epoch, full, low, start, end):
    """The training crop size of `epoch` under progressive resizing: `low` up to epoch `start`,
    then linear to `full` at epoch `end`, in PROGRESSIVE_STEP px steps (rounded down, at least
    `low`); `full` from `end` on. A function of the epoch alone, so a resume at any step of the
    ramp trains at the size the uninterrupted run did."""
    if epoch >= end:
        return full
    fraction = min(max((epoch - start) / (end - start), 0.0), 1.0)
    size = low + fraction * (full - low)
    return max(low, int(size) // PROGRESSIVE_STEP * PROGRESSIVE_STEP)


def progressive_end_epoch(epochs, start, end=None):
    """--progressive_end_epoch, or by default the epoch from which the last 15% of the run trains at full size."""
    return end if end is not None else max(start + 1, round(0.85 * epochs))


@dataclass(frozen=True)
class BatchStage:
    """A batch onto the device, augmented for training as the run's recipe says, normalised with
    the run's --mean/--std (dataset.normalize) and laid out as the model is (channels_last with
    --channels_last)."""
    device: torch.device
    mean: tuple
    std: tuple
    memory_format: torch.memory_format
    seed: int = 0
    num_classes: int = 0
    policy: Policy | None = None      # the per-sample policy, where the loader has not applied it
    random_erase: float = 0.0
    mixing: Mixing | None = None
    progressive: tuple | None = None  # (full, low, start, end) of progressive_size

    def eval_batch(self, images, labels):
        """(model input, labels), both on the device."""
        images = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
        return images.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True)

    def train_batch(self, images, labels, epoch=1, keys=None):
        """(model input, targets, pairs) for a training batch of samples `keys` in `epoch`:
        targets are the labels, or with mixing this epoch soft targets (B, classes) for
        cross-entropy; pairs is mixing.draw_pairs' draw (None when nothing was mixed)."""
        images = images.to(self.device, non_blocking=True)
        if keys is not None:
            keys = np.asarray(keys.tolist() if torch.is_tensor(keys) else keys, dtype=np.uint64)
        if self.policy is not None:
            images = augment_batch(images, self.policy, self.seed, epoch, keys)
        size = self.train_size(epoch)
        if size is not None and size != images.shape[-1]:
            images = TF.resize(images, [size, size], antialias=True)
        images = normalize(images, self.mean, self.std)
        if self.random_erase:
            images = erase_batch(images, self.random_erase, self.seed, epoch, keys)
        targets, pairs = labels.to(self.device, non_blocking=True), None
        if self.mixing is not None and self.mixing.active(epoch):
            pairs = draw_pairs(self.mixing, self.seed, epoch, keys[0::2], images.shape[-2], images.shape[-1])
            images, targets = mix_batch(images, targets, self.num_classes, pairs)
        return images.contiguous(memory_format=self.memory_format), targets, pairs

    def train_size(self, epoch):
        """This epoch's training crop size under progressive resizing (None without it)."""
        return progressive_size(epoch, *self.progressive) if self.progressive else None
