"""Mixup and CutMix per pair of consecutive samples, drawn so that a resume on any layout mixes alike.

When mixing is on, the sampler hands ranks whole pairs of consecutive global positions (2k, 2k+1), so
rows (2p, 2p+1) of every process's micro-batch are a pair, and both members are mixed with each other
(timm's mode='pair'). A pair's draws (mixed or not, mixup or cutmix, lambda, box centre) are uniforms of
the counter-based generator (inputs/augment.py) keyed by (seed, epoch, pair key), the pair key being the
sample key of its first member, salted so they are independent of that sample's crop draws. Nothing
depends on the rank, the per-process batch or the step, so any world size mixes the same pairs with the
same lambda, and a resumed run mixes what the uninterrupted one would have.

Lambda ~ Beta(alpha, alpha) is the inverse CDF of a uniform. The CutMix box is torchvision's v2.CutMix
(timm's rand_bbox): half sides int(0.5·sqrt(1 - lam)·side) around an integer centre, clipped to the
image, and lambda corrected to the share of the image left unpasted. The drawn targets are
lam·onehot(own) + (1 - lam)·onehot(partner); label smoothing is left to the loss
(F.cross_entropy(..., label_smoothing=eps) smooths probability targets as timm's mixup_target does).
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from inputs import augment

GENERATOR = "mix-v1"  # what a checkpoint records as the way its run drew the mixing
SALT = np.uint64(int.from_bytes(b"mixpairs", "big"))  # pair draws apart from the crop draws of the same key
DRAWS = 5  # per pair: mixed?, cutmix?, lambda, box centre x, box centre y


@dataclass(frozen=True)
class Mixing:
    mixup_alpha: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    mix_prob: float = 1.0  # probability that a pair is mixed
    switch_prob: float = 0.5  # when both are on: probability of cutmix instead of mixup
    off_epoch: int = 0  # no mixing from this epoch on (0 = never off)

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns it off), not {getattr(self, name)}")
        for name in ("mix_prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} is a probability, between 0 and 1, not {getattr(self, name)}")
        if self.off_epoch < 0:
            raise ConfigError(f"the mixing off epoch must be >= 0 (0 = never off), not {self.off_epoch}")

    @property
    def configured(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def active(self, epoch) -> bool:
        return self.configured and (self.off_epoch == 0 or epoch < self.off_epoch)


class PairDraws(NamedTuple):
    """Per pair: lam (P,) float64, 1.0 where not mixed; mixed and cutmix (P,) bool; boxes (P, 4) int64
    (x0, y0, x1, y1), all zeros where not cutmix."""
    lam: np.ndarray
    mixed: np.ndarray
    cutmix: np.ndarray
    boxes: np.ndarray


def beta_inverse_cdf(alpha, uniform):
    """Beta(alpha, alpha) numbers from uniforms in [0, 1) (inverse transform sampling)."""
    return scipy.special.betaincinv(alpha, alpha, uniform)


def cutmix_boxes(lam, centre_x, centre_y, height, width):
    """torchvision v2.CutMix's box for each drawn lam and integer centre: half sides
    int(0.5·sqrt(1 - lam)·side), clipped to the height x width image. Returns ((P, 4) int64 boxes
    (x0, y0, x1, y1), the lam each box leaves: 1 - box area / image area)."""
    half_side = 0.5 * np.sqrt(1.0 - np.asarray(lam, dtype=np.float64))
    half_w, half_h = np.floor(half_side * width).astype(np.int64), np.floor(half_side * height).astype(np.int64)
    x0, x1 = np.maximum(centre_x - half_w, 0), np.minimum(centre_x + half_w, width)
    y0, y1 = np.maximum(centre_y - half_h, 0), np.minimum(centre_y + half_h, height)
    return np.stack([x0, y0, x1, y1], axis=1), 1.0 - (x1 - x0) * (y1 - y0) / (width * height)


def draw_pairs(mixing, seed, epoch, pair_keys, height, width):
    """The mixing of P pairs of epoch `epoch` on height x width images, a function of (seed, epoch, pair
    key) alone; no pair is mixed where the mixing is not active in that epoch."""
    pair_keys = np.atleast_1d(np.asarray(pair_keys, dtype=np.uint64))
    pairs = len(pair_keys)
    lam, boxes = np.ones(pairs), np.zeros((pairs, 4), dtype=np.int64)
    if not mixing.active(epoch):
        return PairDraws(lam, np.zeros(pairs, dtype=bool), np.zeros(pairs, dtype=bool), boxes)
    draws = augment.uniforms(augment.sample_keys(seed, epoch, pair_keys) ^ SALT, DRAWS)
    mixed = draws[:, 0] < mixing.mix_prob
    if mixing.cutmix_alpha > 0 and mixing.mixup_alpha > 0:
        cutmix = mixed & (draws[:, 1] < mixing.switch_prob)
    else:
        cutmix = mixed & (mixing.cutmix_alpha > 0)
    mixup = mixed & ~cutmix
    if mixup.any():
        lam[mixup] = beta_inverse_cdf(mixing.mixup_alpha, draws[mixup, 2])
    if cutmix.any():
        centre_x = np.floor(draws[cutmix, 3] * width).astype(np.int64)
        centre_y = np.floor(draws[cutmix, 4] * height).astype(np.int64)
        drawn_lam = beta_inverse_cdf(mixing.cutmix_alpha, draws[cutmix, 2])
        boxes[cutmix], lam[cutmix] = cutmix_boxes(drawn_lam, centre_x, centre_y, height, width)
    return PairDraws(lam, mixed, cutmix, boxes)


def mix_batch(images, labels, num_classes, drawn):
    """Mix each pair of rows (2p, 2p+1) of images (B, C, H, W) float with each other as drawn (draw_pairs'
    PairDraws for the B/2 pairs): mixup blends, lam·own + (1 - lam)·partner; cutmix pastes the partner's
    pixels inside the pair's box. Returns (mixed images, targets (B, num_classes) float32 = lam·onehot(own)
    + (1 - lam)·onehot(partner)), on the images' device; multi-label `labels` (B, num_classes) mix as
    given. The weights lam and 1 - lam are rounded from float64, as torchvision's MixUp does with its
    Python float lam."""
    batch, _, height, width = images.shape
    if batch != 2 * len(drawn.lam):
        raise ValueError(f"a batch of {batch} images cannot hold the {len(drawn.lam)} drawn pairs (two rows each)")
    device = images.device
    partner = torch.arange(batch, device=device) ^ 1  # rows 2p and 2p+1 swapped

    def per_row(values, dtype):
        return torch.from_numpy(np.asarray(values)).to(device=device, dtype=dtype)

    # Three passes over the batch: the pairs' rows swapped (one copy), then lam·own + (1 - lam)·partner
    # in place on it, with weights 1 and 0 on the rows that are not blended; cutmix rows are redone below.
    swapped = images.view(batch // 2, 2, *images.shape[1:]).flip(1).reshape(images.shape)
    mixup = np.repeat(drawn.mixed & ~drawn.cutmix, 2)
    own = per_row(np.where(mixup, np.repeat(drawn.lam, 2), 1.0), images.dtype).view(-1, 1, 1, 1)
    other = per_row(np.where(mixup, np.repeat(1.0 - drawn.lam, 2), 0.0), images.dtype).view(-1, 1, 1, 1)
    mixed = swapped.mul(other).add_(images * own) if mixup.any() else images.clone()
    cutmix = np.repeat(drawn.cutmix, 2)
    if cutmix.any():
        rows = torch.as_tensor(np.flatnonzero(cutmix), device=device)
        x0, y0, x1, y1 = (torch.as_tensor(np.repeat(side, 2)[cutmix], device=device).view(-1, 1)
                          for side in drawn.boxes.T)
        in_box = (((torch.arange(height, device=device) >= y0) & (torch.arange(height, device=device) < y1))
                  .view(-1, 1, height, 1)
                  & ((torch.arange(width, device=device) >= x0) & (torch.arange(width, device=device) < x1))
                  .view(-1, 1, 1, width))
        mixed[rows] = torch.where(in_box, swapped[rows], images[rows])

    labels = labels.to(device)
    # Multi-label targets (B, classes) of 0/1 mix as they are; class indices as one-hot rows.
    onehot = labels.float() if labels.dim() == 2 else F.one_hot(labels, num_classes).float()
    targets = (per_row(np.repeat(drawn.lam, 2), torch.float32).view(-1, 1) * onehot
               + per_row(np.repeat(1.0 - drawn.lam, 2), torch.float32).view(-1, 1) * onehot[partner])
    return mixed, targets


def pair_trace(drawn):
    """Per pair [lam to 10 digits, "mixup" | "cutmix" | "none"]: JSON for the sample trace."""
    kinds = np.where(drawn.cutmix, "cutmix", np.where(drawn.mixed, "mixup", "none"))
    return [[round(float(lam), 10), str(kind)] for lam, kind in zip(drawn.lam, kinds)]
