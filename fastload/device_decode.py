"""--decode_on_device: the image files decoded in batches on the training device, with no cache:
for GPUs whose host cannot decode JPEGs as fast as they train (BENCHMARKS.md, "Input bytes per
second per node, by input path").

Reader threads read each batch's file bytes (readahead.read_ahead, as for the image cache: batches
read ahead, staged on a side CUDA stream, handed over in order). On a GPU the whole batch's JPEGs are
decoded in one torchvision.io.decode_jpeg call (nvjpeg), then each image is cropped there with
the file path's per-sample box and flip (augment.draw_crops for the whole batch, drawn
on the decoded sizes, as the file path draws it on the header's) and resized with torchvision's
antialiased bilinear filter (readahead.crop_on_device); evaluation resizes the shorter side to --resize_size and
center-crops (for images beyond dataset.BAND_ASPECT only the central band, as the file path does).
Files that are not JPEGs are decoded by the reader threads on the CPU: PNG and WebP by
torchvision, the formats it lacks (BMP, TIFF, PPM, ...) by the file path's decoder (PIL).
Without CUDA the reader threads decode (libjpeg-turbo) and crop: the same batches, for tests and
small machines, though DataLoader workers are usually faster on a CPU, so it stays opt-in.
"""
import math

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import functional as TF
from torchvision.transforms.v2.functional import to_dtype

from core.errors import DataError
from dataset import BAND_ASPECT, UNREADABLE, open_rgb, planar, resize_shorter_side, sequence_shape, train_sampler
from engine.distributed import validation_shard
from fastload.readahead import crop_on_device, key_batches, read_ahead
from inputs.augment import draw_crops

JPEG_START = (0xFF, 0xD8)


class DeviceDecodedFiles:
    """Batches of an AugmentedImageFolder's files, decoded and cropped on `device`, read ahead
    (readahead.read_ahead), in the form and order of the other loaders: (uint8 NCHW images,
    labels, indices, skipped=0)."""

    def __init__(self, dataset, sampler, batch_size, train, device):
        self.dataset, self.labels, self.sampler = dataset, torch.as_tensor(dataset.targets), sampler
        self.batch_size, self.train, self.device = batch_size, train, device

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        keys = list(iter(self.sampler))
        yield from read_ahead(self.read_batch, key_batches(keys, self.batch_size, len(self)), self.device,
                              self.decode_read)

    def read_batch(self, chunk):
        """The batch's files: JPEG bytes, or pixels decoded here for other formats. On a CPU they
        are decoded and cropped here too (the reader threads release the GIL while they decode)."""
        keys = torch.tensor([key[1] if self.train else key for key in chunk])
        epochs = [key[0] for key in chunk] if self.train else [None] * len(chunk)
        indices = keys % len(self.labels)  # a copy of repeated augmentation reads its image (sampling.py)
        files = [self.read(index) for index in indices.tolist()]
        labels = self.labels[indices]
        if self.device.type != "cuda":
            return self.decode_and_crop(files, epochs, keys), labels, keys
        return (files, epochs), labels.pin_memory(), keys

    def decode_read(self, read, keys):
        """On a GPU: a read batch decoded and cropped there."""
        files, epochs = read
        return self.decode_and_crop(files, epochs, keys)

    def read(self, index):
        path = self.dataset.samples[index][0]
        try:
            data = read_file(path)
        except (OSError, RuntimeError) as exc:
            raise unreadable(path, exc) from None
        if tuple(data[:2].tolist()) == JPEG_START:
            return data
        try:
            # 16-bit PNGs decode to uint16: scaled to 8 bits (the high byte), as dataset.to_rgb scales them
            return to_dtype(decode_image(data, mode=ImageReadMode.RGB), torch.uint8, scale=True)
        except RuntimeError:  # a format torchvision lacks (BMP, TIFF, PPM), or a broken file
            return self.decode_on_host(index)

    def decode_on_host(self, index):
        """The file path's decoder (PIL) for an image that torchvision's cannot decode; a file that
        PIL cannot read either is named."""
        path = self.dataset.samples[index][0]
        try:
            return torch.from_numpy(planar(open_rgb(path)))
        except UNREADABLE as exc:
            raise unreadable(path, exc) from None

    def decode_and_crop(self, files, epochs, keys):
        """Decode the batch's JPEGs in one call on the device, then crop each image (drawn for the
        samples' keys)."""
        indices = keys % len(self.labels)
        jpegs = [row for row, data in enumerate(files) if data.dim() == 1]
        decoded = list(files)
        if jpegs:  # decode_jpeg refuses an empty list (a batch of PNGs)
            try:
                images = decode_jpeg([files[row] for row in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                images = [self.decode_one(files[row], indices[row].item()) for row in jpegs]
            for row, image in zip(jpegs, images):
                decoded[row] = image
        decoded = [image.to(self.device, non_blocking=True) for image in decoded]
        dataset = self.dataset
        if not (self.train and dataset.augment):  # the evaluation transform
            return crop_on_device([self.resize_shorter_side(image) for image in decoded], None, None,
                                  dataset.image_size)
        # On the decoded sizes, as the file path draws on the header's.
        heights, widths = zip(*(image.shape[-2:] for image in decoded))
        boxes, flips = draw_crops(dataset.seed, epochs, keys, widths, heights, dataset.crop_scale,
                                  dataset.hflip_prob)
        return crop_on_device(decoded, boxes, flips, dataset.image_size)

    def decode_one(self, data, index):
        """One JPEG of a batch that failed to decode: by the file path's decoder if the device's
        refuses it, else the file that is broken, named."""
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return self.decode_on_host(index)

    def resize_shorter_side(self, image):
        """The file path's evaluation resize (dataset.resize_shorter_side): torchvision's, on the
        device; beyond BAND_ASPECT only the central band the center crop keeps, by PIL on the host as
        the file path does it (a 1 x 6000 px image resized whole is 256 x 1,536,000 px)."""
        short_side = self.dataset.resize_size
        short, long = sorted(image.shape[-2:])
        if int(short_side * long / short) <= BAND_ASPECT * short_side:
            return TF.resize(image, short_side, antialias=True)
        band = resize_shorter_side(TF.to_pil_image(image.cpu()), short_side)
        return TF.pil_to_tensor(band).to(image.device)


def unreadable(path, exc):
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"cannot read image {path} ({message}); fix or remove it")


def build_device_decoded_loaders(train_set, val_set, args, ctx):
    """Train and val loaders that decode on ctx.device (--decode_on_device)."""
    sampler = train_sampler(train_set, args.batch_size, ctx.rank, ctx.world_size, args.seed,
                            **sequence_shape(args, train_set.targets))
    train_loader = DeviceDecodedFiles(train_set, sampler, args.batch_size, True, ctx.device)
    val_shard = validation_shard(len(val_set), ctx.rank, ctx.world_size)
    return train_loader, DeviceDecodedFiles(val_set, val_shard, args.batch_size, False, ctx.device)
