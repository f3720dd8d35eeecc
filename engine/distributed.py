"""Distributed helpers: the process group, the few collectives the loop uses, and stop signals.

Run without torchrun there is one process and no process group; every helper then does the
one-process thing, so the loop has no `if distributed` branches beyond DDP's `no_sync`.
"""
import ctypes
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def describe(self):
        if not self.distributed:
            return f"1 process on {self.device.type}"
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        return f"{self.world_size} processes on {self.device.type} ({backend})"


def setup_distributed(timeout_minutes=10.0):
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    if world_size > 1:
        timeout = timedelta(minutes=timeout_minutes)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across worker-group restarts: without a per-attempt prefix a
        # restarted group reads the dead workers' addresses and fails to connect (pytorch#167288).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, local_rank, world_size, device)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory():
    """On a CPU: let the C allocator keep freed memory for the next step instead of returning it.
    glibc serves each allocation over 32 MB (a float32 batch of 224 px images, large activations)
    from a fresh mmap, so every step page-faults those tensors in anew (the cost and the extra
    resident memory: BENCHMARKS.md, "CPU training keeps freed memory"). Left alone when the user
    chose (MALLOC_* variables, a preloaded allocator) and where the C library has no mallopt.
    Returns whether it applied."""
    if "LD_PRELOAD" in os.environ or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to look into (Windows)
        return False
    return bool(mallopt and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def teardown_distributed():
    if is_initialized():
        dist.destroy_process_group()


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place (a no-op in a one-process run)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(values, device):
    """The element-wise maximum over ranks of a few local numbers, as floats (one collective).

    Every joint decision goes through here (stop on a signal, abort on a non-finite streak), at
    the same step on every rank, so no rank is left waiting in a collective the others skipped."""
    tensor = torch.tensor([float(v) for v in values], device=device, dtype=torch.float64)
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_from_ranks(obj):
    """Every rank's `obj`, as a list in rank order (a one-element list in a one-process run)."""
    if not is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank: a decision taken once (e.g. build or reuse a cache), so
    ranks cannot diverge when the world changes between their looks."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier():
    if is_initialized():
        dist.barrier()


def broadcast_buffers(module, src=0):
    """Copy rank `src`'s buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank holds statistics updated by its own last batch; evaluating with those would mix models.
    """
    if is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def validation_shard(num_items, rank, world_size):
    """This rank's unpadded share of an evaluation set: items rank, rank + world, ... Every item is
    evaluated exactly once across ranks (DistributedSampler would pad with duplicates)."""
    return list(range(rank, num_items, world_size))


# What a collective raises when another process of the job went away (gloo, NCCL).
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "remote process exited", "NCCL communicator was aborted")


def is_peer_loss(exc):
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in PEER_LOSS_MARKERS)


def report_to_torchrun(message, consequence=False):
    """Write this rank's one-line error where torchrun's failure summary reads it (its error file),
    so the summary shows the message. torchrun names the failure with the earliest timestamp (in
    whole seconds, ties to the lowest rank) as the root cause: a rank that failed only because
    another went away stamps its file a second later, so it is never taken for the cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + (1 if consequence else 0))
    with open(path, "w") as f:
        json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": stamp}}}, f)


def main_print(ctx, *args, **kwargs):
    """Only rank 0 prints progress; errors are printed by the rank that hits them."""
    if ctx.is_main:
        print(*args, **kwargs, flush=True)


class Stopped(BaseException):
    """A stop signal while the run sets up (scanning data, building the cache, the sanity check):
    nothing is worth saving yet, so the run ends at once, wherever it is (code that creates
    files removes them on the way out). A BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """SIGTERM/SIGINT. While the run sets up they raise Stopped at once; once training begins
    (`defer`) they only record the request, and the loop acts on it at its next joint check, so
    every rank saves and exits at the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self.interrupting = True
        for signum in self.SIGNALS:
            signal.signal(signum, self.record)
        # A job started with these signals blocked (inherited from a wrapper) would never see a
        # preemption notice; one already pending is delivered now, to the handler above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def record(self, signum, _frame):
        self.signal = signum
        if self.interrupting:
            raise Stopped(signum)

    def defer(self):
        """From now on a signal is only recorded, for the loop's joint checks to act on."""
        self.interrupting = False

    @property
    def requested(self):
        return self.signal is not None

    def adopt(self, signum):
        """Take the signal the ranks agreed on (a rank the signal did not reach has none of its own);
        True when there is one."""
        if signum and self.signal is None:
            self.signal = int(signum)
        return bool(signum)

    def agreed(self, device):
        """A joint decision on its own: True on every rank when any rank got a signal."""
        return self.adopt(all_reduce_max([self.signal or 0], device)[0])


class JointChecks:
    """When the ranks next decide together whether to stop (a signal, a non-finite streak).

    A check is a host sync and a tiny all-reduce, so it runs every few optimizer steps, about
    every `seconds` of training, independent of logging. Rank 0 measures the step time and
    picks the next interval; its choice rides on the check's own all-reduce, so every rank
    checks at the same step. The first step of a run and the last of each epoch always check.
    """

    def __init__(self, device, seconds=0.25):
        self.device, self.seconds = device, seconds
        self.next_step = None
        self.last_step = self.last_time = None

    def due(self, global_step, last_of_epoch):
        return last_of_epoch or self.next_step is None or global_step >= self.next_step

    def run(self, global_step, stop, nonfinite_streak, is_main):
        """Whether to stop (a signal on any rank: `stop.signal` is then set on every rank) and the
        non-finite streak, agreed by all ranks; schedules the next check."""
        now = time.perf_counter()
        interval = 1
        if is_main and self.last_step is not None and global_step > self.last_step:
            per_step = (now - self.last_time) / (global_step - self.last_step)
            interval = max(1, int(self.seconds / max(per_step, 1e-6)))
        signum, streak, interval = all_reduce_max([stop.signal or 0, nonfinite_streak, interval], self.device)
        self.next_step, self.last_step, self.last_time = global_step + int(interval), global_step, now
        return stop.adopt(signum), int(streak)
