"""mixing.py: Mixup and CutMix per pair, drawn from (seed, epoch, pair key) alone, so every batch layout
mixes the same pairs alike; pixels and targets as torchvision's MixUp and CutMix make them."""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from core.errors import ConfigError
from inputs.augment import draw_crops, sample_keys, uniforms
from inputs.mixing import (
    DRAWS,
    GENERATOR,
    SALT,
    Mixing,
    PairDraws,
    cutmix_boxes,
    draw_pairs,
    mix_batch,
    pair_trace,
)

KEYS = np.arange(20_000)
BOTH = Mixing(mixup_alpha=0.8, cutmix_alpha=1.0)


def kinds(drawn):
    return [kind for _, kind in pair_trace(drawn)]


def frequency_is_within_4_standard_errors(hits, trials, probability):
    standard_error = math.sqrt(probability * (1 - probability) / trials)
    return abs(hits / trials - probability) <= 4 * standard_error


def keyed_images(keys, channels=3, height=6, width=5):
    """A distinct image per sample key, whatever batch it lands in."""
    return torch.stack([torch.rand(channels, height, width, generator=torch.Generator().manual_seed(int(key)))
                        for key in keys])


# ------------------------------------------------------------------ the draws

@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    lam = draw_pairs(Mixing(mixup_alpha=alpha), seed=3, epoch=1, pair_keys=KEYS, height=8, width=8).lam
    assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue > 0.001


def test_mix_prob_and_switch_prob_set_how_often_pairs_are_mixed_and_by_which():
    drawn = draw_pairs(Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.3, switch_prob=0.7), seed=5, epoch=0,
                       pair_keys=KEYS, height=16, width=16)
    counts = {kind: kinds(drawn).count(kind) for kind in ("none", "mixup", "cutmix")}
    mixed = counts["mixup"] + counts["cutmix"]
    assert frequency_is_within_4_standard_errors(mixed, len(KEYS), 0.3)
    assert frequency_is_within_4_standard_errors(counts["cutmix"], mixed, 0.7)
    assert np.all(drawn.lam[~drawn.mixed] == 1.0) and not drawn.cutmix[~drawn.mixed].any()


def test_with_one_method_on_every_mixed_pair_uses_it():
    only_mixup = draw_pairs(Mixing(mixup_alpha=1.0, switch_prob=1.0), 0, 0, KEYS[:500], 8, 8)
    only_cutmix = draw_pairs(Mixing(cutmix_alpha=1.0, switch_prob=0.0), 0, 0, KEYS[:500], 8, 8)
    assert set(kinds(only_mixup)) == {"mixup"} and not only_mixup.boxes.any()
    assert set(kinds(only_cutmix)) == {"cutmix"}


@pytest.mark.parametrize("height, width", [(16, 16), (20, 24), (5, 7), (1, 1)])
def test_cutmix_box_lies_inside_the_image_and_its_area_is_one_minus_lambda(height, width):
    drawn = draw_pairs(Mixing(cutmix_alpha=1.0), seed=2, epoch=4, pair_keys=KEYS[:3000], height=height, width=width)
    x0, y0, x1, y1 = drawn.boxes.T
    assert np.all((0 <= x0) & (x0 <= x1) & (x1 <= width) & (0 <= y0) & (y0 <= y1) & (y1 <= height))
    np.testing.assert_allclose((x1 - x0) * (y1 - y0), (1 - drawn.lam) * height * width, rtol=0, atol=1e-9)
    if height > 1:  # boxes of every size, not all empty or all whole
        assert 0 < np.mean(drawn.lam < 1) < 1 and np.ptp(drawn.lam) > 0.5


@pytest.mark.parametrize("height, width", [(20, 24), (224, 224), (375, 500), (5, 7)])
def test_cutmix_box_and_lambda_are_torchvisions_for_the_same_lambda_and_centre(height, width):
    cutmix = v2.CutMix(alpha=1.0, num_classes=3)
    for seed in range(250):
        torch.manual_seed(seed)
        params = cutmix.make_params([torch.empty(3, height, width)])
        torch.manual_seed(seed)  # the same draws again, in make_params' order
        lam = float(cutmix._dist.sample(()))
        centre_x, centre_y = int(torch.randint(width, (1,))), int(torch.randint(height, (1,)))
        boxes, lam_left = cutmix_boxes(np.array([lam]), centre_x, centre_y, height, width)
        assert tuple(boxes[0].tolist()) == params["box"]
        assert lam_left[0] == params["lam_adjusted"]


def test_the_draws_of_a_pair_are_mix_v1s():
    # A checkpoint records GENERATOR: these uses of a pair's uniforms are what "mix-v1" means.
    keys, height, width = KEYS[:400], 20, 24
    mixing = Mixing(mixup_alpha=0.4, cutmix_alpha=1.5, mix_prob=0.8, switch_prob=0.6)
    drawn = draw_pairs(mixing, 6, 2, keys, height, width)
    mixed, cutmix_or_mixup, lam_uniform, centre_x, centre_y = uniforms(sample_keys(6, 2, keys) ^ SALT, DRAWS).T
    mixed = mixed < 0.8
    cutmix = mixed & (cutmix_or_mixup < 0.6)
    centre_x, centre_y = (centre_x * width).astype(np.int64), (centre_y * height).astype(np.int64)
    boxes, cutmix_lam = cutmix_boxes(scipy.special.betaincinv(1.5, 1.5, lam_uniform), centre_x, centre_y, height, width)
    assert np.array_equal(drawn.mixed, mixed) and np.array_equal(drawn.cutmix, cutmix)
    assert np.array_equal(drawn.boxes[cutmix], boxes[cutmix]) and np.array_equal(drawn.lam[cutmix], cutmix_lam[cutmix])
    mixup = mixed & ~cutmix
    assert np.array_equal(drawn.lam[mixup], scipy.special.betaincinv(0.4, 0.4, lam_uniform[mixup]))
    assert np.all(drawn.lam[~mixed] == 1.0) and not drawn.boxes[~cutmix].any()


def test_a_pairs_draws_depend_only_on_its_key_and_are_apart_from_the_crop_draws():
    keys = np.array([7, 1000, 3, 42])
    together = draw_pairs(BOTH, 1, 2, keys, 16, 16)
    for i in range(len(keys)):
        alone = draw_pairs(BOTH, 1, 2, keys[i:i + 1], 16, 16)
        assert all(np.array_equal(field[i:i + 1], alone_field) for field, alone_field in zip(together, alone))
    # Salted: the mixed? draw is not the crop's first uniform (an area draw) for the same key.
    mixed_prob_half = draw_pairs(Mixing(mixup_alpha=1.0, mix_prob=0.5), 1, 2, KEYS, 8, 8).mixed
    crop_area_low = draw_crops(1, 2, KEYS, 100, 100, (0.0, 1.0), 0.5)[0][:, 2] < 50
    assert abs(np.corrcoef(mixed_prob_half, crop_area_low)[0, 1]) < 4 / math.sqrt(len(KEYS))


def test_draws_differ_across_epochs_and_seeds():
    lam = draw_pairs(BOTH, 1, 2, KEYS[:1000], 16, 16).lam
    assert np.mean(lam == draw_pairs(BOTH, 1, 3, KEYS[:1000], 16, 16).lam) < 0.05
    assert np.mean(lam == draw_pairs(BOTH, 2, 2, KEYS[:1000], 16, 16).lam) < 0.05
    assert np.array_equal(lam, draw_pairs(BOTH, 1, 2, KEYS[:1000], 16, 16).lam)


def test_mixing_is_active_while_configured_and_before_its_off_epoch():
    assert not Mixing().active(0) and not Mixing().configured
    assert all(Mixing(cutmix_alpha=1.0).active(epoch) for epoch in (0, 1, 500))
    stops = Mixing(mixup_alpha=0.2, off_epoch=3)
    assert [stops.active(epoch) for epoch in range(5)] == [True, True, True, False, False]
    off = draw_pairs(Mixing(mixup_alpha=0.2, cutmix_alpha=1.0, off_epoch=3), 0, 3, KEYS[:100], 8, 8)
    assert set(kinds(off)) == {"none"} and np.all(off.lam == 1.0) and not off.boxes.any()
    assert GENERATOR == "mix-v1"


@pytest.mark.parametrize("settings", [dict(mixup_alpha=-1.0), dict(cutmix_alpha=float("nan")),
                                      dict(mixup_alpha=1.0, mix_prob=1.5), dict(cutmix_alpha=1.0, switch_prob=-0.1),
                                      dict(mixup_alpha=1.0, off_epoch=-1)])
def test_impossible_settings_are_refused(settings):
    with pytest.raises(ConfigError):
        Mixing(**settings)


# ------------------------------------------------------------------ exact under any layout

@pytest.mark.parametrize("processes, pairs_per_process", [(2, 4), (4, 2), (8, 1)])
def test_every_layout_mixes_the_same_pairs_alike(processes, pairs_per_process):
    # One global row of 8 pairs (16 positions) of a shuffled epoch; the sampler hands rank r the pairs
    # r, r + processes, ...; a rank's pair keys are its batch's keys[0::2].
    sequence = np.random.default_rng(0).permutation(1000)[:16]
    pairs = sequence.reshape(8, 2)
    one_process = draw_pairs(BOTH, 9, 4, sequence[0::2], 6, 5)
    images_one, targets_one = mix_batch(keyed_images(sequence), torch.as_tensor(sequence % 10), 10, one_process)
    trace_one = pair_trace(one_process)
    assert {"mixup", "cutmix"} <= set(kinds(one_process))  # both methods are exercised
    for rank in range(processes):
        rank_pairs = np.arange(rank, 8, processes)
        assert len(rank_pairs) == pairs_per_process
        keys = pairs[rank_pairs].reshape(-1)
        drawn = draw_pairs(BOTH, 9, 4, keys[0::2], 6, 5)
        for field, whole in zip(drawn, one_process):
            assert np.array_equal(field, whole[rank_pairs])
        assert pair_trace(drawn) == [trace_one[p] for p in rank_pairs]
        images, targets = mix_batch(keyed_images(keys), torch.as_tensor(keys % 10), 10, drawn)
        rows = np.stack([2 * rank_pairs, 2 * rank_pairs + 1], axis=1).reshape(-1)
        assert torch.equal(images, images_one[rows]) and torch.equal(targets, targets_one[rows])


# ------------------------------------------------------------------ mix_batch

def fixed_pairs():
    """Four pairs: mixup at 0.3, cutmix with a box, not mixed, mixup of two images of one class."""
    return PairDraws(lam=np.array([0.3, 1 - 6 / 30, 1.0, 0.65]), mixed=np.array([True, True, False, True]),
                     cutmix=np.array([False, True, False, False]),
                     boxes=np.array([[0, 0, 0, 0], [1, 2, 4, 4], [0, 0, 0, 0], [0, 0, 0, 0]]))


def test_mix_batch_pixels_follow_the_formulas_exactly():
    images, labels = torch.rand(8, 3, 6, 5), torch.tensor([0, 1, 2, 0, 1, 1, 2, 2])
    drawn = fixed_pairs()
    mixed, _ = mix_batch(images, labels, 3, drawn)
    lam, one_minus = torch.tensor(0.3), torch.tensor(1 - 0.3)
    assert torch.equal(mixed[0], lam * images[0] + one_minus * images[1])
    assert torch.equal(mixed[1], lam * images[1] + one_minus * images[0])
    inside = torch.zeros(6, 5, dtype=torch.bool)
    inside[2:4, 1:4] = True  # y0:y1, x0:x1
    for own, partner in ((2, 3), (3, 2)):
        assert torch.equal(mixed[own][:, inside], images[partner][:, inside])
        assert torch.equal(mixed[own][:, ~inside], images[own][:, ~inside])
    assert torch.equal(mixed[4:6], images[4:6])


def test_mix_batch_targets_share_lambda_between_own_and_partner_labels():
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 2])
    _, targets = mix_batch(torch.rand(8, 3, 6, 5), labels, 4, fixed_pairs())
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8), rtol=0, atol=1e-6)
    expected = torch.zeros(8, 4)
    for row, (own, partner, lam) in enumerate([(0, 1, 0.3), (1, 0, 0.3), (2, 0, 0.8), (0, 2, 0.8),
                                               (1, 1, 1.0), (1, 1, 1.0), (2, 2, 1.0), (2, 2, 1.0)]):
        expected[row, own] += lam
        expected[row, partner] += 1 - lam
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)


def torchvision_with(transform_class, params):
    """torchvision's MixUp or CutMix with the given parameters instead of random ones: the reference."""
    class Fixed(transform_class):
        def make_params(self, flat_inputs):
            return params
    return Fixed(num_classes=5)


def test_each_pair_is_mixed_exactly_as_torchvision_mixes_a_batch_of_that_pair():
    # On a batch of two, torchvision's roll(1) partner is the other member: a pair-mode reference.
    keys = np.arange(400, 432)
    drawn = draw_pairs(BOTH, 1, 0, keys[0::2], 20, 24)
    images, labels = torch.randn(32, 3, 20, 24), torch.as_tensor(keys % 5)
    mixed, targets = mix_batch(images, labels, 5, drawn)
    assert {"mixup", "cutmix"} <= set(kinds(drawn))
    for p in range(16):
        if drawn.cutmix[p]:
            reference = torchvision_with(v2.CutMix, dict(box=tuple(drawn.boxes[p].tolist()),
                                                         lam_adjusted=float(drawn.lam[p])))
        else:
            reference = torchvision_with(v2.MixUp, dict(lam=float(drawn.lam[p])))
        ref_images, ref_targets = reference(images[2 * p:2 * p + 2], labels[2 * p:2 * p + 2])
        assert torch.equal(mixed[2 * p:2 * p + 2], ref_images), p
        assert torch.equal(targets[2 * p:2 * p + 2], ref_targets), p


def test_a_batch_that_is_not_its_pairs_is_refused():
    with pytest.raises(ValueError, match="pairs"):
        mix_batch(torch.rand(6, 3, 4, 4), torch.zeros(6, dtype=torch.int64), 3, fixed_pairs())


# ------------------------------------------------------------------ the loss the training loop uses

def test_label_smoothed_cross_entropy_of_mixed_targets_is_the_smoothed_mixup_target():
    eps, classes = 0.1, 5
    keys = np.arange(16)
    drawn = draw_pairs(BOTH, 0, 0, keys[0::2], 8, 8)
    labels = torch.as_tensor(keys % classes)
    _, targets = mix_batch(torch.rand(16, 3, 8, 8), labels, classes, drawn)
    logits = torch.randn(16, classes, generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(logits, targets, label_smoothing=eps)

    log_probs = F.log_softmax(logits, dim=1)
    formula = (-((1 - eps) * targets + eps / classes) * log_probs).sum(1).mean()
    torch.testing.assert_close(loss, formula, rtol=1e-6, atol=0)

    # timm's mixup_target: each one-hot smoothed (off = eps/C, on = 1 - eps + eps/C), then mixed.
    def smooth(onehot):
        return onehot * (1 - eps) + eps / classes
    lam = torch.as_tensor(np.repeat(drawn.lam, 2), dtype=torch.float32).view(-1, 1)
    onehot = F.one_hot(labels, classes).float()
    timm_targets = lam * smooth(onehot) + (1 - lam) * smooth(onehot[torch.arange(16) ^ 1])
    torch.testing.assert_close(loss, F.cross_entropy(logits, timm_targets), rtol=1e-6, atol=0)
    assert not torch.isclose(loss, F.cross_entropy(logits, targets), rtol=1e-4)  # the smoothing does count


def test_multi_label_targets_mix_as_they_are():
    images = torch.zeros(4, 3, 6, 6)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    drawn = draw_pairs(Mixing(mixup_alpha=1.0), seed=3, epoch=1, pair_keys=np.array([4, 9]), height=6, width=6)
    _, targets = mix_batch(images, labels, 3, drawn)
    lam = torch.tensor(np.repeat(drawn.lam, 2), dtype=torch.float32).view(-1, 1)
    torch.testing.assert_close(targets, lam * labels + (1 - lam) * labels[[1, 0, 3, 2]])
