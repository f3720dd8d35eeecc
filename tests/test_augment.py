"""augment.py: the crop boxes and flips drawn per (seed, epoch, index), for one sample or a batch
alike, and the batched tensor crop of the GPU cache path."""
import math
import statistics

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from inputs.augment import (
    CROP_RATIO,
    DRAWS,
    crop_and_flip,
    draw_crop,
    draw_crops,
    resize_weights,
    sample_keys,
    uniforms,
)


def boxes_for(width, height, seed, epoch, count, scale=(0.08, 1.0)):
    return [tuple(box) for box in draw_crops(seed, epoch, range(count), width, height, scale, 0.5)[0].tolist()]


def torchvision_params(width, height, scale):
    i, j, h, w = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(CROP_RATIO))
    return j, i, w, h  # (left, top, width, height), like draw_crops


def fallback_box(width, height):
    """torchvision's fallback (the largest central crop within CROP_RATIO): get_params with a
    scale no crop can reach."""
    return torchvision_params(width, height, scale=(2.0, 2.0))


# ------------------------------------------------------------------ the draws

def test_a_batch_draws_exactly_what_each_of_its_samples_draws_alone():
    # The file path draws one sample per call (or a worker's batch), the cache path a batch, on any
    # rank and in any order: every sample's box and flip must be the same either way.
    rng = np.random.default_rng(0)
    indices = rng.permutation(5000)[:700]
    epochs = rng.integers(0, 90, size=700)
    widths, heights = rng.integers(1, 2000, size=700), rng.integers(1, 2000, size=700)
    boxes, flips = draw_crops(11, epochs, indices, widths, heights, (0.08, 1.0), 0.5)
    for row in rng.permutation(700)[:150]:
        alone = draw_crop(11, int(epochs[row]), int(indices[row]), int(widths[row]), int(heights[row]),
                          (0.08, 1.0), 0.5)
        assert alone == (tuple(boxes[row].tolist()), bool(flips[row]))
    reordered, _ = draw_crops(11, epochs[::-1], indices[::-1], widths[::-1], heights[::-1], (0.08, 1.0), 0.5)
    assert np.array_equal(reordered[::-1], boxes)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (1000, 1000), (24, 20), (7, 5),
                                           (1, 1), (300, 3), (3, 300)])
def test_crop_box_always_lies_inside_the_image(width, height):
    boxes, _ = draw_crops(1, 0, range(300), width, height, (0.08, 1.0), 0.5)
    assert boxes.dtype == np.int64
    left, top, w, h = boxes.T
    assert ((0 < w) & (w <= width) & (0 < h) & (h <= height)).all()
    assert ((0 <= left) & (left <= width - w) & (0 <= top) & (top <= height - h)).all()


def test_crop_box_area_and_aspect_stay_in_their_ranges_on_a_large_image():
    width, height, scale = 640, 480, (0.25, 0.9)
    drawn = [box for box in boxes_for(width, height, 2, 3, 500, scale) if box != fallback_box(width, height)]
    assert len(drawn) > 400
    for left, top, w, h in drawn:
        # Rounding w and h to whole pixels moves the area and the aspect by well under 1% here.
        assert scale[0] * 0.99 <= w * h / (width * height) <= scale[1] * 1.01
        assert CROP_RATIO[0] * 0.99 <= w / h <= CROP_RATIO[1] * 1.01


@pytest.mark.parametrize("width, height, expected", [(1000, 10, ((1000 - 13) // 2, 0, 13, 10)),
                                                     (10, 1000, (0, (1000 - 13) // 2, 10, 13))])
def test_crop_box_fallback_is_torchvisions_central_crop(width, height, expected):
    # A 100:1 image has no crop of >= 8% area within 3:4..4:3: every draw falls back to the
    # largest central crop of aspect 4:3 (or 3:4), exactly as torchvision does.
    assert fallback_box(width, height) == expected
    assert set(boxes_for(width, height, 0, 0, 50)) == {expected}


def test_crop_box_distribution_matches_torchvision_get_params():
    width, height, scale, n = 200, 120, (0.08, 1.0), 3000
    ours = boxes_for(width, height, 5, 0, n, scale)
    torch.manual_seed(0)
    theirs = [torchvision_params(width, height, scale) for _ in range(n)]

    def stats(boxes):
        area = [w * h / (width * height) for _, _, w, h in boxes]
        log_aspect = [math.log(w / h) for _, _, w, h in boxes]
        centre_x = [(left + w / 2) / width for left, _, w, _ in boxes]
        centre_y = [(top + h / 2) / height for _, top, _, h in boxes]
        return (statistics.mean(area), statistics.mean(log_aspect), statistics.mean(centre_x),
                statistics.mean(centre_y), statistics.pstdev(area), statistics.pstdev(centre_x))

    for a, b in zip(stats(ours), stats(theirs)):
        assert a == pytest.approx(b, abs=0.03)


def test_flips_follow_the_probability():
    _, flips = draw_crops(3, 1, range(4000), 64, 64, (0.08, 1.0), 0.3)
    assert flips.dtype == bool and 0.27 < flips.mean() < 0.33
    assert not draw_crops(3, 1, range(500), 64, 64, (0.08, 1.0), 0.0)[1].any()
    assert draw_crops(3, 1, range(500), 64, 64, (0.08, 1.0), 1.0)[1].all()


def test_draws_depend_only_on_seed_epoch_and_index():
    assert boxes_for(640, 480, 7, 3, 50) == boxes_for(640, 480, 7, 3, 50)
    other_epoch = sum(a != b for a, b in zip(boxes_for(640, 480, 7, 3, 50), boxes_for(640, 480, 7, 4, 50)))
    other_seed = sum(a != b for a, b in zip(boxes_for(640, 480, 7, 3, 50), boxes_for(640, 480, 8, 3, 50)))
    assert other_epoch >= 48 and other_seed >= 48


def test_sample_keys_are_distinct_over_seeds_epochs_and_indices():
    keys = np.concatenate([sample_keys(s, e, np.arange(2000)) for s in (0, 1, 42, 2**40) for e in range(30)])
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == 4 * 30 * 2000


def test_uniforms_look_independent_across_samples_and_draws():
    # Neighbouring samples (keys one apart) and the draws of one sample must not be correlated,
    # or crops of consecutive images, or a box's area and its position, would move together.
    draws = uniforms(sample_keys(0, 0, np.arange(100_000)))
    assert draws.shape == (100_000, DRAWS) and draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.002 and abs(draws.var() - 1 / 12) < 0.001
    assert np.histogram(draws[:, 0], bins=10, range=(0, 1))[0].min() > 9_700  # 10,000 expected per bin
    correlations = np.corrcoef(draws.T)
    assert np.abs(correlations - np.eye(DRAWS)).max() < 0.02
    assert abs(np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]) < 0.02


# ------------------------------------------------------------------ the batched tensor crop

def test_the_batched_crop_equals_torchvisions_antialiased_resized_crop_per_sample():
    # The GPU path's crop (two matrix products, here in float32 on the CPU) against the CPU path's
    # per-sample TF.resized_crop: shrinking, enlarging, extreme aspect ratios, the whole image, flips.
    stored, size = 64, 48
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, stored, stored, 3), dtype=torch.uint8, generator=generator)
    pixels[4:] = torch.linspace(0, 255, stored).to(torch.uint8).view(1, stored, 1, 1)  # smooth gradients
    boxes = boxes_for(stored, stored, 0, 0, 5) + [(0, 0, stored, stored), (3, 0, 10, stored), (0, 40, stored, 9)]
    flips = torch.tensor([True, False] * 4)
    crops = crop_and_flip(pixels, torch.tensor(boxes), flips, size)
    assert crops.shape == (8, 3, size, size) and crops.dtype == torch.uint8
    for image, (left, top, width, height), flip, crop in zip(pixels, boxes, flips, crops):
        expected = TF.resized_crop(image.permute(2, 0, 1), top, left, height, width, [size, size], antialias=True)
        expected = expected.flip(-1) if flip else expected
        assert (crop.int() - expected.int()).abs().max() <= 1  # rounding of exact halves


def test_resize_weights_stay_in_the_crop_sum_to_one_and_reverse_for_a_flip():
    boxes = torch.tensor(boxes_for(73, 73, 4, 2, 64) + [(0, 0, 73, 73), (72, 0, 1, 73)])
    left, top, width, height = boxes.unbind(1)
    flips = torch.arange(len(boxes)) % 2 == 0
    rows = resize_weights(top, height, 32, 73, torch.float64)
    columns = resize_weights(left, width, 32, 73, torch.float64, flips)
    assert torch.allclose(rows.sum(-1), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(columns.sum(-1), torch.ones(1, dtype=torch.float64))
    pixel = torch.arange(73)
    for matrix, starts, lengths in ((rows, top, height), (columns, left, width)):
        outside = (pixel < starts.view(-1, 1)) | (pixel >= (starts + lengths).view(-1, 1))  # (B, 73)
        assert (matrix * outside.unsqueeze(1)).abs().max() == 0
    unflipped = resize_weights(left, width, 32, 73, torch.float64)
    assert torch.equal(columns[flips], unflipped[flips].flip(1)) and torch.equal(columns[~flips], unflipped[~flips])
