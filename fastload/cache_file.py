"""The --cache_images file: its name, format, build and publication, safe when several jobs,
ranks and nodes want the same cache at once (../shared/DESIGN-NOTES.md, "Shared files under
concurrency"). image_cache.build_or_open decides who builds; this module does the file work.

Format: a 4096-byte header (magic, format version, image side and count, the dataset key's
sha256), then the (N, S, S, 3) uint8 pixels. The header is written last, after every pixel, and
only then is the file renamed to its published name: a file there with this dataset's header and
exactly the expected size is complete. Anything else at that name is an error naming the file.

A building node's local rank 0 (NodeLeader) takes `<cache>.lock`, re-checks whether another job
published the cache meanwhile, removes temporary files of builds on this machine that are proven
dead, and creates `<cache>.tmp.<host>.<pid>.<hex>` (O_EXCL|O_NOFOLLOW: never an existing file or
a link) with its whole size reserved. The node's processes decode disjoint slices into it
(SliceDecoder); the leader writes the header, fsyncs and renames.

flock serialises builders on one machine. On NFS it is forwarded to the server or, with
local_lock, local to each client; Lustre without -o flock has none. The lock only saves duplicate
work: correctness rests on the unique temporary names, the atomic rename and the verification on
every open.
"""
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from core.errors import DataError
from core.files import fsync_directory, remove_quietly
from dataset import UNREADABLE, open_resized
from dataset import eval_resize_size as storage_size  # the cache stores the eval transform's intermediate
from engine import distributed

FORMAT_VERSION = 3  # 1: headerless, keyed by file sizes and mtimes; 2: keyed without the crop size, no checksums
MAGIC = b"IMGCACHE"
HEADER = struct.Struct("<8sIIQ32s")  # magic, format version, side, image count, dataset key
HEADER_BYTES = 4096  # the pixels start on a page boundary
HOST = socket.gethostname()
ROUND_SECONDS = 1.0
LOCK_POLL_SECONDS = 0.5
SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a planted FIFO must not hang us
TEMP_NAME = re.compile(r"\.(u8|jpegs)\.tmp\.(?P<host>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(\.part\d+)?$")


@dataclass(frozen=True)
class CacheSpec:
    """What the cache file at `path` must hold: `count` images of side x side of the dataset `key`."""
    magic: ClassVar[bytes] = MAGIC
    path: str
    key: bytes
    count: int
    side: int

    @property
    def shape(self):
        return (self.count, self.side, self.side, 3)

    @property
    def nbytes(self):
        return HEADER_BYTES + self.count * self.side * self.side * 3

    @property
    def header(self):
        return HEADER.pack(self.magic, FORMAT_VERSION, self.side, self.count, self.key)

    def open(self):
        return open_verified(self)

    def slice_worker(self, temp, dataset, image_size, num_workers, team):
        return SliceDecoder(temp, self, dataset, image_size, num_workers, team)

    def finish(self, temp_fd, parts):
        """Complete the temporary file before its header is written; the raw cache's slices are
        written in place, so nothing is left to do (cache_jpeg.JpegSpec copies its parts)."""


@dataclass(frozen=True)
class Team:
    """This process's place: its global rank, its node (torchrun's GROUP_RANK) and its rank among
    the node's processes, which decode their node's build together. The default: one process."""
    rank: int = 0
    node: int = 0
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def of(cls, ctx):
        return cls(ctx.rank, int(os.environ.get("GROUP_RANK", 0)), ctx.local_rank,
                   int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def describe_cache(dataset, image_size, side, cache_dir):
    """The raw cache of `dataset` stored at `side` for crops of `image_size` (the compressed one:
    cache_jpeg.describe_jpeg_cache)."""
    return CacheSpec(*cache_name(dataset, image_size, side, cache_dir), len(dataset.samples), side)


def cache_name(dataset, image_size, side, cache_dir, quality=None):
    """(path, key) of the cache of `dataset` (raw, or compressed at JPEG `quality`), named by a hash
    of the format version, the folder, both sizes (the stored window depends on the crop size:
    DecodeForCache) and every file's path, label, size, mtime, inode change time and inode: a
    rewrite that keeps the size and restores the mtime (cp -p, rsync -t) cannot restore the ctime,
    so it gets a new cache."""
    compressed = "" if quality is None else f"|jpeg{quality}"
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{os.path.abspath(dataset.root)}|{side}|{image_size}{compressed}"
                            .encode())
    for path, label in dataset.samples:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read {path} ({exc.strerror}) while naming the image cache") from None
        digest.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n".encode())
    stem = f"{os.path.basename(os.path.normpath(dataset.root))}-{side}px"
    hex_key = digest.hexdigest()[:16]
    name = f"{stem}-{hex_key}.u8" if quality is None else f"{stem}-q{quality}-{hex_key}.jpegs"
    return os.path.join(cache_dir, name), digest.digest()


class DecodeForCache(Dataset):
    """Decode one image to the stored S x S form (the eval transform's resize + center crop)."""

    def __init__(self, samples, image_size, size=None):
        self.samples, self.image_size, self.size = samples, image_size, size or storage_size(image_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path = self.samples[index][0]
        try:
            image = open_resized(path, self.size)
        except UNREADABLE as exc:
            raise DataError(f"cannot read image {path} ({exc}) while building the image cache; fix or "
                            "remove it, or train without --cache_images") from None
        # The S x S window whose center crop is exactly the eval transform's center crop (the
        # offsets round separately, so a plain center crop of S could sit one pixel off).
        top, left = (window_start(extent, self.size, self.image_size) for extent in (image.height, image.width))
        return index, np.array(TF.crop(image, top, left, self.size, self.size))


def window_start(extent, window, final):
    direct = int(round((extent - final) / 2.0))  # torchvision center_crop's offset
    inner = int(round((window - final) / 2.0))
    return min(max(direct - inner, 0), extent - window)


def open_regular(path, flags):
    """A descriptor of the regular file at `path`, never through a symbolic link (it could point
    at anything). FileNotFoundError when there is none; a DataError for anything else."""
    try:
        fd = os.open(path, flags | SAFE_OPEN, 0o666)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic link; the image cache never follows one (it could "
                            "overwrite what it points to): remove it") from None
        raise DataError(f"cannot open {path} ({exc.strerror}): give this user access to it, or pass "
                        "another --cache_images DIR") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path} is not a regular file, so it cannot be part of the image cache: remove it")
    return fd


def open_verified(spec):
    """The published cache mapped read-only, after checking that it is complete and this dataset's:
    a regular file, exactly the expected size, and the header written last. None when there is
    none; a DataError naming the file for anything else (never rebuilt over: it is not ours)."""
    try:
        fd = open_regular(spec.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:  # the map keeps its own descriptor
        size = os.fstat(fd).st_size
        if size != spec.nbytes:
            raise DataError(f"the image cache {spec.path} is {size} bytes, not the {spec.nbytes} this dataset "
                            "needs (truncated or overwritten): delete it and run again")
        if os.pread(fd, HEADER.size, 0) != spec.header:
            raise DataError(f"the image cache {spec.path} does not hold this dataset's images (damaged, or "
                            "written by another version): delete it and run again")
        return np.memmap(file, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=spec.shape)


def try_flock(fd):
    """An exclusive flock without waiting: True, False while another process holds it, or None
    where the filesystem has none (Lustre without -o flock, NFS without a lock manager)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def try_build_lock(lock_path):
    """A descriptor holding the cache's build lock, or None while another process holds it. The
    holder deletes the lock file when done (nothing is left behind), so each try opens it afresh
    and keeps it only if it is still the file at lock_path, not one its holder just deleted."""
    fd = open_regular(lock_path, os.O_RDWR | os.O_CREAT)
    if try_flock(fd) is not False:
        try:
            if os.lstat(lock_path).st_ino == os.fstat(fd).st_ino:  # looked at only once locked
                return fd
        except FileNotFoundError:
            pass
    os.close(fd)
    return None


def remove_stale_temps(cache_dir):
    """Delete temporary files of builds on this machine that died without cleaning up (SIGKILL, the
    OOM killer, a power cut). Proven dead twice: their pid no longer exists, and no process holds
    their flock (a live build in another PID namespace with this hostname would)."""
    for entry in os.scandir(cache_dir):
        match = TEMP_NAME.search(entry.name)
        if match and match["host"] == HOST and not pid_exists(int(match["pid"])) and not in_use(entry.path):
            print(f"Removing {entry.path}: left by an image cache build whose process is gone", flush=True)
            remove_quietly(entry.path)


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def in_use(path):
    """Whether a process holds the flock of this temporary file (or it is not a regular file)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except (OSError, DataError):
        return True
    try:
        return try_flock(fd) is False
    finally:
        os.close(fd)


class NodeLeader:
    """A building node's local rank 0: holds the cache's lock, then its temporary file, from the
    claim to the publication; `close` removes whatever is left of both, on every way out."""

    def __init__(self, spec):
        self.spec, self.lock_path = spec, spec.path + ".lock"
        self.temp = f"{spec.path}.tmp.{HOST}.{os.getpid()}.{secrets.token_hex(4)}"  # our pid: no one else's
        self.lock_fd = self.temp_fd = None
        self.building = self.waiting = False

    def claim(self):
        """One try for the lock; True once this node builds or another job's cache turned up."""
        self.lock_fd = try_build_lock(self.lock_path)
        if self.lock_fd is None:
            if not self.waiting:
                print(f"Image cache {self.spec.path}: waiting for the process that is building it", flush=True)
                self.waiting = True
            time.sleep(LOCK_POLL_SECONDS)
            return False
        if self.spec.open() is not None:  # re-checked under the lock: published meanwhile
            self.release_lock()
            return True
        remove_stale_temps(os.path.dirname(self.spec.path))
        try:
            self.temp_fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o666)
            try_flock(self.temp_fd)  # held until published: tells other runs' cleanup that this build lives
            os.posix_fallocate(self.temp_fd, 0, self.spec.nbytes)  # a full disk fails here, not as SIGBUS
        except OSError as exc:
            self.close()  # first, so the free space reported does not count a partial reservation
            raise DataError(no_room(os.path.dirname(self.spec.path), self.spec.nbytes, exc)) from None
        self.building = True
        return True

    def publish(self):
        """The header last, then the rename: only a complete file ever has the published name."""
        try:
            os.pwrite(self.temp_fd, self.spec.header, 0)
            os.fsync(self.temp_fd)
            os.replace(self.temp, self.spec.path)
            fsync_directory(os.path.dirname(self.spec.path))
        except OSError as exc:
            raise DataError(f"cannot publish the image cache {self.spec.path} ({exc.strerror})") from None
        return True

    def close(self):
        if self.temp_fd is not None:
            os.close(self.temp_fd)
            self.temp_fd = None
        remove_quietly(self.temp)  # gone already once published
        self.release_lock()

    def release_lock(self):
        if self.lock_fd is not None:
            remove_quietly(self.lock_path)  # while held: whoever locks this file next sees it gone, tries anew
            os.close(self.lock_fd)
            self.lock_fd = None


def no_room(directory, needed, exc, about=""):
    """The message for a cache of `needed` bytes that `directory` could not take (`exc`); call it
    once this build's own files are gone, so the free space it reports is what a new run gets."""
    if exc.errno == errno.ENOSPC:
        return (f"the image cache needs {about}{size_text(needed)} but {directory} has "
                f"{size_text(shutil.disk_usage(directory).free)} free; free space or pass another --cache_images DIR")
    limit = " or raise the file size limit (ulimit -f)" if exc.errno == errno.EFBIG else ""
    return (f"cannot write the image cache in {directory} ({exc.strerror}); it needs {about}{size_text(needed)}: "
            f"pass another --cache_images DIR{limit}")


def size_text(nbytes):
    for unit in ("bytes", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


class SliceDecoder:
    """One process's share of its node's build (images local_rank, local_rank + local_world, ...),
    decoded by DataLoader workers and written into the node's temporary file, a round at a time."""

    def __init__(self, temp, spec, dataset, image_size, num_workers, team):
        self.temp, self.spec, self.num_workers = temp, spec, num_workers
        self.mine = range(team.local_rank, spec.count, team.local_world)
        self.samples = DecodeForCache([dataset.samples[i] for i in self.mine], image_size, spec.side)
        self.images = self.decoded = None

    def step(self):
        """Decode for about a round; True when this share is written."""
        try:
            if self.decoded is None:
                self.start()
            deadline = time.monotonic() + ROUND_SECONDS
            for position, pixels in self.decoded:
                self.images[self.mine[position]] = pixels
                if time.monotonic() > deadline:
                    return False
            self.images.flush()
        except BaseException as exc:
            stay_stopped(exc)
            self.abandon()  # a stop signal or an unreadable image: the workers exit now, not at the end of the run
            raise
        self.close()
        return True

    def start(self):
        with os.fdopen(open_regular(self.temp, os.O_RDWR), "r+b") as file:  # the map keeps its own descriptor
            self.images = np.memmap(file, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=self.spec.shape)
        self.decoded = in_workers(self.samples, self.num_workers)

    def close(self):
        self.images = self.decoded = None

    def abandon(self):  # a failed build: the leader removes the temporary file this wrote into
        self.close()

    def result(self):  # the raw cache needs nothing more from its builders (cache_jpeg's do)
        return None


def in_workers(samples, num_workers):
    """(position, item) of every sample, in order, made by DataLoader workers that a stop signal
    ends quietly (the build's decoders and encoders)."""
    with stop_signals_deferred():
        return iter(DataLoader(samples, batch_size=None, num_workers=num_workers, collate_fn=as_decoded,
                               generator=torch.Generator(), worker_init_fn=quit_quietly_on_stop_signals))


@contextmanager
def stop_signals_deferred():
    """SIGINT/SIGTERM held back while DataLoader forks its workers, then handled as before: a
    distributed.Stopped raised inside DataLoader's constructor would leave its workers unmanaged.
    (Python runs signal handlers in the main thread only, so swapping them defers a signal
    whichever thread the kernel delivers it to; the forked workers start with the deferring one.)"""
    received = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
                for signum in distributed.StopRequest.SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received[:1]:
            try:
                signal.raise_signal(signum)
            except BaseException as exc:  # before the unwinding frees the new DataLoader iterator
                stay_stopped(exc)
                raise


def stay_stopped(exc):
    """Once a stop signal is ending the run (distributed.Stopped), a second SIGINT/SIGTERM, which GNU
    timeout or a forwarding wrapper sends right after the first, is ignored: raised again, it would
    interrupt the clean-up (a lock file left), a DataLoader's worker shutdown ("Exception ignored in
    ... __del__") or the interpreter's exit (killed by the signal, not exiting 128 + signal)."""
    if isinstance(exc, distributed.Stopped):
        for signum in distributed.StopRequest.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def as_decoded(sample):
    """Samples leave the workers as pickled numpy arrays, not as tensors in shared memory, whose
    hand-over (a socket handshake per tensor) a stop signal in the main process can cut, leaving a
    worker's traceback on stderr."""
    return sample


def quit_quietly_on_stop_signals(_worker_id):
    """SIGINT/SIGTERM reach decode workers too (Ctrl-C and torchrun signal the whole process group).
    With the main process's handler a worker would raise distributed.Stopped and die with a
    traceback, which the DataLoader reports as a worker failure; on KeyboardInterrupt a DataLoader
    worker ends quietly, while the main process raises Stopped and ends the run."""
    for signum in distributed.StopRequest.SIGNALS:
        signal.signal(signum, signal.default_int_handler)
