"""Data: ImageFolder train/val sets, per-sample deterministic augmentation, loaders, the digits demo.

Every random choice for training sample `i` in epoch `e` is a function of (seed, e, i) (augment.py),
so augmentation does not depend on the number of workers or processes, or on whether the run was
restarted. Images leave the workers as uint8 tensors; normalisation happens
on the training device (`normalize`), which keeps worker output and host-to-device copies 4x
smaller than float32.
"""
import copy
import functools
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from config import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size  # noqa: F401 (the names data code imports)
from core.errors import DataError
from engine.distributed import validation_shard
from inputs.augment import draw_crops
from inputs.folders import class_folders, find_files
from inputs.label_files import LabelFile, run_data
from inputs.mixing import Mixing
from inputs.policies import Policy, augment_batch
from inputs.sampling import GlobalOrderSampler, sample_weights

# Up to this aspect ratio the evaluation resize is torchvision's, pixel for pixel. Beyond it only
# the central band that any center crop keeps is resized: memory grows with the resized image, and
# a 97-byte 1 x 6000 px PNG would take 1.5 GB (a 1 x 600,000 px one ~118 GB).
BAND_ASPECT = 8


# What PIL raises for a file that is not a readable image.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def header_size(path):
    """An image's (width, height) from its header, without decoding it."""
    with Image.open(path) as header:
        return header.size


def open_resized(path, short_side, fast_decode=True):
    """Decode an image (at a reduced JPEG scale when that is still large enough) and resize its
    shorter side to `short_side`: the first step of the evaluation transform (see resize_shorter_side)."""
    width, height = header_size(path)
    short = min(width, height)
    min_size = (width * short_side / short, height * short_side / short) if fast_decode else None
    return resize_shorter_side(open_rgb(path, min_size), short_side)


def resize_shorter_side(image, short_side):
    """torchvision's resize of the shorter side to `short_side` (bilinear, antialiased).

    Beyond BAND_ASPECT the long side keeps only its central short_side to short_side + 3 pixels,
    trimmed by one even number at both ends: every center crop of at most short_side (load_eval's,
    the image cache's window) then lands where it did on the whole image, on pixels within one
    level of it (PIL's box resize rounds its coefficients a little differently)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    resized_long = int(short_side * long / short)  # torchvision's rounding
    if resized_long <= BAND_ASPECT * short_side:
        return TF.resize(image, short_side, interpolation=InterpolationMode.BILINEAR)
    trim = 2 * ((resized_long - short_side) // 4)
    scale = long / resized_long  # source pixels per resized pixel
    start, end = trim * scale, (resized_long - trim) * scale
    # Whole source pixels around the band (the filter's reach and one more) are cut out first: PIL
    # takes the box in float32, too coarse for the position of a band far along a long axis.
    margin = max(scale, 1.0) + 1
    first, last = max(0, math.floor(start - margin)), min(long, math.ceil(end + margin))
    kept = resized_long - 2 * trim
    if width > height:
        cut, box, size = (first, 0, last, height), (start - first, 0, end - first, height), (kept, short_side)
    else:
        cut, box, size = (0, first, width, last), (0, start - first, width, end - first), (short_side, kept)
    return image.crop(cut).resize(size, Image.BILINEAR, box=box)


def load_eval(path, image_size, resize_size=None, fast_decode=True):
    """The evaluation transform (torchvision's resize + center crop), used by validation and predict.py:
    the shorter side resized to resize_size (default image_size / 0.875), a center crop to image_size."""
    return TF.center_crop(open_resized(path, resize_size or eval_resize_size(image_size), fast_decode), image_size)


def open_rgb(path, min_size=None):
    """Decode an image as RGB (to_rgb). With `min_size` (w, h), JPEGs decode at a reduced scale
    (libjpeg DCT scaling via PIL's draft mode) that is still at least that large."""
    with Image.open(path) as img:
        if min_size is not None and img.format == "JPEG":
            img.draft("RGB", (max(1, math.ceil(min_size[0])), max(1, math.ceil(min_size[1]))))
        return to_rgb(img)


# PIL's modes of more than 8 bits per pixel: 16-bit grayscale (PNG, TIFF: I;16*; PGM: I, scaled by
# PIL to 0..65535), 32-bit integer (I) and float (F) TIFFs. PIL's convert("RGB") clips them at 255,
# which turns a 16-bit image white. (16-bit RGB and gray+alpha PNGs open as RGB, RGBA: 8 bits already.)
WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
FLOAT_TO_UINT8 = np.float32(255.999)  # torchvision's to_dtype(uint8, scale=True) of a float image


def to_rgb(image):
    """A PIL image as RGB. Wide modes are scaled to 8 bits as torchvision's decoder and its
    to_dtype(uint8, scale=True) do (--decode_on_device): integers are 16-bit (0..65535) and keep
    their high byte, floats are 0..1 and multiplied by 255.999. Values outside those ranges are
    refused (a ValueError, as for an unreadable file): no scale for them would be right."""
    if image.mode not in WIDE_MODES:  # 8-bit images: PIL's conversion, nothing else to pay
        return image.convert("RGB")
    pixels = np.asarray(image)
    if image.mode == "F":
        low, high = pixels.min(), pixels.max()
        if not (0 <= low and high <= 1):  # NaN fails too
            raise ValueError(f"a float image (PIL mode F) with values {low:g} to {high:g}; only 0 to 1 can be "
                             "scaled to 8 bits: rescale it to 0-1 or save it as 8- or 16-bit integers")
        eight_bit = (pixels * FLOAT_TO_UINT8).astype(np.uint8)
    else:
        if image.mode == "I" and not (0 <= pixels.min() and pixels.max() <= 65535):
            raise ValueError(f"a 32-bit integer image (PIL mode I) with values {pixels.min()} to {pixels.max()}; "
                             "only 16-bit values (0 to 65535) can be scaled to 8 bits: rescale it or save it "
                             "as 8- or 16-bit")
        eight_bit = (pixels >> 8).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def resized_crop(image, box, size, flip, full_size=None):
    """Crop `box` (left, top, right, bottom) out of an image, resize it to size x size with PIL's
    antialiased bilinear filter and mirror it when `flip`: the training augmentation of the file
    path and of the cache's CPU readers. Returns a PIL image.

    `image` is a PIL image, or an HWC uint8 array (a stored cache image), which is cropped by
    slicing so that only the box's pixels are converted. `box` is in the coordinates of an image of
    `full_size` (default: the image's own size). At full size the crop comes first, as in
    torchvision, so the filter sees only the crop's pixels; an image decoded at a reduced JPEG
    scale is resized from the same box in its own, fractional, coordinates."""
    left, top, right, bottom = box
    if isinstance(image, np.ndarray):
        resized = Image.fromarray(image[top:bottom, left:right]).resize((size, size), Image.BILINEAR)
    elif full_size is None or image.size == full_size:
        resized = image.crop(box).resize((size, size), Image.BILINEAR)
    else:
        sx, sy = image.width / full_size[0], image.height / full_size[1]
        scaled_box = (left * sx, top * sy, right * sx, bottom * sy)
        resized = image.resize((size, size), Image.BILINEAR, box=scaled_box)
    return resized.transpose(Image.FLIP_LEFT_RIGHT) if flip else resized


PLANES_BY_PIL = 128 * 128  # pixels from which PIL's per-plane packing beats one numpy transpose


def planar(image, out=None):
    """An RGB PIL image as a (3, H, W) uint8 array (into `out` when given). From PLANES_BY_PIL
    pixels each plane is packed by PIL itself, faster than a numpy transpose for large crops;
    smaller images are transposed by numpy, whose one call costs less than three (measured by
    bench/input_pipeline.py --profile, BENCHMARKS.md)."""
    if out is None:
        out = np.empty((3, image.height, image.width), dtype=np.uint8)
    if image.width * image.height < PLANES_BY_PIL:
        out[:] = np.asarray(image).transpose(2, 0, 1)
        return out
    for channel, band in enumerate("RGB"):
        out[channel] = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(image.height, image.width)
    return out


class AugmentedImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder returning (uint8 CHW tensor, label, index).

    Training items are addressed by (epoch, sample key) and get a random resized crop and a
    horizontal flip drawn for (seed, epoch, key) (augment.py), then the per-sample `policy`
    (inputs/policies.py) when `policy_in_workers`; the key is the image's index, or index +
    copy × dataset size for a copy of repeated augmentation (sampling.py). Eval items are
    addressed by index and get resize + center crop.
    """

    def __init__(self, root, image_size, train, seed=0, min_crop_scale=0.08, hflip_prob=0.5,
                 fast_decode=True, skip_bad_images=False, augment=True, resize_size=None, policy=None):
        self.train = train  # read by find_classes, which ImageFolder's __init__ calls
        super().__init__(root)
        self.augment = augment
        self.skip_bad_images = skip_bad_images
        self.image_size = image_size
        self.resize_size = resize_size or eval_resize_size(image_size)
        self.seed = seed
        self.crop_scale = (min_crop_scale, 1.0)
        self.hflip_prob = hflip_prob
        self.fast_decode = fast_decode
        self.policy = policy  # applied here on the file path; None where the batch stage applies it

    def find_classes(self, directory):
        """The same classes check_data_folders reports: hidden folders (.ipynb_checkpoints) are not classes."""
        classes = class_folders(directory, "train" if self.train else "val")
        return classes, {name: label for label, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """ImageFolder's (path, label) list in its order (ImageFolder's arguments; its extensions
        are IMG_EXTENSIONS), walked by folders.find_files: no link loops, hidden files or FIFOs.
        Warnings go out once, from the first process."""
        samples, warnings, empty = [], [], []
        for name in sorted(class_to_idx):
            paths, skipped = find_files(os.path.join(directory, name), IMG_EXTENSIONS)
            samples += [(path, class_to_idx[name]) for path in paths]
            warnings += skipped
            empty += [] if paths else [name]
        if os.environ.get("RANK", "0") == "0":
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        if empty:
            raise DataError(f"no image files in the class folder(s) {', '.join(empty[:5])} of {directory} "
                            f"(supported extensions: {', '.join(IMG_EXTENSIONS)})")
        return samples

    def __getitem__(self, key):
        """(image, label, key); None for an unreadable file when skip_bad_images is set."""
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        """The items of a whole batch (torch's loader workers fetch through this method): training
        crops are drawn for all of them in one call (augment.draw_crops), and the policy runs on
        the batch of crops (policies.augment_batch)."""
        if not self.train:
            return [self.item(index, index, self.load_eval) for index in keys]
        sample_keys = [key[1] for key in keys]
        indices = [key % len(self.samples) for key in sample_keys]
        if not self.augment:
            return [self.item(index, key, self.load_eval) for index, key in zip(indices, sample_keys)]
        sizes = [self.readable(self.samples[index][0], header_size) for index in indices]
        drawn = [row for row, size in enumerate(sizes) if size is not None]
        epochs, drawn_keys = [keys[row][0] for row in drawn], [sample_keys[row] for row in drawn]
        boxes, flips = draw_crops(self.seed, epochs, drawn_keys, [sizes[row][0] for row in drawn],
                                  [sizes[row][1] for row in drawn], self.crop_scale, self.hflip_prob)
        items = [None] * len(keys)
        for row, box, flip in zip(drawn, boxes.tolist(), flips.tolist()):
            items[row] = self.item(indices[row], sample_keys[row],
                                   functools.partial(self.load_train, size=sizes[row], box=box, flip=flip))
        if self.policy is not None and self.policy.active:
            self.apply_policy(items, [key[0] for key in keys])
        return items

    def apply_policy(self, items, epochs):
        """The per-sample policy on this batch's readable crops, as one batch, in place."""
        rows = [row for row, item in enumerate(items) if item is not None]
        if rows:
            augmented = augment_batch(torch.stack([items[row][0] for row in rows]), self.policy, self.seed,
                                      [epochs[row] for row in rows], [items[row][2] for row in rows])
            for row, image in zip(rows, augmented):
                items[row] = (image, *items[row][1:])

    def load_eval(self, path):
        return load_eval(path, self.image_size, self.resize_size, self.fast_decode)

    def item(self, index, key, load):
        image = self.readable(self.samples[index][0], load)
        target = self.samples[index][1]
        target = torch.tensor(target) if isinstance(target, tuple) else target  # a multi-label row
        return None if image is None else (torch.from_numpy(planar(image)), target, key)

    def readable(self, path, load):
        """load(path); an unreadable file raises a DataError naming it, or with skip_bad_images
        gives None after a warning."""
        try:
            return load(path)
        except UNREADABLE as exc:
            if not self.skip_bad_images:
                raise DataError(f"cannot read image {path} ({exc}); fix or remove it, or pass "
                                "--skip_bad_images to skip unreadable files") from None
            print(f"warning: skipping unreadable image {path} ({exc})", file=sys.stderr, flush=True)
            return None

    def load_train(self, path, size, box, flip):
        """The crop `box` (left, top, width, height) of an image of `size` (its header's), resized and flipped."""
        (width, height), (left, top, w, h) = size, box
        # Decode only as many pixels as the crop needs at the output size.
        min_size = (width * self.image_size / w, height * self.image_size / h) if self.fast_decode else None
        return resized_crop(open_rgb(path, min_size), (left, top, left + w, top + h), self.image_size, flip,
                            full_size=(width, height))


class AugmentedLabelFile(AugmentedImageFolder):
    """AugmentedImageFolder over the images of a label file (inputs/label_files.py) instead of
    class folders: the same samples, targets, classes, class_to_idx and root (the image root), so
    every input path (files, image cache, --decode_on_device) reads it unchanged. `classes` are the
    run's (a val file may lack some of them)."""

    def __init__(self, label_file, classes, image_size, train, **options):
        self.label_file, self.run_classes = label_file, classes  # read by ImageFolder's __init__
        super().__init__(label_file.root, image_size, train, **options)

    def find_classes(self, directory):
        return list(self.run_classes), {name: label for label, name in enumerate(self.run_classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """The label file's checked samples, already in ImageFolder's order. A multi-label sample's
        target is its row of 0/1 per class (a tuple, which the items give as a float tensor)."""
        if self.label_file.samples and isinstance(self.label_file.samples[0][1], tuple):
            return [(path, tuple(float(name in names) for name in class_to_idx)) for path, names
                    in self.label_file.samples]
        return [(path, class_to_idx[name]) for path, name in self.label_file.samples]


def image_set(source, classes, image_size, train, **options):
    """The dataset of a run_data source: a label file, or a class-folder root."""
    if isinstance(source, LabelFile):
        return AugmentedLabelFile(source, classes, image_size, train, **options)
    return AugmentedImageFolder(source, image_size, train, **options)


def build_datasets(args, world_size=1):
    """The train and val sets and the class names, from class folders or label files
    (label_files.run_data). Training crops are --train_crop_size, evaluation crops --image_size
    (the settled --val_crop_size) of --resize_size. On the file path the loader workers apply the
    per-sample policy; the other paths' batch stage does."""
    data = run_data(args)
    same_size = args.train_crop_size == args.image_size
    files = not (args.cache_images or args.decode_on_device)
    train_set = image_set(data.train, data.classes, args.train_crop_size, train=True, seed=args.seed,
                          min_crop_scale=args.min_crop_scale, hflip_prob=args.hflip_prob,
                          skip_bad_images=args.skip_bad_images, augment=not args.no_augmentation,
                          resize_size=args.resize_size if same_size else None,
                          policy=augmentation_policy(args) if files else None)
    val_set = image_set(data.val, data.classes, args.image_size, train=False, skip_bad_images=args.skip_bad_images,
                        resize_size=args.resize_size)
    if args.overfit_batches:
        train_set, val_set = overfit_subset(train_set, args.overfit_batches * args.batch_size * world_size, args.seed)
    return train_set, val_set, data.classes


def overfit_subset(train_set, size, seed):
    """A fixed random subset of the training images, unaugmented, used for both training and
    validation: a model that cannot reach 100% on it has a bug (Lightning's overfit_batches)."""
    chosen = sorted(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:size].tolist())
    train_set.samples = [train_set.samples[i] for i in chosen]
    train_set.targets = [train_set.targets[i] for i in chosen]
    train_set.augment = False
    val_set = copy.copy(train_set)
    val_set.train = False
    return train_set, val_set


def collate_readable(batch):
    """Stack the readable samples; report how many were skipped as unreadable."""
    readable = [sample for sample in batch if sample is not None]
    if not readable:
        raise DataError("every image of a batch was unreadable; check the dataset")
    images, labels, indices = default_collate(readable)
    return images, labels, indices, len(batch) - len(readable)


def leave_process_group(_worker_id):
    """Workers move to their own session, so a terminal's Ctrl-C or a `kill` of the job's process
    group reaches only the training process, which stops at a step boundary after a clean save
    and then shuts its workers down itself. (Workers also exit when their parent dies.)"""
    os.setsid()


def augmentation_policy(args):
    """The per-sample policy of the run's flags (inputs/policies.py), None when there is none."""
    policy = Policy(args.auto_augment, args.ra_magnitude, args.ra_num_ops, args.augmix_severity, args.color_jitter)
    return policy if policy.active and not args.no_augmentation else None


def mixing_of(args):
    """The run's mixup/cutmix (inputs/mixing.py), None without."""
    mixing = Mixing(args.mixup_alpha, args.cutmix_alpha, args.mix_prob, args.mix_switch_prob, args.mix_off_epoch)
    return mixing if mixing.configured and not args.no_augmentation else None


def sequence_shape(args, labels):
    """The global sequence's shape of the run's flags (sampling.py) for a training set of `labels`:
    pairs when mixing, --ra_reps copies, --sampling's weights."""
    return dict(unit=2 if mixing_of(args) else 1, repeats=args.ra_reps, weights=sample_weights(labels, args.sampling))


def train_sampler(train_set, batch_size, rank, world_size, seed, unit=1, repeats=1, weights=None):
    """This rank's share of each epoch's global sample sequence (sampling.py; `unit`, `repeats` and
    `weights`: sequence_shape); refuses a training set smaller than one batch on every rank."""
    return GlobalOrderSampler(len(train_set), batch_size, rank, world_size, seed, unit=unit, repeats=repeats,
                              weights=weights)


def build_loaders(train_set, val_set, batch_size, num_workers, rank, world_size, seed, pin_memory, unit=1, repeats=1,
                  weights=None):
    """Train loader over the global-order sampler; val loader over this rank's unpadded shard."""
    sampler = train_sampler(train_set, batch_size, rank, world_size, seed, unit, repeats, weights)
    # Own generators: creating a loader iterator then draws nothing from the global torch RNG,
    # whose stream (dropout) must continue exactly across a mid-epoch resume.
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0, collate_fn=collate_readable,
                  worker_init_fn=leave_process_group if num_workers > 0 else None)
    # The sampler yields whole batches (only a resumed epoch on another layout may end short).
    train_loader = DataLoader(train_set, sampler=sampler,
                              generator=torch.Generator().manual_seed(seed), **common)
    val_loader = DataLoader(Subset(val_set, validation_shard(len(val_set), rank, world_size)), shuffle=False,
                            generator=torch.Generator().manual_seed(seed), **common)
    return train_loader, val_loader


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32):
    """uint8 NCHW -> normalised float, on whichever device the batch already is; mean and std are
    per channel, of 0-1 pixels (the run's --mean/--std)."""
    scale, shift = normalization_constants(images_uint8.device, dtype, tuple(mean), tuple(std))
    return torch.addcmul(shift, images_uint8.to(dtype), scale)  # (x - 255 mean) / (255 std), one kernel


@functools.lru_cache(maxsize=8)
def normalization_constants(device, dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return (1 / std).to(device, dtype), (-mean / std).to(device, dtype)


def prepare_digits_demo(root, val_fraction=0.2):
    """Write scikit-learn's UCI digits (1,797 8x8 images, 10 classes) as an ImageFolder tree of
    PNGs under root/{train,val}/<digit>/, once. A deterministic stratified split; written to a
    temporary folder and renamed, so concurrent ranks never see a half-written tree."""
    if os.path.isdir(os.path.join(root, "val")):
        return os.path.join(root, "train"), os.path.join(root, "val")
    from sklearn.datasets import load_digits

    digits = load_digits()
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    try:
        write_digits(digits, staging, val_fraction)
        os.rename(staging, root)
    except OSError as exc:
        if not os.path.isdir(os.path.join(root, "val")):  # else another process finished first
            raise DataError(f"cannot write the digits demo to {root} ({exc.strerror or exc})") from None
    finally:  # gone once renamed; after a failure or a stop signal (distributed.Stopped) nothing is left
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(root, "train"), os.path.join(root, "val")


def write_digits(digits, root, val_fraction):
    rng = np.random.RandomState(0)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_val = int(round(len(indices) * val_fraction))
        for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
