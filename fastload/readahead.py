"""Reading batches ahead, for the loaders that make whole batches themselves (image_cache.CachedBatches,
device_decode.DeviceDecodedFiles), and the crop they make on the device.

Reader threads read upcoming batches while the device trains on the current one. On a GPU each
read batch is staged (copied, decoded, cropped) on a side CUDA stream during the current step, so
the compute stream only ever trains. Batches are handed over in order, so every result is the one
a loader reading batch after batch would give.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch
from torchvision.transforms import functional as TF

from inputs.augment import crop_and_flip

READER_THREADS = min(4, os.cpu_count() or 1)  # for a GPU: they only gather (or decode) and pin
# On a CPU torch's intra-op threads already occupy every core while a batch trains: more readers only
# take cores from them (BENCHMARKS.md). One reader crops a batch in a few milliseconds, well within a step.
CPU_READER_THREADS = 1


def read_ahead(read_batch, chunks, device, stage):
    """(uint8 NCHW images, labels, indices, skipped=0) for each chunk of sample keys, in order.

    read_batch(chunk) runs in a reader thread and returns (read, labels, indices). On the CPU
    `read` is the batch's finished images. On a GPU stage(read, indices) makes them on the device
    (it is called on the side stream, in the consumer's thread) while the labels are copied there."""
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    threads = READER_THREADS if side_stream else CPU_READER_THREADS
    chunks = iter(chunks)
    with ThreadPoolExecutor(max_workers=threads) as readers:
        pending = deque(readers.submit(read_batch, chunk) for chunk in islice(chunks, 2 * threads))
        staged = None
        try:
            while pending:
                batch = stage_on(side_stream, device, stage, *pending.popleft().result())
                for chunk in islice(chunks, 1):
                    pending.append(readers.submit(read_batch, chunk))
                if staged is not None:
                    yield hand_over(staged, device)
                staged = batch
            if staged is not None:
                yield hand_over(staged, device)
        finally:
            for future in pending:  # the loop stopped early (--limit_train_batches, an error)
                future.cancel()


def key_batches(keys, batch_size, count):
    """The first `count` batches of `keys`, as lists (the last one may be short)."""
    return (keys[start:start + batch_size] for start in range(0, count * batch_size, batch_size))


def stage_on(side_stream, device, stage, read, labels, indices):
    """Queue a read batch's work and its labels' copy on the side stream; returns at once, with
    the event that marks them done (None on the CPU, where the readers finished the batch)."""
    if side_stream is None:
        return read, labels, indices, None
    with torch.cuda.stream(side_stream):
        images = stage(read, indices)
        labels = labels.to(device, non_blocking=True)
        return images, labels, indices, side_stream.record_event()


def hand_over(staged, device):
    """The compute stream waits for this batch only (not for the one staged after it), and the
    allocator keeps its memory until the compute stream is done with it."""
    images, labels, indices, ready = staged
    if ready is not None:
        compute_stream = torch.cuda.current_stream(device)
        compute_stream.wait_event(ready)
        images.record_stream(compute_stream)
        labels.record_stream(compute_stream)
    return images, labels, indices, 0


def crop_on_device(images, boxes, flips, size):
    """The crops of a batch on the images' device, NCHW uint8: without `boxes` torchvision's center
    crop (the evaluation transform's last step); else each box (left, top, width, height) resized
    to size x size with the antialiased bilinear filter, and flipped where `flips` is set.

    `images` is either the cache's stored frames, one (N, S, S, 3) tensor, cropped as one batch
    (boxes a tensor on its device; augment.crop_and_flip), or decoded files, a list of (3, H, W)
    images of any sizes, cropped one by one (torchvision's resized_crop)."""
    if isinstance(images, torch.Tensor):
        if boxes is None:
            return TF.center_crop(images.permute(0, 3, 1, 2), size).contiguous()
        return crop_and_flip(images, boxes, flips, size)
    if boxes is None:
        return torch.stack([TF.center_crop(image, size) for image in images])
    crops = []
    for image, (left, top, width, height), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)
