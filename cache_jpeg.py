"""The compressed image cache (--cache_format jpeg): every image resized once to the cache's S x S
storage form, as the raw cache stores it, then re-encoded as a JPEG (--cache_quality), all in one
indexed file. About a tenth of the raw cache's bytes; decoded again at load time, by
torchvision.io.decode_jpeg (libjpeg-turbo) in the reader threads on a CPU, batched on the GPU
(nvjpeg) with CUDA.

Format: the raw cache's 4096-byte header (its own magic), then an index of (offset, length)
uint64 pairs, one per image, then the JPEG blobs. Built like the raw cache (cache_file.py: the
same name key, lock, unique temporary file, header written last, rename, verification on every
open), except that sizes are known only after encoding: each process of the building node
encodes its slice into its own part file (`<temporary>.part<local rank>`), and the node's leader
copies the parts into the temporary file behind the index before publishing it.
"""
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from cache_file import (HEADER, HEADER_BYTES, ROUND_SECONDS, CacheSpec, DecodeForCache, in_workers, no_room,
                        open_regular, try_flock)
from checkpoint import remove_quietly
from errors import DataError

MAGIC = b"IMGCJPEG"
INDEX_ENTRY_BYTES = 16  # offset and length, uint64 each


@dataclass(frozen=True)
class JpegSpec(CacheSpec):
    """What the compressed cache at `path` must hold: `count` JPEGs of side x side at `quality`
    (`shape` is the decoded images')."""
    magic: ClassVar[bytes] = MAGIC
    quality: int = 90

    @property
    def nbytes(self):  # reserved up front: only the header and index are known before encoding
        return HEADER_BYTES + self.count * INDEX_ENTRY_BYTES

    def open(self):
        return open_jpeg_cache(self)

    def slice_worker(self, temp, dataset, image_size, num_workers, team):
        return SliceEncoder(temp, self, dataset, image_size, num_workers, team)

    def finish(self, temp_fd, parts):
        return assemble(temp_fd, self, parts)


class JpegImages:
    """A published compressed cache, mapped read-only: `len`, `shape` and `nbytes` like the raw
    cache's array, `decode` (a row, on the CPU) and `decode_on` (rows, batched on a device)."""

    def __init__(self, spec, data):
        self.spec = spec
        self.index = np.frombuffer(data, dtype=np.uint64, count=2 * spec.count, offset=HEADER_BYTES).reshape(-1, 2)
        self.shape, self.nbytes = spec.shape, len(data)
        with warnings.catch_warnings():  # a read-only map: torch only ever reads it
            warnings.simplefilter("ignore", UserWarning)
            self.data = torch.from_numpy(data)

    def __len__(self):
        return self.spec.count

    def blobs(self, indices):
        """The JPEG bytes of these rows, as uint8 tensors (decode_jpeg's input)."""
        return [self.data[offset:offset + length] for offset, length in self.index[indices].tolist()]

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
    is none; a DataError naming the file for anything else."""
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
    encoded by DataLoader workers and appended to its own part file; `lengths` records each
    image's bytes for the index the leader writes."""

    def __init__(self, temp, spec, dataset, image_size, num_workers, team):
        self.spec, self.num_workers = spec, num_workers
        self.part = part_name(temp, team.local_rank)
        self.mine = range(team.local_rank, spec.count, team.local_world)
        self.samples = EncodeForCache([dataset.samples[i] for i in self.mine], image_size, spec.side, spec.quality)
        self.lengths = np.zeros(len(self.mine), dtype=np.uint64)
        self.file = self.encoded = None

    def step(self):
        """Encode for about a round; True when this share is written and flushed."""
        try:
            if self.encoded is None:
                self.start()
            deadline = time.monotonic() + ROUND_SECONDS
            for position, blob in self.encoded:
                self.file.write(blob.tobytes())
                self.lengths[position] = len(blob)
                if time.monotonic() > deadline:
                    return False
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            self.close(remove=True)
            raise DataError(f"cannot write the image cache part {self.part} ({exc.strerror}); free space or "
                            "pass another --cache_images DIR") from None
        except BaseException:
            self.close(remove=True)
            raise
        self.close()
        return True

    def start(self):
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try_flock(fd)  # held while encoding: tells other runs' cleanup that this build lives
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.encoded = in_workers(self.samples, self.num_workers)

    def close(self, remove=False):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.encoded = None
        if remove:
            remove_quietly(self.part)

    def result(self):
        return self.part, self.lengths


def part_name(temp, local_rank):
    return f"{temp}.part{local_rank}"


def assemble(temp_fd, spec, parts):
    """Write the index and copy every part behind it, in local-rank order; `parts` holds each local
    rank's (part file, lengths). The header is written later, last (NodeLeader.publish)."""
    try:
        copy_parts(temp_fd, spec, parts)
    except OSError as exc:
        raise DataError(no_room(spec, exc)) from None
    finally:  # copied or not, the parts are done with (NodeLeader.close removes the temporary file)
        for part, _ in parts:
            remove_quietly(part)
    return True


def copy_parts(temp_fd, spec, parts):
    index = np.zeros((spec.count, 2), dtype=np.uint64)
    offset = spec.nbytes
    with os.fdopen(os.dup(temp_fd), "r+b") as out:
        out.seek(offset)
        for local_rank, (part, lengths) in enumerate(parts):
            rows = np.arange(local_rank, spec.count, len(parts))
            index[rows, 1] = lengths
            index[rows, 0] = offset + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.uint64)
            offset += int(lengths.sum())
            with open(part, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 22)
        out.seek(HEADER_BYTES)
        out.write(index.tobytes())
        out.flush()
