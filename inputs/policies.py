"""Per-sample augmentation policies (TrivialAugment-wide, RandAugment, AutoAugment, AugMix, colour jitter) and
random erasing, applied to whole batches, with every random choice drawn from the counter-based generator.

Draws. A sample's choices are a pure function of (seed, epoch, key) (augment.py): its uniforms come from its
sample key XOR a constant salt, one salt per purpose, so they are independent of the crop draws (unsalted keys)
and of each other. The uniforms become choices in torchvision's own terms (draw_choices: operation index,
magnitude bin, sign, sub-policy, AugMix depth and weights), drawn with torchvision's distributions; AugMix's
Beta and Dirichlet weights are inverse CDFs of uniforms. A sample draws the same choices, and gets the same
pixels, whatever batch it comes in and in what order.

Tables. The operation sets, magnitude bins, signed flags, AutoAugment sub-policies and AugMix settings are read
from torchvision's transform classes at run time, never restated here, so a policy is torchvision's policy.

Pixels. A batch is grouped by operation: every sample that drew operation X at a step goes through one batched
call of X with a tensor of per-sample magnitudes, so a batch costs a few kernels per operation, not a Python
loop per sample. The batched operations follow torchvision's uint8 tensor kernels (v2.functional) operation by
operation, including their float32 arithmetic (a blend is one fused multiply-add, as torch's add with alpha),
so on a CPU they give torchvision's pixels exactly (tests/test_policies.py); autocontrast, equalize and invert
are torchvision's own functions, which already work per image of a batch. Geometric operations build one
inverse-affine matrix per sample, as torchvision's _get_inverse_affine_matrix in float64, and sample the
batch with one grid_sample (nearest, or AugMix's bilinear; zeros outside, as torchvision with fill None).
Nothing here leaves the images' device: draws are numpy, moved with torch.as_tensor.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
import scipy.special
import torch
import torch.nn.functional as nnf
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from inputs.augment import sample_keys, uniforms

POLICIES = ("ta_wide", "ra", "augmix", "imagenet", "cifar10", "svhn")
GENERATOR = "policy-v1"  # what a checkpoint records as the way its run drew policies and erasing
POLICY_SALT = np.uint64(0x5D1F0A3C9B7E2461)
ERASE_SALT = np.uint64(0xC2B2AE3D27D4EB4F)

JITTER_ORDERS = np.array(list(itertools.permutations(range(3))))  # (brightness, contrast, saturation) orders
JITTER_DRAWS = 4  # the order, then the three factors; the policy's draws follow
AUTO_AUGMENT_BINS = 10  # AutoAugment.forward's magnitude table size (a constant there, not an attribute)
AUGMIX_MAX_DEPTH = 3  # AugMix.forward's random chain depth: randint(1, 4)
ERASE_TRIES = 10  # RandomErasing.make_params' tries
_ERASING = v2.RandomErasing()
ERASE_SCALE, ERASE_RATIO = tuple(_ERASING.scale), tuple(_ERASING.ratio)


@dataclass(frozen=True)
class Policy:
    """What augment_batch does after the crop: colour jitter of strength `color_jitter` (0 = off), then the
    auto-augment policy `auto_augment` (one of POLICIES, None = off) with its settings."""
    auto_augment: str | None = None
    ra_magnitude: int = 9
    ra_num_ops: int = 2
    augmix_severity: int = 3
    color_jitter: float = 0.0

    def __post_init__(self):
        if self.auto_augment is not None and self.auto_augment not in POLICIES:
            raise ValueError(f"auto_augment must be one of {', '.join(POLICIES)} or None, not {self.auto_augment!r}")
        if self.ra_num_ops < 0 or not 0 <= self.ra_magnitude < v2.RandAugment().num_magnitude_bins:
            raise ValueError(f"ra_num_ops must be >= 0 and ra_magnitude a bin of RandAugment's table, "
                             f"not {self.ra_num_ops} and {self.ra_magnitude}")
        v2.AugMix(severity=self.augmix_severity)  # torchvision's own range check
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, not {self.color_jitter}")

    @property
    def active(self) -> bool:
        return self.auto_augment is not None or self.color_jitter > 0


def transform_for(policy):
    """torchvision's transform for policy.auto_augment: where the tables and settings are read from."""
    if policy.auto_augment == "ta_wide":
        return v2.TrivialAugmentWide()
    if policy.auto_augment == "ra":
        return v2.RandAugment(num_ops=policy.ra_num_ops, magnitude=policy.ra_magnitude)
    if policy.auto_augment == "augmix":
        return v2.AugMix(severity=policy.augmix_severity)
    return v2.AutoAugment(v2.AutoAugmentPolicy(policy.auto_augment))


def magnitude_bins(transform):
    if isinstance(transform, v2.AugMix):
        return transform._PARAMETER_MAX
    return getattr(transform, "num_magnitude_bins", AUTO_AUGMENT_BINS)


def operation_space(transform, height, width):
    """A transform's operations in its order: (names, (ops, bins) float64 magnitudes, signed flags). An operation
    without magnitudes has zeros and is unsigned, as torchvision applies it with magnitude 0."""
    space = transform._AUGMENTATION_SPACE
    tables = [magnitudes(magnitude_bins(transform), height, width) for magnitudes, _ in space.values()]
    magnitudes = np.stack([np.zeros(magnitude_bins(transform)) if table is None else table.double().numpy()
                           for table in tables])
    signed = np.array([is_signed and table is not None for (_, is_signed), table in zip(space.values(), tables)])
    return tuple(space), magnitudes, signed


def interpolation_mode(transform):
    return v2.InterpolationMode(transform.interpolation).value


def draw_count(policy):
    """Uniforms per sample: colour jitter's, then the policy's (AutoAugment: sub-policy, then apply and sign per
    operation; AugMix: the Beta, the Dirichlet, then per chain its depth and (operation, bin, sign) per step)."""
    if policy.auto_augment == "augmix":
        width = transform_for(policy).mixture_width
        return JITTER_DRAWS + 1 + width + width * (1 + 3 * AUGMIX_MAX_DEPTH)
    return JITTER_DRAWS + {None: 0, "ta_wide": 3, "ra": 2 * policy.ra_num_ops}.get(policy.auto_augment, 5)


def draw_choices(policy, seed, epochs, keys):
    """Each sample's random choices for `policy`, in torchvision's terms (arrays with one row per sample):
    colour jitter: order (B, 3) of fn ids (0 brightness, 1 contrast, 2 saturation), factors (B, 3) in that id order;
    ta_wide: op (B,) index into TrivialAugmentWide's space, bin (B,), negate (B,);
    ra: op (B, num_ops), negate (B, num_ops);
    AutoAugment: sub_policy (B,), apply (B, 2), negate (B, 2);
    augmix: mix (B, 2) weights of the original and of the chains' sum, chain_weights (B, width), depth (B, width),
    op, bin and negate (B, width, AUGMIX_MAX_DEPTH).
    A sign is drawn for every operation and used where torchvision draws one (signed, with magnitudes)."""
    keys = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    epochs = np.broadcast_to(np.asarray(epochs, dtype=np.uint64), keys.shape)
    draws = uniforms(sample_keys(seed, epochs, keys) ^ POLICY_SALT, draw_count(policy))
    choices = {}
    if policy.color_jitter > 0:
        low, high = max(0.0, 1.0 - policy.color_jitter), 1.0 + policy.color_jitter
        choices["order"] = JITTER_ORDERS[np.floor(draws[:, 0] * len(JITTER_ORDERS)).astype(np.int64)]
        choices["factors"] = low + (high - low) * draws[:, 1:JITTER_DRAWS]
    if policy.auto_augment is None:
        return choices
    transform, drawn = transform_for(policy), draws[:, JITTER_DRAWS:]
    operations = len(transform._AUGMENTATION_SPACE)

    def pick(draw, count):
        return np.floor(draw * count).astype(np.int64)

    if policy.auto_augment == "ta_wide":
        choices.update(op=pick(drawn[:, 0], operations), bin=pick(drawn[:, 1], magnitude_bins(transform)),
                       negate=drawn[:, 2] < 0.5)
    elif policy.auto_augment == "ra":
        choices.update(op=pick(drawn[:, 0::2], operations), negate=drawn[:, 1::2] < 0.5)
    elif policy.auto_augment == "augmix":
        width, alpha = transform.mixture_width, transform.alpha
        original = scipy.special.betaincinv(alpha, alpha, drawn[:, 0])
        gammas = scipy.special.gammaincinv(alpha, drawn[:, 1:1 + width])
        chains = drawn[:, 1 + width:].reshape(-1, width, 1 + 3 * AUGMIX_MAX_DEPTH)
        choices.update(mix=np.stack([original, 1.0 - original], axis=1),
                       chain_weights=gammas / gammas.sum(axis=1, keepdims=True),
                       depth=1 + pick(chains[:, :, 0], AUGMIX_MAX_DEPTH), op=pick(chains[:, :, 1::3], operations),
                       bin=pick(chains[:, :, 2::3], transform.severity), negate=chains[:, :, 3::3] < 0.5)
    else:
        sub_policy = pick(drawn[:, 0], len(transform._policies))
        probabilities = np.array([[probability for _, probability, _ in pair] for pair in transform._policies])
        choices.update(sub_policy=sub_policy, apply=drawn[:, 1:3] < probabilities[sub_policy],
                       negate=drawn[:, 3:5] < 0.5)
    return choices


# ------------------------------------------------------------------ batched operations (uint8 in, uint8 out)

def per_sample(values, images):
    """(N,) float64 values rounded once to float32, as an (N, 1, 1, 1) tensor on the images' device."""
    return float32_tensor(values, images.device).view(-1, 1, 1, 1)


def float32_tensor(values, device):
    """Rounded to float32 by numpy (as torch rounds), so devices without float64 take them too."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64).astype(np.float32), device=device)


def blend(images, other, ratios):
    """torchvision's _blend per sample: images·r + other·(1 - r) as one fused multiply-add in float32, as
    add_(other, alpha=1 - r) computes it, with 1 - r taken in float64 first; clamped, truncated to uint8."""
    complements = per_sample(1.0 - np.asarray(ratios), images)
    blended = images.float().mul_(per_sample(ratios, images)).addcmul_(other, complements)
    return blended.clamp_(0, 255).to(torch.uint8)


def grayscale(images):
    """torchvision's floor'd float grayscale of a uint8 batch (its uint8 grayscale truncates the same float)."""
    return F.rgb_to_grayscale(images).float()


def adjust_brightness(images, factors):
    return images.float().mul_(per_sample(factors, images)).clamp_(0, 255).to(torch.uint8)


def adjust_saturation(images, factors):
    return blend(images, grayscale(images), factors)


def adjust_contrast(images, factors):
    return blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factors)


def adjust_sharpness(images, factors):
    """The inner pixels blended with their smoothing (3x3, centre weight 5, neighbours 1, over 13), rounded; the
    border rows and columns are kept. The smoothing is k/13 for an integer k (a 3x3 sum plus 4 x the centre):
    never within 1/26 of a half, so rounding it gives what torchvision's float32 convolution rounds to, while
    k comes exactly from six shifted additions, cheaper than a grouped convolution."""
    height, width = images.shape[-2:]
    if height <= 2 or width <= 2:
        return images
    output = images.float()
    column_sums = output[..., :-2, :] + output[..., 1:-1, :] + output[..., 2:, :]
    inner = output[..., 1:-1, 1:-1]
    weighted = column_sums[..., :-2] + column_sums[..., 1:-1] + column_sums[..., 2:] + 4 * inner
    smoothed = weighted.div_(13).round_()
    inner.addcmul_(smoothed.sub_(inner), per_sample(1.0 - np.asarray(factors), images))
    return output.clamp_(0, 255).to(torch.uint8)


def posterize(images, bits):
    """Keep the top `bits` bits of every value (8 or more: all)."""
    bits = np.asarray(bits, dtype=np.int64)
    masks = np.where(bits >= 8, 255, ((1 << bits) - 1) << np.clip(8 - bits, 0, 8)).astype(np.uint8)
    return images & torch.as_tensor(masks, device=images.device).view(-1, 1, 1, 1)


def solarize(images, thresholds):
    """Invert the values at or above the threshold (compared in float32, as torchvision's uint8 >= float)."""
    return torch.where(images >= per_sample(thresholds, images), images.bitwise_not(), images)


def inverse_affine_matrices(angle, translate_x, translate_y, shear_x, shear_y, center_x, center_y):
    """torchvision's _get_inverse_affine_matrix at scale 1 for each sample (degrees; the centre relative to the
    image centre): (N, 2, 3) float64 from the same float64 operations in the same order."""
    rotation, shear_x, shear_y = np.radians(angle), np.radians(shear_x), np.radians(shear_y)
    cos_shear_y, tan_shear_x = np.cos(shear_y), np.tan(shear_x)
    a = np.cos(rotation - shear_y) / cos_shear_y
    b = -(a * tan_shear_x + np.sin(rotation))
    c = np.sin(rotation - shear_y) / cos_shear_y
    d = np.cos(rotation) - c * tan_shear_x
    moved_x, moved_y = center_x + translate_x, center_y + translate_y
    offset_x = center_x - d * moved_x - -b * moved_y
    offset_y = center_y - -c * moved_x - a * moved_y
    rows = np.broadcast_arrays(d, -b, offset_x, -c, a, offset_y)
    return np.stack(rows, axis=-1).reshape(-1, 2, 3)


def warp(images, matrices, mode):
    """Sample each image at its inverse-affine map of the output pixel centres (torchvision's _affine_grid:
    coordinates relative to the image centre, normalised by half the size), zeros outside, rounded to uint8."""
    count, _, height, width = images.shape
    device = images.device
    theta = float32_tensor(matrices, device)
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)
    centres = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                           torch.ones(height, width, device=device)], dim=-1).view(1, height * width, 3)
    half_size = torch.tensor([0.5 * width, 0.5 * height], device=device)
    grid = centres.expand(count, -1, -1).bmm(theta.transpose(1, 2) / half_size).view(count, height, width, 2)
    sampled = nnf.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return sampled.round_().to(torch.uint8)


def rotate(images, angles, mode):
    """F.rotate(angle) per sample (counter-clockwise degrees, about the centre, same size)."""
    return warp(images, inverse_affine_matrices(-np.mod(angles, 360.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), mode)


def shear(images, magnitudes, axis, mode):
    """The auto-augment shear: F.affine(shear=degrees(atan(m)) along `axis`, center=[0, 0], the top-left
    corner), i.e. x' = x + m·y (or y' = y + m·x)."""
    degrees = np.degrees(np.arctan(magnitudes))
    shears = (degrees, 0.0) if axis == 0 else (0.0, degrees)
    height, width = images.shape[-2:]
    return warp(images, inverse_affine_matrices(0.0, 0.0, 0.0, *shears, -0.5 * width, -0.5 * height), mode)


def translate(images, magnitudes, axis, mode):
    """The auto-augment translation: F.affine(translate=int(m) pixels along `axis`)."""
    pixels = np.trunc(magnitudes)
    shifts = (pixels, 0.0) if axis == 0 else (0.0, pixels)
    return warp(images, inverse_affine_matrices(0.0, *shifts, 0.0, 0.0, 0.0, 0.0), mode)


# torchvision's _apply_image_or_video_transform, batched: name -> f(images, magnitudes, interpolation); None: as is.
OPERATIONS = {
    "Identity": None,
    "ShearX": lambda images, m, mode: shear(images, m, 0, mode),
    "ShearY": lambda images, m, mode: shear(images, m, 1, mode),
    "TranslateX": lambda images, m, mode: translate(images, m, 0, mode),
    "TranslateY": lambda images, m, mode: translate(images, m, 1, mode),
    "Rotate": rotate,
    "Brightness": lambda images, m, mode: adjust_brightness(images, 1.0 + m),
    "Color": lambda images, m, mode: adjust_saturation(images, 1.0 + m),
    "Contrast": lambda images, m, mode: adjust_contrast(images, 1.0 + m),
    "Sharpness": lambda images, m, mode: adjust_sharpness(images, 1.0 + m),
    "Posterize": lambda images, m, mode: posterize(images, np.trunc(m)),
    "Solarize": lambda images, m, mode: solarize(images, 255.0 * m),
    "AutoContrast": lambda images, m, mode: F.autocontrast(images),
    "Equalize": lambda images, m, mode: F.equalize(images),
    "Invert": lambda images, m, mode: F.invert(images),
}
JITTER_OPERATIONS = (  # ColorJitter's fn ids 0, 1, 2 (3, hue, is off)
    lambda images, factors, mode: adjust_brightness(images, factors),
    lambda images, factors, mode: adjust_contrast(images, factors),
    lambda images, factors, mode: adjust_saturation(images, factors),
)


def apply_grouped(images, codes, values, functions, mode=None):
    """Sample i gets functions[codes[i]] with values[i] (code -1 or function None: unchanged), one call per
    function on the samples that drew it: the batch is gathered once in code order, so each call takes a
    contiguous slice, and the outputs are put back in the batch's order once."""
    if len(codes) == 0:
        return images
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    if len(starts) == 1:
        function = functions[codes[0]] if codes[0] >= 0 else None
        return images if function is None else function(images, values, mode)
    gathered = images.index_select(0, torch.as_tensor(order, device=images.device))
    pieces = []
    for start, end in zip(starts, ends):
        function = functions[sorted_codes[start]] if sorted_codes[start] >= 0 else None
        piece = gathered[start:end]
        pieces.append(piece if function is None else function(piece, values[order[start:end]], mode))
    return torch.cat(pieces).index_select(0, torch.as_tensor(np.argsort(order), device=images.device))


def signed_magnitudes(space, ops, bins, negate):
    _, magnitudes, signed = space
    chosen = magnitudes[ops, bins]
    return np.where(signed[ops] & negate, -chosen, chosen)


def color_jitter(images, choices):
    """ColorJitter: brightness, contrast and saturation, each with its factor, in the sample's order."""
    factors = choices["factors"]
    rows = np.arange(len(factors))
    for fn_ids in choices["order"].T:
        images = apply_grouped(images, fn_ids, factors[rows, fn_ids], JITTER_OPERATIONS)
    return images


def auto_augment(images, policy, choices):
    """TrivialAugment-wide, RandAugment or AutoAugment: a few steps, each one operation (or none) per sample."""
    transform = transform_for(policy)
    space = operation_space(transform, *images.shape[-2:])
    functions = [OPERATIONS[name] for name in space[0]]
    mode = interpolation_mode(transform)
    if policy.auto_augment == "ta_wide":
        ops = choices["op"]
        return apply_grouped(images, ops, signed_magnitudes(space, ops, choices["bin"], choices["negate"]),
                             functions, mode)
    if policy.auto_augment == "ra":
        for ops, negate in zip(choices["op"].T, choices["negate"].T):
            images = apply_grouped(images, ops, signed_magnitudes(space, ops, policy.ra_magnitude, negate),
                                   functions, mode)
        return images
    sub_policies = transform._policies
    for step in range(2):
        names = [pair[step][0] for pair in sub_policies]
        bins = np.array([pair[step][2] or 0 for pair in sub_policies])[choices["sub_policy"]]
        ops = np.array([space[0].index(name) for name in names])[choices["sub_policy"]]
        magnitudes = signed_magnitudes(space, ops, bins, choices["negate"][:, step])
        images = apply_grouped(images, np.where(choices["apply"][:, step], ops, -1), magnitudes, functions, mode)
    return images


def augmix(images, policy, choices):
    """AugMix: the image weighted by mix[:, 0] plus `width` chains of 1 to 3 operations, chain k weighted by
    chain_weights[:, k]·mix[:, 1], summed in float32 and truncated to uint8, as torchvision's."""
    transform = transform_for(policy)
    space = operation_space(transform, *images.shape[-2:])
    functions = [OPERATIONS[name] for name in space[0]]
    mode = interpolation_mode(transform)
    mix = float32_tensor(choices["mix"], images.device)
    weights = float32_tensor(choices["chain_weights"], images.device) * mix[:, 1:]
    mixed = images.float().mul_(mix[:, 0].view(-1, 1, 1, 1))
    for chain in range(transform.mixture_width):
        augmented = images
        for step in range(AUGMIX_MAX_DEPTH):
            ops, bins, negate = (choices[name][:, chain, step] for name in ("op", "bin", "negate"))
            magnitudes = signed_magnitudes(space, ops, bins, negate)
            augmented = apply_grouped(augmented, np.where(choices["depth"][:, chain] > step, ops, -1), magnitudes,
                                      functions, mode)
        mixed.add_(augmented.float().mul_(weights[:, chain].view(-1, 1, 1, 1)))
    return mixed.to(torch.uint8)


def augment_batch(images, policy, seed, epochs, keys):
    """images: uint8 (B, 3, H, W) on any device; epochs: one for all or (B,); keys: (B,) sample keys. Colour
    jitter (if on), then the auto-augment policy (if on), each sample as drawn for its (seed, epoch, key).
    Returns a uint8 batch of the same shape (`images` itself when the policy does nothing)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_batch takes a uint8 (B, 3, H, W) batch, not {images.dtype} {tuple(images.shape)}")
    if not policy.active:
        return images
    choices = draw_choices(policy, seed, epochs, keys)
    if policy.color_jitter > 0:
        images = color_jitter(images, choices)
    if policy.auto_augment == "augmix":
        return augmix(images, policy, choices)
    if policy.auto_augment is not None:
        return auto_augment(images, policy, choices)
    return images


# ------------------------------------------------------------------ random erasing

def erase_boxes(probability, seed, epochs, keys, height, width):
    """RandomErasing.make_params per sample: (B, 4) int64 (top, left, box height, box width) and (B,) erased
    flags: erased with `probability`, when one of ERASE_TRIES (area fraction, log aspect) draws fits."""
    keys = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    epochs = np.broadcast_to(np.asarray(epochs, dtype=np.uint64), keys.shape)
    draws = uniforms(sample_keys(seed, epochs, keys) ^ ERASE_SALT, 1 + 2 * ERASE_TRIES + 2)
    area = height * width
    erase_area = area * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * draws[:, 1:1 + 2 * ERASE_TRIES:2])
    log_low, log_high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * draws[:, 2:2 + 2 * ERASE_TRIES:2])
    box_heights = np.round(np.sqrt(erase_area * aspect)).astype(np.int64)  # half to even, as Python's round
    box_widths = np.round(np.sqrt(erase_area / aspect)).astype(np.int64)
    fits = (box_heights < height) & (box_widths < width)
    rows, first = np.arange(len(keys)), fits.argmax(axis=1)
    box_heights, box_widths = box_heights[rows, first], box_widths[rows, first]
    top = np.floor(draws[:, -2] * (height - box_heights + 1)).astype(np.int64)
    left = np.floor(draws[:, -1] * (width - box_widths + 1)).astype(np.int64)
    erased = (draws[:, 0] < probability) & fits.any(axis=1)
    return np.stack([top, left, box_heights, box_widths], axis=1), erased


def erase_batch(images, probability, seed, epochs, keys, value=0.0):
    """Random erasing (torchvision's RandomErasing, value `value`) on a float batch (B, C, H, W), in
    place: the erased samples only are gathered, filled under one mask built from their boxes, and
    put back (with probability 0.1 most of a batch is not touched at all). Returns the batch."""
    height, width = images.shape[-2:]
    boxes, erased = erase_boxes(probability, seed, epochs, keys, height, width)
    chosen = np.flatnonzero(erased)
    if len(chosen) == 0:
        return images
    rows_of = torch.as_tensor(chosen, device=images.device)
    top, left, box_height, box_width = (per_sample_int(column, images) for column in boxes[chosen].T)
    rows = torch.arange(height, device=images.device).view(1, 1, height, 1)
    columns = torch.arange(width, device=images.device).view(1, 1, 1, width)
    inside = (rows >= top) & (rows < top + box_height) & (columns >= left) & (columns < left + box_width)
    images[rows_of] = images[rows_of].masked_fill_(inside, value)
    return images


def per_sample_int(values, images):
    return torch.as_tensor(values, device=images.device).view(-1, 1, 1, 1)
