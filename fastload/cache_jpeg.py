"""The compressed image cache (--cache_format jpeg): every training image resized once to the
cache's S x S storage form, as the raw cache stores it, then re-encoded as a JPEG (--cache_quality),
all in one indexed file. About a tenth of the raw cache's bytes; decoded again at load time, by
torchvision.io.decode_jpeg (libjpeg-turbo) in the reader threads on a CPU, batched on the GPU
(nvjpeg) with CUDA. The evaluation split is always cached raw (image_cache.build_cached_loaders):
validation sees the files' decoded pixels.

Format: the raw cache's 4096-byte header (its own magic), then an index of (offset, length, crc32)
uint64 triples, one per image, then the JPEG blobs; every read checks its blob's crc32, so a damaged
file is an error naming it, never a wrong or undecodable image. Built like the raw cache
(cache_file.py: the same name key, lock, unique temporary file, header written last, rename,
verification on every open), except that sizes are known only after encoding: the node's local
rank 0 encodes its slice straight into the temporary file behind the index, each other process
into its own part file (`<temporary>.part<local rank>`), which the leader appends to the temporary
file and deletes, one at a time, before publishing it. So a build needs the cache's size plus its
largest part, not twice the cache's size; after its first ESTIMATE_AFTER images each process
checks that the estimated rest fits on the disk.
"""
import contextlib
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from core.errors import DataError
from core.files import remove_quietly
from fastload.cache_file import (
    HEADER,
    HEADER_BYTES,
    ROUND_SECONDS,
    CacheSpec,
    DecodeForCache,
    cache_name,
    in_workers,
    no_room,
    open_regular,
    size_text,
    stay_stopped,
    try_flock,
)

MAGIC = b"IMGCJPEG"
INDEX_COLUMNS = 3  # offset, length, crc32: uint64 each
ESTIMATE_AFTER = 16  # images of its share a process encodes before it estimates the cache's size


@dataclass(frozen=True)
class JpegSpec(CacheSpec):
    """What the compressed cache at `path` must hold: `count` JPEGs of side x side at `quality`
    (`shape` is the decoded images')."""
    magic: ClassVar[bytes] = MAGIC
    quality: int = 90

    @property
    def nbytes(self):  # reserved up front: only the header and index are known before encoding
        return HEADER_BYTES + self.count * INDEX_COLUMNS * 8

    def open(self):
        return open_jpeg_cache(self)

    def slice_worker(self, temp, dataset, image_size, num_workers, team):
        return SliceEncoder(temp, self, dataset, image_size, num_workers, team)

    def finish(self, temp_fd, parts):
        return assemble(temp_fd, self, parts)


def describe_jpeg_cache(dataset, image_size, side, cache_dir, quality):
    """The compressed cache of `dataset` at JPEG `quality`, named like the raw one (cache_file.cache_name)."""
    return JpegSpec(*cache_name(dataset, image_size, side, cache_dir, quality), len(dataset.samples), side, quality)


class JpegImages:
    """A published compressed cache, mapped read-only: `len`, `shape` and `nbytes` like the raw
    cache's array, `decode` (a row, on the CPU) and `decode_on` (rows, batched on a device)."""

    def __init__(self, spec, data):
        self.spec, self.bytes = spec, data
        self.index = np.frombuffer(data, dtype=np.uint64, count=INDEX_COLUMNS * spec.count,
                                   offset=HEADER_BYTES).reshape(-1, INDEX_COLUMNS)
        self.shape, self.nbytes = spec.shape, len(data)
        with warnings.catch_warnings():  # a read-only map: torch only ever reads it
            warnings.simplefilter("ignore", UserWarning)
            self.data = torch.from_numpy(data)

    def __len__(self):
        return self.spec.count

    def blobs(self, indices):
        """The JPEG bytes of these rows, as uint8 tensors (decode_jpeg's input), each checked
        against its crc32 (zlib's releases the GIL; microseconds beside a decode)."""
        blobs = []
        for row, (offset, length, crc) in zip(np.asarray(indices).tolist(), self.index[indices].tolist()):
            if zlib.crc32(self.bytes[offset:offset + length]) != crc:
                raise DataError(f"the image cache {self.spec.path} is damaged (image {row} fails its checksum); "
                                "delete it and run again")
            blobs.append(self.data[offset:offset + length])
        return blobs

    def decode(self, index):
        """One row decoded on the CPU: (S, S, 3) uint8 numpy (libjpeg-turbo, the GIL released)."""
        return decode_jpeg(self.blobs([index])[0], mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    def decode_on(self, indices, device):
        """Rows `indices` decoded in one batched call on `device` (nvjpeg on a GPU), (B, S, S, 3)."""
        decoded = decode_jpeg(self.blobs(indices.numpy()), mode=ImageReadMode.RGB, device=device)
        return torch.stack([image.permute(1, 2, 0) for image in decoded])


def open_jpeg_cache(spec):
    """The published compressed cache after checking that it is complete and this dataset's: a
    regular file, the header written last, an index that covers the file exactly. None when there
    is none; a DataError naming the file for anything else. (Each image's checksum is checked
    when it is read: JpegImages.blobs.)"""
    try:
        fd = open_regular(spec.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(fd).st_size
        if size < spec.nbytes or os.pread(fd, HEADER.size, 0) != spec.header:
            raise DataError(f"the image cache {spec.path} does not hold this dataset's images (damaged, "
                            "truncated, or written by another version): delete it and run again")
        data = np.memmap(file, dtype=np.uint8, mode="r")
    images = JpegImages(spec, data)
    ends = images.index[:, 0] + images.index[:, 1]
    if (images.index[:, 0] < spec.nbytes).any() or ends.max(initial=spec.nbytes) != size:
        raise DataError(f"the image cache {spec.path} has an index that does not match its size (damaged): "
                        "delete it and run again")
    return images


class EncodeForCache(DecodeForCache):
    """One image in its stored S x S form (DecodeForCache), re-encoded as a JPEG."""

    def __init__(self, samples, image_size, size, quality):
        super().__init__(samples, image_size, size)
        self.quality = quality

    def __getitem__(self, index):
        index, pixels = super().__getitem__(index)
        blob = encode_jpeg(torch.from_numpy(pixels).permute(2, 0, 1), quality=self.quality)
        return index, blob.numpy()


class SliceEncoder:
    """One process's share of its node's build (images local_rank, local_rank + local_world, ...),
    encoded by DataLoader workers and written behind the index of the node's temporary file (local
    rank 0) or to its own part file (the others); `lengths` and `checksums` record each image's
    bytes for the index the leader writes."""

    def __init__(self, temp, spec, dataset, image_size, num_workers, team):
        self.spec, self.num_workers, self.local_world = spec, num_workers, team.local_world
        self.in_temp = team.local_rank == 0
        self.target = temp if self.in_temp else part_name(temp, team.local_rank)
        self.mine = range(team.local_rank, spec.count, team.local_world)
        self.samples = EncodeForCache([dataset.samples[i] for i in self.mine], image_size, spec.side, spec.quality)
        self.lengths = np.zeros(len(self.mine), dtype=np.uint64)
        self.checksums = np.zeros(len(self.mine), dtype=np.uint64)
        self.done = 0
        self.file = self.encoded = None

    def step(self):
        """Encode for about a round; True when this share is written and flushed."""
        try:
            if self.encoded is None:
                self.start()
            deadline = time.monotonic() + ROUND_SECONDS
            for position, blob in self.encoded:
                self.file.write(blob.tobytes())
                self.lengths[position], self.checksums[position] = len(blob), zlib.crc32(blob)
                self.done = position + 1
                if self.done == ESTIMATE_AFTER:
                    self.check_space()
                if time.monotonic() > deadline:
                    return False
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            self.abandon()  # first: the free space reported is then what a new run gets
            raise DataError(no_room(os.path.dirname(self.spec.path), self.estimate(), exc, "about ")) from None
        except BaseException as exc:
            stay_stopped(exc)
            self.abandon()
            raise
        self.close()
        return True

    def start(self):
        if self.in_temp:  # the leader created it, and holds its flock
            fd = open_regular(self.target, os.O_WRONLY)
            os.lseek(fd, self.spec.nbytes, os.SEEK_SET)
        else:
            fd = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try_flock(fd)  # held while encoding: tells other runs' cleanup that this build lives
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.encoded = in_workers(self.samples, self.num_workers)

    def estimate(self):
        """The whole cache's bytes, extrapolated from this process's images so far."""
        return self.spec.nbytes + int(self.lengths[:self.done].sum()) * self.spec.count // max(self.done, 1)

    def check_space(self):
        """Whether the rest of the node's build fits on the disk: the images still to encode, and
        the largest part the leader copies before deleting it (none with one process)."""
        self.file.flush()  # so the free space below counts what this process wrote
        total = self.estimate() - self.spec.nbytes
        written = int(self.lengths[:self.done].sum()) * self.local_world
        copied = total // self.local_world if self.local_world > 1 else 0
        directory = os.path.dirname(self.spec.path)
        free = shutil.disk_usage(directory).free + written  # once this build's files are gone: what a new run gets
        if total + copied > free:
            raise DataError(f"the image cache needs about {size_text(self.estimate())} (estimated from its "
                            f"first {self.done} images) but {directory} has {size_text(free)} free; free space "
                            "or pass another --cache_images DIR")

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.encoded = None

    def abandon(self):
        """Close without flushing what a failed write left in the buffer (closing would write it
        again, and fail again), and remove the part file (the leader removes the temporary one)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()  # the descriptor is closed even when the flush fails
            self.file = None
        self.encoded = None
        if not self.in_temp:
            remove_quietly(self.target)

    def result(self):
        return self.target, self.lengths, self.checksums


def part_name(temp, local_rank):
    return f"{temp}.part{local_rank}"


def assemble(temp_fd, spec, parts):
    """Append the other processes' parts behind local rank 0's images in the temporary file,
    deleting each once copied, then write the index; `parts` holds each local rank's (file,
    lengths, checksums), local rank 0's file being the temporary one. The header is written
    later, last (NodeLeader.publish)."""
    lengths = np.concatenate([part_lengths for _, part_lengths, _ in parts])
    needed = spec.nbytes + int(lengths.sum())
    try:
        index = copy_parts(temp_fd, spec, parts)
        os.pwrite(temp_fd, index.tobytes(), HEADER_BYTES)
    except OSError as exc:
        for part, _, _ in parts[1:]:
            remove_quietly(part)
        os.ftruncate(temp_fd, 0)  # first: the free space reported is then what a new run gets
        raise DataError(no_room(os.path.dirname(spec.path), needed, exc)) from None
    return True


def copy_parts(temp_fd, spec, parts):
    index = np.zeros((spec.count, INDEX_COLUMNS), dtype=np.uint64)
    offset = spec.nbytes
    with os.fdopen(os.dup(temp_fd), "r+b") as out:
        for local_rank, (part, lengths, checksums) in enumerate(parts):
            rows = np.arange(local_rank, spec.count, len(parts))
            index[rows, 0] = offset + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.uint64)
            index[rows, 1], index[rows, 2] = lengths, checksums
            offset += int(lengths.sum())
            if local_rank > 0:  # local rank 0 wrote its images in place
                out.seek(0, os.SEEK_END)
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 22)
                out.flush()
                remove_quietly(part)  # at once: the build never holds two copies of more than one part
    return index
