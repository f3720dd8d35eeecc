"""The batch stage: the one way from a loader's batch to the model, for every input path.

Each loader (image files through DataLoader workers, the image cache, --decode_on_device) yields
uint8 NCHW images and labels, on the host or already on the device; training
(train_ddp.forward_backward) and evaluation (metrics.evaluate_classes) both pass them through the
run's BatchStage, built once with the run's pieces (training.build_training).
"""
from dataclasses import dataclass

import torch

from dataset import normalize


@dataclass(frozen=True)
class BatchStage:
    """A batch onto the device, normalised with the run's --mean/--std (dataset.normalize) and laid
    out as the model is (channels_last with --channels_last)."""
    device: torch.device
    mean: tuple
    std: tuple
    memory_format: torch.memory_format

    def eval_batch(self, images, labels):
        """(model input, labels), both on the device."""
        images = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
        return images.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True)

    def train_batch(self, images, labels):
        """A training batch: as an evaluation batch. Augmentation of whole batches (mixing images,
        erasing) belongs here, so that it runs on every input path."""
        return self.eval_batch(images, labels)
