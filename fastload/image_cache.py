"""--cache_images: every image decoded once into a uint8 memory-mapped array on disk, then served
in whole batches with random-resized-crop and flip done on tensors (on the GPU when there is one).

Each image is stored resized (shorter side) and center-cropped to S x S, S = --resize_size:
exactly the evaluation transform's intermediate, so evaluation from the cache equals evaluation
from the files. Training crops are drawn with the same per-sample generator (seed, epoch, index)
and the same crop rule as the file path, in that S x S frame, so a resumed run stays bit-exact.
The file name carries a hash of the file list, each file's size, times and inode, and the stored
and crop sizes: change the folder (or --image_size) and the cache is rebuilt; every later run and
every rank reuses it. cache_file.py has the file's format, its lock and its safe publication;
build_or_open here decides who builds.
"""
import math
import os
import time
import warnings
from functools import partial

import numpy as np
import torch

from core.errors import DataError
from dataset import planar, resized_crop, sequence_shape, train_sampler
from engine import distributed
from fastload.cache_file import NodeLeader, Team, describe_cache, stay_stopped, storage_size
from fastload.cache_jpeg import JpegImages, describe_jpeg_cache
from fastload.readahead import crop_on_device, key_batches, read_ahead
from inputs.augment import draw_crops

RAW_MEMORY_FRACTION = 0.25


def build_or_open(dataset, image_size, cache_dir, num_workers, team=Team(), resize_size=None, quality=None):
    """The cached (N, S, S, 3) uint8 array, S = resize_size (default image_size / 0.875), built once
    if missing; with a JPEG `quality`, the compressed cache (cache_jpeg.JpegImages) instead. A
    collective: every rank of the job calls it. Rank 0 decides for all whether to build; rank 0's
    node builds while the other nodes wait; a node that then cannot see the file (a node-local
    cache directory) builds its own. Returns (images, path, built): built is False when an
    existing cache was reused."""
    def look():
        usable_directory(cache_dir)
        side = resize_size or storage_size(image_size)
        spec = (describe_cache(dataset, image_size, side, cache_dir) if quality is None
                else describe_jpeg_cache(dataset, image_size, side, cache_dir, quality))
        return spec, team.node, spec.open() is None
    spec, first_node, missing = rank_0_decides(look, team)
    built = missing and build_on_nodes(spec, dataset, image_size, num_workers, team, team.node == first_node)
    images, unseen = open_everywhere(spec, team)
    if unseen:
        if team.node in unseen and team.local_rank == 0:
            print(f"Image cache {spec.path}: node {team.node} cannot see the copy node {first_node} built (a "
                  "node-local --cache_images directory?); building its own", flush=True)
        build_on_nodes(spec, dataset, image_size, num_workers, team, team.node in unseen)
        images, unseen = open_everywhere(spec, team)
        if unseen:
            raise DataError(f"the image cache {spec.path} is missing on node(s) {unseen} right after being built "
                            "there; is something deleting files in --cache_images?")
    return images, spec.path, built


def usable_directory(cache_dir):
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise DataError(f"--cache_images {cache_dir}: cannot make the image cache directory ({reason}); pass a "
                        "directory you can write to") from None


def build_on_nodes(spec, dataset, image_size, num_workers, team, building):
    """A collective: the nodes where `building` is set build the cache (each its own copy, under its
    own lock; their processes decode disjoint slices); the others wait. Returns whether this
    process's node built it (False: another job published it first). Nothing it created is left
    behind on any way out: an error, distributed.Stopped, KeyboardInterrupt."""
    leader = NodeLeader(spec) if building and team.local_rank == 0 else None
    decoder = None
    try:
        in_rounds(leader.claim if leader else None)
        created = leader.temp if leader and leader.building else None
        if created:
            print(f"Image cache {spec.path}: decoding {spec.count} images on node {team.node} with "
                  f"{team.local_world} process(es)", flush=True)
        # This node's temporary file, from its leader (None: not building, or another job's cache turned up).
        temp = next((name for node, name in gather_or_raise((team.node, created)) if node == team.node and name), None)
        decoder = spec.slice_worker(temp, dataset, image_size, num_workers, team) if temp else None
        in_rounds(decoder.step if decoder else None)
        # The compressed cache's parts, in local-rank order, for its leader to put together.
        result = decoder.result() if decoder else None
        reports = sorted(gather_or_raise((team.node, team.local_rank, result)), key=lambda report: report[:2])
        parts = [part for node, _, part in reports if node == team.node]
        publish = partial(finish_and_publish, leader, parts) if leader and leader.building else None
        in_rounds(publish)
    except BaseException as exc:
        stay_stopped(exc)
        if decoder:  # its share unfinished, or its part not yet collected: another rank failed
            decoder.abandon()
        raise
    finally:
        if leader:
            leader.close()
    return temp is not None


def finish_and_publish(leader, parts):
    leader.spec.finish(leader.temp_fd, parts)
    return leader.publish()


def open_everywhere(spec, team):
    """Every rank opens and verifies the published cache: (this rank's images or None, the nodes
    where some rank could not find it)."""
    images, error = attempt(spec.open)
    reports = gather_or_raise((team.node, images is None), error)
    return images, sorted({node for node, missing in reports if missing})


def rank_0_decides(decide, team):
    """decide() run on rank 0 alone and its result shared, so ranks cannot diverge when another job
    publishes a cache between their looks; a DataError there is raised on every rank."""
    result, error = attempt(decide) if team.rank == 0 else (None, None)
    result, error = distributed.broadcast_object((result, error))
    if error:
        raise DataError(error)
    return result


def in_rounds(step):
    """Call `step` (None: nothing to do here) once a round until it has returned True on every rank.
    Each round ends in one small all-gather, so a waiting rank never sits in one collective for a
    whole build (past the process group's timeout), and a DataError on any rank is raised on
    every rank with the same one-line message."""
    done = step is None
    while True:
        error = None
        if not done:
            done, error = attempt(step)
        if all(gather_or_raise(done, error)):
            return


def gather_or_raise(value, error=None):
    """Every rank's `value`; when any rank reports an error message, a DataError on every rank."""
    reports = distributed.gather_from_ranks((value, error))
    errors = [error for _, error in reports if error]
    if errors:
        raise DataError(errors[0])
    return [value for value, _ in reports]


def attempt(action):
    """(action(), None), or (None, its DataError's message)."""
    try:
        return action(), None
    except DataError as exc:
        return None, str(exc)


class CachedBatches:
    """Batches straight from the cache: one indexed read per batch, no per-sample __getitem__ or
    collate; crops and flips run batched on `device`, read ahead (readahead.read_ahead). Yields what
    the file loaders yield: (uint8 NCHW images, labels, indices, skipped=0)."""

    def __init__(self, images, labels, sampler, batch_size, train, image_size, device, drop_last,
                 seed=0, crop_scale=(0.08, 1.0), hflip_prob=0.5, augment=True):
        self.images, self.labels, self.sampler = images, torch.as_tensor(labels), sampler
        self.compressed = isinstance(images, JpegImages)
        if not self.compressed:
            with warnings.catch_warnings():  # a read-only memmap: torch only ever reads it
                warnings.simplefilter("ignore", UserWarning)
                self.pixels = torch.from_numpy(images)
            self.stored = np.asarray(images)  # a plain ndarray view: cheaper to index per image than a memmap
        self.batch_size, self.train, self.image_size, self.device = batch_size, train, image_size, device
        self.drop_last, self.seed, self.crop_scale, self.hflip_prob = drop_last, seed, crop_scale, hflip_prob
        self.augment = augment

    def __len__(self):
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self):
        keys = list(iter(self.sampler))
        yield from read_ahead(self.read_batch, key_batches(keys, self.batch_size, len(self)), self.device,
                              self.crop_stored)

    def crop_stored(self, read, keys):
        """On a GPU: a read batch's stored images copied (or, compressed, decoded by nvjpeg, batched)
        and cropped there."""
        pixels, boxes, flips = read
        if pixels is None:
            pixels = self.images.decode_on(keys % len(self.labels), self.device)
        else:
            pixels = pixels.to(self.device, non_blocking=True)
        if boxes is not None:
            boxes, flips = boxes.to(self.device, non_blocking=True), flips.to(self.device, non_blocking=True)
        return crop_on_device(pixels, boxes, flips, self.image_size)

    def read_batch(self, chunk):
        """One batch from the cache. For a GPU: the stored pixels, crop boxes and flips, and the
        labels, in pinned memory (copied without a host sync and cropped there). For the CPU:
        finished uint8 crops, made here in the reader thread (crop_on_cpu)."""
        keys = torch.from_numpy(np.array([key[1] if self.train else key for key in chunk]))
        indices = keys % len(self.labels)  # a copy of repeated augmentation reads its image (sampling.py)
        labels = self.labels[indices]
        boxes = flips = None
        if self.train and self.augment:
            boxes, flips = self.draw_crops([key[0] for key in chunk], keys)
        if self.device.type != "cuda":
            return self.crop_on_cpu(indices, boxes, flips), labels, keys
        boxes, flips = (torch.from_numpy(a).pin_memory() if a is not None else None for a in (boxes, flips))
        return (self.stored_pixels(indices), boxes, flips), labels.pin_memory(), keys

    def crop_on_cpu(self, indices, boxes, flips):
        """The batch's crops, NCHW uint8: center crops without boxes; training crops by the file
        path's resized_crop (PIL: the antialiased bilinear filter of crop_and_flip and
        TF.resized_crop, within 1 of 255; faster on a CPU than torch's uint8 resize, BENCHMARKS.md,
        and it releases the GIL while it resizes).
        Each crop is read straight from its stored (or decoded) image, with no parallel torch op in
        this thread: one would start an OpenMP team of its own beside the training thread's, on
        cores those already fill (measured: the cache path lost to the file path on a small model)."""
        size = self.image_size
        crops = np.empty((len(indices), 3, size, size), dtype=np.uint8)
        for row, index in enumerate(indices.tolist()):
            stored = self.images.decode(index) if self.compressed else self.stored[index]
            if boxes is None:  # evaluation: torchvision's center crop (its offsets), a plain slice
                start = int(round((stored.shape[0] - size) / 2.0))
                crops[row] = stored[start:start + size, start:start + size].transpose(2, 0, 1)
                continue
            left, top, width, height = boxes[row].tolist()
            planar(resized_crop(stored, (left, top, left + width, top + height), size, bool(flips[row])), crops[row])
        return torch.from_numpy(crops)

    def stored_pixels(self, indices):
        """A GPU batch's stored S x S images in pinned memory, or None for a compressed cache, which
        the GPU decodes when the batch is staged. One copy; torch's gather releases the GIL (numpy's
        take held it and stalled the training thread's kernel launches)."""
        if self.compressed:
            return None
        pixels = torch.empty((len(indices),) + self.images.shape[1:], dtype=torch.uint8, pin_memory=True)
        return torch.index_select(self.pixels, 0, indices, out=pixels)

    def draw_crops(self, epochs, indices):
        """Crop boxes (left, top, width, height) in the stored S x S frame and flips, drawn for the
        whole batch as the file path draws them (augment.draw_crops)."""
        size = self.images.shape[1]
        return draw_crops(self.seed, epochs, indices, size, size, self.crop_scale, self.hflip_prob)


def build_cached_loaders(train_set, val_set, args, ctx):
    """Train and val loaders over the image cache in args.cache_images (built on first use). A
    compressed cache holds the training images only: the evaluation split stays raw, so validation
    (and the checkpoint it selects) sees the files' decoded pixels, as without a cache."""
    team = Team.of(ctx)
    quality = cache_quality(len(train_set) + len(val_set), args, team)
    opened = []
    for dataset, dataset_quality in ((train_set, quality), (val_set, None)):
        began = time.perf_counter()
        images, path, built = build_or_open(dataset, args.image_size, args.cache_images, args.num_workers, team,
                                            args.resize_size, dataset_quality)
        if ctx.is_main:
            print(f"Image cache {path}: {images.nbytes / 2**20:.1f} MiB, "
                  + (f"built in {time.perf_counter() - began:.1f} s" if built else "reused"), flush=True)
        opened.append(images)
    sampler = train_sampler(train_set, args.batch_size, ctx.rank, ctx.world_size, args.seed,
                            **sequence_shape(args, train_set.targets))
    train_loader = CachedBatches(opened[0], train_set.targets, sampler, args.batch_size, True, args.train_crop_size,
                                 ctx.device, drop_last=False, seed=args.seed, crop_scale=(args.min_crop_scale, 1.0),
                                 hflip_prob=args.hflip_prob, augment=train_set.augment)
    val_shard = distributed.validation_shard(len(val_set), ctx.rank, ctx.world_size)
    val_loader = CachedBatches(opened[1], val_set.targets, val_shard, args.batch_size, False, args.image_size,
                               ctx.device, drop_last=False)
    return train_loader, val_loader


def cache_quality(count, args, team):
    """The JPEG quality of a compressed cache, or None for the raw one. --cache_format auto: raw
    while its projected size is at most RAW_MEMORY_FRACTION of rank 0's memory (then it stays in
    the page cache), else compressed; rank 0 decides for every node."""
    if args.cache_format != "auto":
        return args.cache_quality if args.cache_format == "jpeg" else None
    raw_bytes = count * args.resize_size ** 2 * 3
    def decide():
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        compressed = raw_bytes > RAW_MEMORY_FRACTION * memory
        if compressed:
            print(f"Image cache: compressed (JPEG quality {args.cache_quality}): raw pixels would take "
                  f"{raw_bytes / 2**30:.1f} GiB, over a quarter of this machine's {memory / 2**30:.0f} GiB "
                  "(--cache_format raw keeps them)", flush=True)
        return args.cache_quality if compressed else None
    return rank_0_decides(decide, team)
