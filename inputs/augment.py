"""Training augmentation parameters, drawn for a whole batch at once from a counter-based generator.

Sample `index` of epoch `epoch` gets torchvision's RandomResizedCrop box and a horizontal flip from
DRAWS uniform numbers, each one a hash of (seed, epoch, index, draw number) (SplitMix64's mixing
function). Nothing depends on a loader worker, a process, a reader thread or the order in which
samples are drawn, so:
- the file path (a loader worker's batch, or one item), the cache path and --decode_on_device
  (a batch per call) apply the same crops to the same sample;
- a resumed run draws the crops the uninterrupted one would have drawn;
- a batch's boxes are a few numpy operations, not a Python generator per sample, which held the
  GIL beside the thread launching the kernels (BENCHMARKS.md, "Crop draws").

The draw follows RandomResizedCrop.get_params: TRIES candidate (area, log aspect) pairs, the first
one that fits is kept; when none fits, the largest central crop within CROP_RATIO.

The batched crop of the GPU cache path is here too (crop_and_flip: two matrix products per batch).
"""
import math

import numpy as np
import torch

CROP_RATIO = (3 / 4, 4 / 3)
TRIES = 10  # torchvision's
DRAWS = 2 * TRIES + 3  # per sample: TRIES (area, aspect) pairs, then left, top and flip
GENERATOR = "counter-v1"  # what a checkpoint records as the way its run drew crops
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sample_keys(seed, epochs, indices):
    """One uint64 per (seed, epoch, sample): distinct for distinct triples of everyday sizes."""
    # Arithmetic modulo 2**64 is the point: numpy wraps uint64 arrays silently.
    epochs = np.atleast_1d(np.asarray(epochs, dtype=np.uint64))
    return (epochs + np.uint64(seed * 1_000_003 % 2**64)) * np.uint64(1_000_000_007) + np.asarray(indices, np.uint64)


def mix(x):
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent for
    neighbouring inputs. `x` is an array (numpy wraps array arithmetic modulo 2**64 silently)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(keys, count=DRAWS):
    """(len(keys), count) float64 numbers in [0, 1): number j of a key is mix(mix(key) + (j + 1)·GOLDEN),
    the j-th output of a SplitMix64 stream started at the mixed key, kept to 53 bits."""
    counters = np.arange(1, count + 1, dtype=np.uint64) * GOLDEN
    bits = mix(mix(np.asarray(keys, dtype=np.uint64))[:, None] + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def crop_boxes(widths, heights, scale, draws):
    """RandomResizedCrop.get_params for each row of `draws` (uniforms' output) on an image of
    widths x heights (arrays, or one size for all): (B, 4) int64 (left, top, width, height)."""
    rows = len(draws)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), (rows,))
    heights = np.broadcast_to(np.asarray(heights, dtype=np.int64), (rows,))
    area = (widths * heights).astype(np.float64)[:, None]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[:, 0:2 * TRIES:2])
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * draws[:, 1:2 * TRIES:2])
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # round half to even, as Python's round
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first, found = fits.argmax(axis=1), fits.any(axis=1)
    w, h = w[np.arange(rows), first], h[np.arange(rows), first]
    left = np.floor(draws[:, 2 * TRIES] * (widths - w + 1)).astype(np.int64)
    top = np.floor(draws[:, 2 * TRIES + 1] * (heights - h + 1)).astype(np.int64)
    # No candidate fits: the largest central crop whose aspect lies within CROP_RATIO.
    in_ratio = widths / heights
    central_w = np.where(in_ratio > CROP_RATIO[1], np.round(heights * CROP_RATIO[1]), widths).astype(np.int64)
    central_h = np.where(in_ratio < CROP_RATIO[0], np.round(widths / CROP_RATIO[0]), heights).astype(np.int64)
    w, h = np.where(found, w, central_w), np.where(found, h, central_h)
    left = np.where(found, left, (widths - w) // 2)
    top = np.where(found, top, (heights - h) // 2)
    return np.stack([left, top, w, h], axis=1)


def draw_crops(seed, epochs, indices, widths, heights, scale, hflip_prob):
    """The crop boxes (B, 4: left, top, width, height, in pixels of a widths x heights image) and
    horizontal flips (B,) of training samples `indices` in `epochs` (one per sample, or one for all)."""
    indices = np.atleast_1d(np.asarray(indices, dtype=np.uint64))
    epochs = np.broadcast_to(np.asarray(epochs, dtype=np.uint64), indices.shape)
    draws = uniforms(sample_keys(seed, epochs, indices))
    return crop_boxes(widths, heights, scale, draws), draws[:, DRAWS - 1] < hflip_prob


def draw_crop(seed, epoch, index, width, height, scale, hflip_prob):
    """One sample's ((left, top, width, height), flip) as Python ints and bool: draw_crops' row."""
    boxes, flips = draw_crops(seed, epoch, index, width, height, scale, hflip_prob)
    return tuple(int(v) for v in boxes[0]), bool(flips[0])


def resize_weights(starts, lengths, out_size, in_size, dtype, flips=None):
    """(B, out_size, in_size) matrices that crop [start, start + length) of an axis and resize it to
    out_size with the antialiased bilinear (triangle) filter of torchvision's resize(antialias=True)
    and PIL: output pixel i is centred at (i + 0.5) * scale in the crop, and the filter widens by
    the scale when shrinking. Rows sum to 1; `flips` reverses the output order per sample.

    Only a few taps per output pixel are non-zero: they are computed small, (B, out_size, taps),
    and scattered into zeros, which is cheaper on a GPU than building the dense matrix element by
    element."""
    device = starts.device
    starts, lengths = starts.float().view(-1, 1, 1), lengths.float().view(-1, 1, 1)
    scale = lengths / out_size
    support = scale.clamp(min=1.0)
    outputs = torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1)
    if flips is not None:
        outputs = torch.where(flips.view(-1, 1, 1), out_size - 1 - outputs, outputs)
    centers = (outputs + 0.5) * scale  # in crop coordinates
    first = (centers - support + 0.5).floor().clamp(min=0)
    taps = first + torch.arange(int(2 * max(in_size / out_size, 1.0)) + 2, device=device)
    weights = (1 - ((taps + 0.5 - centers) / support).abs()).clamp(min=0) * (taps < lengths)
    weights = weights / weights.sum(-1, keepdim=True)
    columns = (starts + taps).long().clamp(max=in_size - 1)  # taps past the edge carry weight 0
    dense = torch.zeros(len(starts), out_size, in_size, dtype=dtype, device=device)
    return dense.scatter_add_(2, columns, weights.to(dtype))


def crop_and_flip(pixels, boxes, flips, size):
    """Crop a whole batch of stored NHWC uint8 images to their boxes (left, top, width, height;
    a tensor on the pixels' device), resize to size x size and flip where asked: NCHW uint8. The
    resize is separable, so it is two batched matrix products (rows, then columns) in float16 on a
    GPU's tensor cores (float32 on a CPU); a flip is the column weights reversed. Same filter as
    the CPU path's PIL resize, within 1 of 255."""
    batch, stored = pixels.shape[0], pixels.shape[1]
    dtype = torch.float16 if pixels.is_cuda else torch.float32
    left, top, width, height = boxes.unbind(1)
    rows = resize_weights(top, height, size, stored, dtype)
    columns = resize_weights(left, width, size, stored, dtype, flips)
    resized_rows = torch.bmm(rows, pixels.to(dtype).view(batch, stored, stored * 3))  # (B, size, stored*3)
    planar = resized_rows.view(batch, size, stored, 3).permute(0, 3, 1, 2).reshape(batch, 3 * size, stored)
    crops = torch.bmm(planar, columns.transpose(1, 2)).view(batch, 3, size, size)
    return crops.round_().clamp_(0, 255).to(torch.uint8)
