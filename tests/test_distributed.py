"""distributed.py: the process group, collectives, joint checks and stop signals.

Multi-process behaviour is proven on real torchrun jobs in test_train_ddp.py and
test_fault_tolerance.py; here, what a one-process run and a single rank do."""
import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import run_cli

from engine.distributed import (
    DistContext,
    JointChecks,
    Stopped,
    StopRequest,
    all_reduce_sum,
    broadcast_buffers,
    setup_distributed,
    validation_shard,
)
from model import TinyCNN

# ------------------------------------------------------------------ distributed helpers, one process

def test_setup_without_torchrun_is_one_process_without_a_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed()
    assert ctx == DistContext(rank=0, local_rank=0, world_size=1,
                              device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert ctx.is_main and not ctx.distributed
    assert not dist.is_initialized()
    assert DistContext(rank=1, local_rank=1, world_size=2, device=torch.device("cpu")).distributed
    assert not DistContext(rank=1, local_rank=1, world_size=2, device=torch.device("cpu")).is_main


# A 48 MB tensor allocated and freed five times after ten warm-up rounds (while the heap grows to
# hold it at the alignment torch asks for); prints the page faults the five took.
REALLOCATE = """
import resource, sys, torch
from engine.distributed import setup_distributed
assert setup_distributed().device.type == "cpu"
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(48 * 2**20, dtype=torch.uint8).fill_(1)
before = faults()
for _ in range(5):
    torch.empty(48 * 2**20, dtype=torch.uint8).fill_(1)
print(faults() - before)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU allocator is tuned for CPU training only")
def test_on_a_cpu_freed_large_tensors_are_reused_without_faulting_their_pages_in_again():
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.pop("LD_PRELOAD", None)
    pages = 48 * 2**20 // 4096
    tuned = int(run_cli([sys.executable, "-c", REALLOCATE]).stdout)
    assert tuned < pages // 10  # the freed memory is handed back out
    # A user's own allocator settings are left alone: glibc's default then maps each one afresh.
    chosen = int(run_cli([sys.executable, "-c", REALLOCATE], env={"MALLOC_ARENA_MAX": "4"}).stdout)
    assert chosen > 4 * pages


def test_all_reduce_sum_and_broadcast_buffers_are_no_ops_without_a_process_group():
    assert not dist.is_initialized()
    tensor = torch.tensor([1.0, 2.0, 3.0])
    assert all_reduce_sum(tensor) is tensor
    assert torch.equal(tensor, torch.tensor([1.0, 2.0, 3.0]))

    model = torch.nn.Sequential(TinyCNN(num_classes=2).features[0], torch.nn.BatchNorm2d(16))
    model[1].running_mean.fill_(0.25)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert broadcast_buffers(model) is None
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])


def test_validation_shards_cover_every_item_once_without_padding():
    shards = [validation_shard(8, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]


# ------------------------------------------------------------------ joint checks and signals

@pytest.fixture
def stop():
    """A real StopRequest; the process's previous SIGINT/SIGTERM handlers come back afterwards."""
    previous = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}
    yield StopRequest()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_joint_checks_come_at_the_first_step_each_epochs_last_and_about_every_interval_between(stop):
    checks = JointChecks(torch.device("cpu"), seconds=0.05)
    assert checks.due(1, last_of_epoch=False)  # the first step of a run
    assert checks.run(1, stop, nonfinite_streak=0, is_main=True) == (False, 0)
    assert checks.due(2, last_of_epoch=False)  # the step after calibrates
    time.sleep(0.01)
    checks.run(2, stop, 0, True)  # a step took at least 10 ms: at most 5 steps to the next check
    assert 3 <= checks.next_step <= 7
    assert not checks.due(checks.next_step - 1, last_of_epoch=False) or checks.next_step == 3
    assert checks.due(checks.next_step - 1, last_of_epoch=True)
    fast = checks.next_step + 100
    checks.run(fast, stop, 0, True)  # 100 steps in a blink: hundreds of steps between checks
    assert checks.next_step - fast > 100
    stop.signal = signal.SIGTERM
    assert checks.run(checks.next_step, stop, nonfinite_streak=4, is_main=True) == (True, 4)


def test_a_stop_signal_interrupts_setup_then_only_records_the_request_once_training_defers_it(stop):
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises here, at once
    assert stopped.value.signum == signal.SIGINT
    stop.signal = None
    stop.defer()
    assert not stop.requested and not stop.agreed(torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal == signal.SIGTERM and stop.agreed(torch.device("cpu"))
    stop.signal = None  # a rank the signal did not reach takes the number the ranks agreed on
    assert stop.adopt(float(signal.SIGINT)) and stop.signal == signal.SIGINT
