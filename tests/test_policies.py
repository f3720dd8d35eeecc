"""policies.py: batched per-sample augmentation policies equal torchvision's, pixel for pixel on a CPU, with
choices drawn from the counter-based generator with torchvision's distributions; random erasing likewise."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from inputs.augment import draw_crops
from inputs.policies import (
    ERASE_RATIO,
    ERASE_SCALE,
    JITTER_OPERATIONS,
    OPERATIONS,
    POLICIES,
    Policy,
    adjust_sharpness,
    augment_batch,
    draw_choices,
    erase_batch,
    erase_boxes,
    transform_for,
)


def make_images(count=4, height=24, width=20, seed=0):
    """Random uint8 images over different ranges: full, mid, narrow, and a constant one (autocontrast's and
    equalize's flat-image cases)."""
    noise = torch.randint(0, 256, (count, 3, height, width), generator=torch.Generator().manual_seed(seed))
    low = torch.tensor([0, 40, 100, 7] * count)[:count].view(-1, 1, 1, 1)
    span = torch.tensor([256, 120, 30, 1] * count)[:count].view(-1, 1, 1, 1)
    return (low + noise * span // 256).to(torch.uint8)


def assert_frequencies(values, probabilities):
    """Each outcome's frequency within 4 standard errors of its probability."""
    values, probabilities = np.asarray(values).ravel(), np.asarray(probabilities, dtype=np.float64)
    counts = np.bincount(values, minlength=len(probabilities))
    assert len(counts) == len(probabilities)
    standard_errors = np.sqrt(probabilities * (1 - probabilities) / len(values))
    np.testing.assert_array_less(np.abs(counts / len(values) - probabilities), 4 * standard_errors + 1e-12)


# ------------------------------------------------------------------ each operation = torchvision's, per sample

def torchvision_operation(name, image, magnitude, mode):
    """What torchvision's auto-augment transforms do for operation `name` at `magnitude` (the v2.functional
    call of _AutoAugmentBase._apply_image_or_video_transform, fill None)."""
    m = float(magnitude)
    shear = math.degrees(math.atan(m))
    calls = {
        "ShearX": lambda: F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                                   interpolation=mode, center=[0, 0]),
        "ShearY": lambda: F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear],
                                   interpolation=mode, center=[0, 0]),
        "TranslateX": lambda: F.affine(image, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0],
                                       interpolation=mode),
        "TranslateY": lambda: F.affine(image, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0],
                                       interpolation=mode),
        "Rotate": lambda: F.rotate(image, angle=m, interpolation=mode),
        "Brightness": lambda: F.adjust_brightness(image, 1.0 + m),
        "Color": lambda: F.adjust_saturation(image, 1.0 + m),
        "Contrast": lambda: F.adjust_contrast(image, 1.0 + m),
        "Sharpness": lambda: F.adjust_sharpness(image, 1.0 + m),
        "Posterize": lambda: F.posterize(image, int(m)),
        "Solarize": lambda: F.solarize(image, 255.0 * m),
        "AutoContrast": lambda: F.autocontrast(image),
        "Equalize": lambda: F.equalize(image),
        "Invert": lambda: F.invert(image),
        "Identity": lambda: image,
    }
    return calls[name]()


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
MAGNITUDES = {  # several per operation, one per sample of a 4-image batch, signed where torchvision signs them
    **{name: [[0.0, 0.3, -0.99, 0.5], [-0.3, 0.99, 0.033, -0.0]] for name in ("ShearX", "ShearY")},
    **{name: [[0.0, 5.9, -9.7, 32.0], [-32.0, 3.2, -0.5, 14.5]] for name in ("TranslateX", "TranslateY")},
    "Rotate": [[0.0, 90.0, -90.0, 180.0], [30.0, -135.0, 4.5, 270.0], [-0.0, 45.0, 360.0, -180.0]],
    **{name: [[-0.99, -0.5, 0.0, 0.99], [0.3, -0.1, 0.9, 0.033]] for name in BLENDS},
    "Posterize": [[8.0, 4.0, 2.0, 0.0], [7.0, 6.0, 5.0, 1.0]],
    "Solarize": [[1.0, 0.5, 0.0, 0.7333333492279053], [0.2, 0.9666666388511658, 0.1, 0.6]],
    **{name: [[0.0] * 4] for name in ("AutoContrast", "Equalize", "Invert", "Identity")},
}
CASES = [(name, mode, magnitudes) for name, rows in MAGNITUDES.items() for magnitudes in rows
         for mode in (("nearest", "bilinear") if name in GEOMETRIC else ("nearest",))]


def test_every_operation_of_every_policy_space_is_covered():
    names = set()
    for policy in POLICIES:
        names |= set(transform_for(Policy(policy))._AUGMENTATION_SPACE)
    assert names == set(MAGNITUDES) == set(OPERATIONS)


@pytest.mark.parametrize("size", [(24, 20), (20, 20)])
@pytest.mark.parametrize("name, mode, magnitudes", CASES)
def test_batched_operation_equals_torchvision_per_sample(name, mode, magnitudes, size):
    # Exact on a CPU: the batched kernels repeat torchvision's float32 arithmetic (a blend's fused multiply-add,
    # the affine grid's matrix product), so not even a rounding differs. The square size takes rotate's
    # rot90 fast paths for multiples of 90 degrees.
    images = make_images(4, *size)
    function = OPERATIONS[name] or (lambda batch, m, mode: batch)
    batched = function(images, np.array(magnitudes), mode)
    expected = torch.stack([torchvision_operation(name, image, m, mode) for image, m in zip(images, magnitudes)])
    assert batched.dtype == torch.uint8
    assert torch.equal(batched, expected)


@pytest.mark.parametrize("fn_id, torchvision_function", list(enumerate([F.adjust_brightness, F.adjust_contrast,
                                                                        F.adjust_saturation])))
def test_color_jitter_operations_equal_torchvision_per_sample(fn_id, torchvision_function):
    images = make_images(4)
    factors = np.array([0.0, 0.25, 1.0, 1.999])
    expected = torch.stack([torchvision_function(image, float(f)) for image, f in zip(images, factors)])
    assert torch.equal(JITTER_OPERATIONS[fn_id](images, factors, None), expected)


def test_sharpness_smoothing_rounds_as_torchvision_on_many_images():
    # The batched smoothing is exact integer sums over 13, rounded; torchvision's is a float32 convolution,
    # rounded: equal because k/13 is never within 1/26 of a half. Saturated, flat and noisy images, all factors.
    generator = torch.Generator().manual_seed(2)
    noisy = torch.randint(0, 256, (24, 3, 17, 19), generator=generator, dtype=torch.uint8)
    saturated = torch.randint(0, 2, (8, 3, 17, 19), generator=generator, dtype=torch.uint8) * 255
    images = torch.cat([noisy, saturated, make_images(4, 17, 19)])
    factors = np.linspace(0.0, 1.99, len(images))
    expected = torch.stack([F.adjust_sharpness(image, float(f)) for image, f in zip(images, factors)])
    assert torch.equal(adjust_sharpness(images, factors), expected)


def test_sharpness_leaves_images_of_two_rows_or_columns_as_they_are():
    images = make_images(2, 2, 9)
    assert torch.equal(OPERATIONS["Sharpness"](images, np.array([0.9, -0.9]), "nearest"), images)


# ------------------------------------------------------------------ whole policies = torchvision's transforms

def scripted_torch_rng(monkeypatch, calls):
    """torch.randint, torch.rand and torch.randperm replaced by `calls` in order: ("randint", low, high, value),
    ("rand", value), ("randperm", n, permutation); ColorJitter's factor draw by ("uniform", low, high, value).
    A draw torchvision makes that is not the next one listed fails."""
    queue = list(calls)

    def expect(*call):
        assert queue, f"torchvision drew {call} beyond the script"
        step = queue.pop(0)
        assert step[:-1] == call, f"torchvision drew {call}, the script expected {step[:-1]}"
        return step[-1]

    def randint(*args, **kwargs):
        low, high = (kwargs["low"], kwargs["high"]) if "high" in kwargs else (0, args[0])
        return torch.tensor(expect("randint", low, high))

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(expect("rand")))
    monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: torch.tensor(expect("randperm", n)))
    monkeypatch.setattr(v2.ColorJitter, "_generate_value", staticmethod(lambda low, high: expect("uniform", low,
                                                                                                    high)))
    return queue


def sign_draw(signed, magnitudes, negate):
    """torchvision draws a sign only for a signed operation with magnitudes: rand() <= 0.5 negates."""
    return [("rand", 0.0 if negate else 1.0)] if signed and magnitudes is not None else []


def torchvision_script(policy, choices, row, height, width):
    """The random draws torchvision's transforms make for sample `row` to arrive at its choices."""
    calls = []
    if policy.color_jitter > 0:
        order = choices["order"][row]
        calls.append(("randperm", 4, [*order, 3]))  # hue (3) is off: its place does not matter
        low, high = max(0.0, 1.0 - policy.color_jitter), 1.0 + policy.color_jitter
        calls += [("uniform", low, high, float(f)) for f in choices["factors"][row]]
    if policy.auto_augment is None:
        return calls
    transform = transform_for(policy)
    space = transform._AUGMENTATION_SPACE
    names = list(space)

    def operation(op, bins, negate, drawn_bin=None, bin_count=None):
        """An operation's draws; a magnitude bin is drawn (from bin_count) only where a policy draws one."""
        magnitudes_fn, signed = space[names[op]]
        magnitudes = magnitudes_fn(bins, height, width)
        bin_draw = [("randint", 0, bin_count, drawn_bin)] if bin_count and magnitudes is not None else []
        return [("randint", 0, len(names), op), *bin_draw, *sign_draw(signed, magnitudes, negate)]

    if policy.auto_augment == "ta_wide":
        bins = transform.num_magnitude_bins
        calls += operation(choices["op"][row], bins, choices["negate"][row], choices["bin"][row], bins)
    elif policy.auto_augment == "ra":
        for op, negate in zip(choices["op"][row], choices["negate"][row]):
            calls += operation(op, transform.num_magnitude_bins, negate)
    elif policy.auto_augment == "augmix":
        for chain in range(transform.mixture_width):
            depth = choices["depth"][row, chain]
            calls.append(("randint", 1, 4, depth))
            for step in range(depth):
                calls += operation(choices["op"][row, chain, step], transform._PARAMETER_MAX,
                                   choices["negate"][row, chain, step], choices["bin"][row, chain, step],
                                   transform.severity)
    else:
        sub_policy = choices["sub_policy"][row]
        calls.append(("randint", 0, len(transform._policies), sub_policy))
        for step, (name, _, _) in enumerate(transform._policies[sub_policy]):
            applied = choices["apply"][row, step]
            calls.append(("rand", 0.0 if applied else 2.0))  # applied when rand() <= probability
            if applied:
                magnitudes_fn, signed = space[name]
                calls += sign_draw(signed, magnitudes_fn(10, height, width), choices["negate"][row, step])
    return calls


@pytest.mark.parametrize("size", [(24, 20), (20, 20)])
@pytest.mark.parametrize("policy", [Policy(name) for name in POLICIES]
                         + [Policy(color_jitter=0.4), Policy("ta_wide", color_jitter=1.5),
                            Policy("ra", ra_magnitude=30, ra_num_ops=3), Policy("augmix", augmix_severity=10)],
                         ids=repr)
def test_augment_batch_equals_torchvision_transforms_given_the_same_choices(policy, size, monkeypatch):
    # torchvision's own ColorJitter and policy transform on each sample, their torch draws replaced by the
    # sample's drawn choices: same op set, bins, signs, draw structure and pixels.
    count = 24
    images = make_images(count, *size)
    keys, epochs = np.arange(100, 100 + count), np.arange(count) % 3
    batched = augment_batch(images, policy, 7, epochs, keys)
    choices = draw_choices(policy, 7, epochs, keys)
    jitter = v2.ColorJitter(brightness=policy.color_jitter, contrast=policy.color_jitter,
                            saturation=policy.color_jitter)
    expected = []
    with monkeypatch.context() as patch:
        for row, image in enumerate(images):
            queue = scripted_torch_rng(patch, torchvision_script(policy, choices, row, *size))
            if policy.color_jitter > 0:
                image = jitter(image)
            if policy.auto_augment is not None:
                transform = transform_for(policy)
                if policy.auto_augment == "augmix":
                    weights = iter([choices["mix"][row:row + 1], choices["chain_weights"][row:row + 1]])
                    transform._sample_dirichlet = lambda params: torch.as_tensor(next(weights)).float()
                image = transform(image)
            assert not queue, "torchvision drew less than the script"
            expected.append(image)
    assert torch.equal(batched, torch.stack(expected))


# ------------------------------------------------------------------ distributions = torchvision's

KEYS = np.arange(20_000)


def test_trivial_augment_draws_operation_bin_and_sign_uniformly():
    choices = draw_choices(Policy("ta_wide"), 3, 5, KEYS)
    transform = v2.TrivialAugmentWide()
    operations, bins = len(transform._AUGMENTATION_SPACE), transform.num_magnitude_bins
    assert_frequencies(choices["op"], np.full(operations, 1 / operations))
    assert_frequencies(choices["bin"], np.full(bins, 1 / bins))
    assert_frequencies(choices["negate"].astype(int), [0.5, 0.5])
    # choices independent of each other: the joint (operation, bin) frequencies are the products
    assert_frequencies(choices["op"] * bins + choices["bin"], np.full(operations * bins, 1 / (operations * bins)))


def test_rand_augment_draws_each_of_its_operations_uniformly():
    policy = Policy("ra", ra_num_ops=3)
    choices = draw_choices(policy, 3, 5, KEYS)
    operations = len(v2.RandAugment._AUGMENTATION_SPACE)
    assert choices["op"].shape == (len(KEYS), 3)
    for column in choices["op"].T:
        assert_frequencies(column, np.full(operations, 1 / operations))
    assert_frequencies(choices["op"][:, 0] * operations + choices["op"][:, 1], np.full(operations ** 2,
                                                                                       1 / operations ** 2))
    assert_frequencies(choices["negate"].astype(int), [0.5, 0.5])


def test_auto_augment_draws_a_sub_policy_uniformly_and_applies_each_operation_with_its_probability():
    choices = draw_choices(Policy("imagenet"), 3, 5, KEYS)
    sub_policies = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies
    assert_frequencies(choices["sub_policy"], np.full(len(sub_policies), 1 / len(sub_policies)))
    for index, pair in enumerate(sub_policies):
        drew = choices["sub_policy"] == index
        for step, (_, probability, _) in enumerate(pair):
            assert_frequencies(choices["apply"][drew, step].astype(int), [1 - probability, probability])


def test_augmix_draws_depths_operations_bins_and_weights_as_torchvision():
    policy = Policy("augmix", augmix_severity=4)
    choices = draw_choices(policy, 3, 5, KEYS)
    transform = transform_for(policy)
    width, alpha = transform.mixture_width, transform.alpha
    operations = len(transform._AUGMENTATION_SPACE)
    assert_frequencies(choices["depth"] - 1, np.full(3, 1 / 3))  # randint(1, 4)
    assert_frequencies(choices["op"], np.full(operations, 1 / operations))
    assert_frequencies(choices["bin"], np.full(4, 1 / 4))  # randint(severity)
    # Beta(alpha, alpha) and Dirichlet(alpha, ..., alpha): a weight of `width` is Beta(alpha, (width - 1) alpha);
    # a Kolmogorov-Smirnov test at significance 1e-3.
    np.testing.assert_allclose(choices["mix"].sum(axis=1), 1.0)
    np.testing.assert_allclose(choices["chain_weights"].sum(axis=1), 1.0)
    assert scipy.stats.kstest(choices["mix"][:, 0], scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    for column in choices["chain_weights"].T:
        assert scipy.stats.kstest(column, scipy.stats.beta(alpha, (width - 1) * alpha).cdf).pvalue > 1e-3


def test_color_jitter_draws_an_order_uniformly_and_factors_uniformly_in_its_range():
    choices = draw_choices(Policy(color_jitter=0.4), 3, 5, KEYS)
    orders = choices["order"]
    assert (np.sort(orders, axis=1) == [0, 1, 2]).all()
    assert_frequencies(orders[:, 0] * 3 + orders[:, 1], [0, 1 / 6, 1 / 6, 1 / 6, 0, 1 / 6, 1 / 6, 1 / 6, 0])
    for column in choices["factors"].T:
        assert scipy.stats.kstest(column, scipy.stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3
    assert (draw_choices(Policy(color_jitter=1.5), 3, 5, KEYS[:100])["factors"] >= 0).all()  # [max(0, 1 - F), 1 + F]


# ------------------------------------------------------------------ determinism

@pytest.mark.parametrize("policy", [Policy(name, color_jitter=0.3) for name in POLICIES], ids=repr)
def test_a_sample_gets_the_same_pixels_in_any_batch_and_order(policy):
    images = make_images(8, seed=3)
    keys, epochs = np.array([5, 900, 13, 2**40 + 1, 77, 78, 0, 31]), np.array([0, 1, 1, 2, 9, 9, 3, 0])
    batched = augment_batch(images, policy, 11, epochs, keys)
    order = np.array([6, 2, 7, 0, 4, 1, 5, 3])
    shuffled = augment_batch(images[order], policy, 11, epochs[order], keys[order])
    assert torch.equal(shuffled, batched[order])
    for row in range(8):
        alone = augment_batch(images[row:row + 1], policy, 11, int(epochs[row]), [keys[row]])
        assert torch.equal(alone[0], batched[row])


def test_other_epochs_keys_and_seeds_draw_other_choices():
    policy = Policy("ta_wide")

    def drawn(seed, epoch, keys):
        choices = draw_choices(policy, seed, epoch, keys)
        return choices["op"] * 1000 + choices["bin"] * 2 + choices["negate"]

    first = drawn(0, 0, KEYS[:2000])
    # a repeat by chance has probability about 1/14 · 1/31 · 1/2 (ops without magnitudes coincide more often)
    for other in (drawn(0, 1, KEYS[:2000]), drawn(1, 0, KEYS[:2000]), drawn(0, 0, KEYS[2000:4000])):
        assert np.mean(first == other) < 0.03
    assert np.array_equal(first, drawn(0, 0, KEYS[:2000]))


def test_policy_and_erase_draws_are_uncorrelated_with_the_crop_draws_and_each_other():
    # Every drawn quantity of one stream against every one of the others (crop boxes and flips; the policy's
    # choices; erase flags and boxes): |correlation| within 5 standard errors (1/sqrt(n)) of 0.
    keys, epochs = np.arange(20_000), np.arange(20_000) % 7
    boxes, flips = draw_crops(4, epochs, keys, 64, 48, (0.08, 1.0), 0.5)
    choices = draw_choices(Policy("augmix", color_jitter=0.4), 4, epochs, keys)
    erase, erased = erase_boxes(0.5, 4, epochs, keys, 64, 48)
    streams = [np.column_stack([boxes, flips]),
               np.column_stack([choices["order"][:, :2], choices["factors"], choices["mix"][:, 0],
                                choices["chain_weights"], *(choices[name].reshape(len(keys), -1)
                                                            for name in ("depth", "op", "bin", "negate"))]),
               np.column_stack([erase, erased])]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        widths = streams[a].shape[1]
        correlations = np.corrcoef(streams[a], streams[b], rowvar=False)[:widths, widths:]
        assert np.abs(correlations).max() < 5 / math.sqrt(len(keys))


def test_an_inactive_policy_returns_the_batch_and_settings_are_checked():
    images = make_images(2)
    assert not Policy().active and Policy("svhn").active and Policy(color_jitter=0.1).active
    assert augment_batch(images, Policy(), 0, 0, [0, 1]) is images
    for bad in (dict(auto_augment="trivial"), dict(ra_magnitude=31), dict(augmix_severity=0),
                dict(color_jitter=-0.1), dict(ra_num_ops=-1)):
        with pytest.raises(ValueError):
            Policy(**bad)
    with pytest.raises(ValueError):
        augment_batch(images.float(), Policy("ra"), 0, 0, [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [Policy(name, color_jitter=0.3) for name in POLICIES], ids=repr)
def test_a_cuda_batch_gets_the_cpu_pixels_within_float_rounding(policy):
    # The same choices on either device; a blend's rounding may differ by one level, and a nearest sample that
    # lands exactly between two pixels may pick the other one: at most 1% of the values differ, by 1 or by a
    # neighbour's value.
    images = make_images(8, 64, 48, seed=5)
    keys = np.arange(8)
    on_cpu = augment_batch(images, policy, 1, 2, keys)
    on_cuda = augment_batch(images.cuda(), policy, 1, 2, keys)
    assert on_cuda.device.type == "cuda"
    assert (on_cuda.cpu() != on_cpu).float().mean() < 0.01


# ------------------------------------------------------------------ random erasing

def test_erased_area_and_aspect_follow_random_erasing_scale_and_ratio():
    height, width = 100, 100
    boxes, erased = erase_boxes(1.0, 2, 0, KEYS, height, width)
    assert erased.all()  # at this size a try nearly always fits
    top, left, box_height, box_width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_height <= height).all() and (left + box_width <= width).all()
    # Each side is rounded to whole pixels: the area differs from the drawn one by at most
    # (side_h + side_w) / 2 + 1/4, where side_h + side_w <= sqrt(area) (sqrt(r) + 1/sqrt(r)) for aspect r.
    fraction = box_height * box_width / (height * width)
    worst_aspect = max(math.sqrt(r) + 1 / math.sqrt(r) for r in ERASE_RATIO)

    def rounding(scale):
        return (0.5 * worst_aspect * math.sqrt(scale * height * width) + 0.25) / (height * width)

    assert (fraction >= ERASE_SCALE[0] - rounding(ERASE_SCALE[0])).all()
    assert (fraction <= ERASE_SCALE[1] + rounding(ERASE_SCALE[1])).all()
    assert fraction.min() < ERASE_SCALE[0] + 0.005 and fraction.max() > ERASE_SCALE[1] - 0.01  # the range is used
    # the drawn area is uniform in scale: the mean fraction is the middle of the range, within rounding
    assert abs(fraction.mean() - sum(ERASE_SCALE) / 2) < 0.005
    # log aspect uniform in log ratio: as many boxes wider than tall as taller than wide, and some near the limits
    aspect = box_height / box_width
    assert abs(np.mean(aspect > 1) - np.mean(aspect < 1)) < 0.03
    assert aspect.max() > 0.8 * ERASE_RATIO[1] and aspect.min() < 1.25 * ERASE_RATIO[0]


def test_erase_probability_is_p_and_small_images_fall_back_to_no_erasing():
    for probability in (0.0, 0.25, 1.0):
        _, erased = erase_boxes(probability, 2, 1, KEYS, 64, 48)
        assert_frequencies(erased.astype(int), [1 - probability, probability])
    # A box must be narrower than the image; on a one-pixel-wide image even the smallest (2% of the area, aspect
    # 3.3) rounds to a width of 1: no try fits, and no sample is erased, as in torchvision.
    _, erased = erase_boxes(1.0, 2, 1, KEYS[:500], 100, 1)
    assert not erased.any()


def test_erase_batch_fills_each_drawn_rectangle_with_value_and_keeps_the_rest():
    images = torch.randn(16, 3, 24, 20, generator=torch.Generator().manual_seed(1)) + 5.0  # never -1.5
    keys, epochs = np.arange(40, 56), np.arange(16) % 2
    original = images.clone()
    erased_batch = erase_batch(images, 0.5, 9, epochs, keys, value=-1.5)
    images = original
    boxes, erased = erase_boxes(0.5, 9, epochs, keys, 24, 20)
    assert 0 < erased.sum() < 16
    for row, ((top, left, box_height, box_width), is_erased) in enumerate(zip(boxes, erased)):
        expected = images[row].clone()
        if is_erased:
            expected[:, top:top + box_height, left:left + box_width] = -1.5
        assert torch.equal(erased_batch[row], expected)
    # in place (the batch stage's normalised batch is its own), and alike in any batch
    alone = erase_batch(images[3:4].clone(), 0.5, 9, epochs[3], keys[3:4], value=-1.5)
    assert torch.equal(alone[0], erased_batch[3])
