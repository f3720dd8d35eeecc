"""sampling.py: one global sample sequence per epoch, shared out to the ranks, whatever their
number; the sample trace's reader is exercised by test_resume.py."""
import pytest
import torch

from core.errors import ConfigError, DataError
from inputs.sampling import GlobalOrderSampler


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_take_every_world_size_th_position_of_the_epochs_permutation_from_start(world_size):
    permutation = torch.randperm(24, generator=torch.Generator().manual_seed(7 + 5)).tolist()
    for rank in range(world_size):
        sampler = GlobalOrderSampler(24, 4, rank, world_size, seed=7)
        sampler.set_epoch(5)
        full = list(sampler)
        assert full == [(5, i) for i in permutation[rank::world_size]]  # DistributedSampler's order
        for start in range(0, 24 + 1, 4 * world_size):  # positions already trained by all ranks
            sampler.set_epoch(5, start=start)
            assert list(sampler) == full[start // world_size:]
            assert len(sampler) == len(full) - start // world_size
            assert sampler.batches() == (24 - start) // (4 * world_size)
        sampler.set_epoch(6)  # a new epoch starts from its beginning again
        assert len(list(sampler)) == len(full) == 24 // world_size


def test_an_epoch_trains_whole_rows_without_padding_or_repeats():
    sampler = GlobalOrderSampler(25, 4, 1, 2, seed=0)  # rows of 8: 3 rows, one image waits
    assert sampler.epoch_length() == 24 and sampler.batches() == 3
    seen = [i for rank in range(2) for _, i in iter_epoch(GlobalOrderSampler(25, 4, rank, 2, seed=0), 1)]
    assert len(seen) == len(set(seen)) == 24


def iter_epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(DataError, match="24 images, 12 per process: fewer than --batch_size 13"):
        GlobalOrderSampler(24, 13, 0, 2, seed=0)


def test_any_layout_of_the_same_global_batch_trains_the_same_samples_per_step():
    def steps(batch, world, accumulation, start=0):
        per_rank = []
        for rank in range(world):
            sampler = GlobalOrderSampler(50, batch, rank, world, seed=3)
            sampler.set_epoch(2, start=start, end=48)
            per_rank.append([index for _, index in sampler])
        rows = [sorted(sum((ranks[q * batch:(q + 1) * batch] for ranks in per_rank), []))
                for q in range(sampler.batches())]
        return [sorted(sum(rows[s:s + accumulation], [])) for s in range(0, len(rows), accumulation)]

    reference = steps(2, 2, 2)  # global batch 8: 6 steps
    assert len(reference) == 6 and sorted(sum(reference, [])) != list(range(48))  # a shuffled subset
    assert steps(8, 1, 1) == steps(4, 2, 1) == steps(1, 4, 2) == steps(2, 1, 4) == reference
    assert steps(4, 1, 2, start=24) == steps(2, 2, 2, start=24) == reference[3:]  # resumed at step 3


def test_an_epoch_that_cannot_be_shared_among_the_new_processes_is_refused():
    sampler = GlobalOrderSampler(24, 2, 0, 4, seed=0)
    with pytest.raises(ConfigError, match="cannot be continued exactly on 4 processes: its last 2 sample"):
        sampler.set_epoch(1, start=20, end=22)
