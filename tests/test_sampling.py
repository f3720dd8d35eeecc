"""sampling.py: one global sample sequence per epoch, shared out to the ranks, whatever their
number; the sample trace's reader is exercised by test_resume.py."""
import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from inputs.sampling import GlobalOrderSampler, sample_weights


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


def rank_batches(size, batch, world, seed=3, epoch=2, start=0, end=None, unit=1, repeats=1):
    """Each rank's micro-batches of one epoch, as lists of sample keys."""
    batches = []
    for rank in range(world):
        sampler = GlobalOrderSampler(size, batch, rank, world, seed, unit=unit, repeats=repeats)
        sampler.set_epoch(epoch, start=start, end=end)
        keys = [key for _, key in sampler]
        batches.append([keys[i:i + batch] for i in range(0, len(keys), batch)])
    return batches


@pytest.mark.parametrize("batch, world", [(8, 1), (4, 2), (2, 4)])
def test_with_mixing_ranks_take_whole_pairs_of_consecutive_positions_on_any_layout(batch, world):
    sequence = [key for ranks in rank_batches(40, 40, 1, unit=2) for b in ranks for key in b]
    pairs = {tuple(sequence[p:p + 2]) for p in range(0, len(sequence), 2)}
    for ranks in rank_batches(40, batch, world, unit=2):
        for micro_batch in ranks:
            assert {tuple(micro_batch[r:r + 2]) for r in range(0, batch, 2)} <= pairs  # rows (2p, 2p+1) pair up
    seen = sorted(key for ranks in rank_batches(40, batch, world, unit=2) for b in ranks for key in b)
    assert seen == sorted(sequence)  # every position once


def test_mixing_pairs_survive_a_resume_on_another_layout_mid_epoch():
    before = {tuple(b[r:r + 2]) for ranks in rank_batches(48, 4, 2, unit=2) for b in ranks for r in (0, 2)}
    after = {tuple(b[r:r + 2]) for ranks in rank_batches(48, 2, 4, unit=2, start=16, end=48)
             for b in ranks for r in (0,)}
    assert after <= before and len(after) == 16


def test_mixing_cannot_start_inside_a_pair_and_needs_an_even_batch():
    with pytest.raises(ConfigError, match="--batch_size must be even"):
        GlobalOrderSampler(24, 3, 0, 1, seed=0, unit=2)
    sampler = GlobalOrderSampler(24, 2, 0, 1, seed=0, unit=2)
    with pytest.raises(ConfigError, match="inside a pair"):
        sampler.set_epoch(1, start=3, end=24)


def test_repeated_augmentation_puts_each_images_copies_on_different_ranks_with_distinct_keys():
    size, world = 512, 4
    batches = rank_batches(size, 8, world, repeats=3)
    keys = [key for ranks in batches for b in ranks for key in b]
    assert len(keys) == len(set(keys)) == 512  # RASampler's length: the dataset's, rounded to 256
    for rank, ranks in enumerate(batches):
        images = [key % size for b in ranks for key in b]
        assert all(key // size < 3 for b in ranks for key in b)
        assert len(images) - len(set(images)) < 8  # copies of one image land on other ranks
    sequence = [key for ranks in rank_batches(size, 8, 1, repeats=3) for b in ranks for key in b]
    assert [key % size for key in sequence[:6]] == [sequence[0]] * 3 + [sequence[3]] * 3  # copies in a row
    assert sequence[:3] == [sequence[0], sequence[0] + size, sequence[0] + 2 * size]


def test_repeated_augmentation_with_mixing_repeats_whole_pairs():
    sequence = [key for ranks in rank_batches(512, 8, 1, unit=2, repeats=2) for b in ranks for key in b]
    first, second = sequence[0], sequence[1]
    assert sequence[:4] == [first, second, first + 512, second + 512]


@pytest.mark.parametrize("unit, repeats", [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_every_sequence_shape_trains_the_same_samples_per_step_on_any_layout(unit, repeats):
    def steps(batch, world, start=0):
        per_rank = rank_batches(600, batch, world, start=start, end=512, unit=unit, repeats=repeats)
        rows = [sorted(sum((ranks[q] for ranks in per_rank), [])) for q in range(len(per_rank[0]))]
        return [sorted(sum(rows[s:s + 16 // (batch * world)], [])) for s in range(0, len(rows), 16 // (batch * world))]

    reference = steps(8, 2)
    assert steps(16, 1) == steps(4, 4) == steps(2, 8) == reference
    assert steps(4, 2, start=64) == reference[4:]


# ------------------------------------------------------------------ weighted sampling (--sampling)

def imbalanced_labels(per_class=(100, 10, 10)):
    return [label for label, count in enumerate(per_class) for _ in range(count)]


def test_class_balanced_sampling_draws_every_class_within_five_percent_of_uniform_over_an_epoch():
    labels = imbalanced_labels((500, 50, 50))  # 10:1
    for epoch in (1, 2, 3):
        sampler = GlobalOrderSampler(len(labels), 8, 0, 1, seed=4, weights=sample_weights(labels, "class_balanced"))
        sampler.set_epoch(epoch)
        counts = np.bincount([labels[key % len(labels)] for _, key in sampler], minlength=3)
        assert abs(counts / counts.sum() - 1 / 3).max() < 0.05, counts
    sampler.set_epoch(1)
    first = [key for _, key in sampler]
    sampler.set_epoch(2)
    assert [key for _, key in sampler] != first  # a new draw each epoch


def test_sqrt_sampling_draws_classes_in_proportion_to_the_square_root_of_their_size():
    labels = imbalanced_labels((900, 100))
    weights = sample_weights(labels, "sqrt")
    counts = np.zeros(2)
    for epoch in range(1, 6):
        sampler = GlobalOrderSampler(len(labels), 10, 0, 1, seed=1, weights=weights)
        sampler.set_epoch(epoch)
        counts += np.bincount([labels[key % len(labels)] for _, key in sampler], minlength=2)
    assert abs(counts[0] / counts.sum() - 30 / 40) < 0.02  # sqrt(900) : sqrt(100) = 30 : 10


@pytest.mark.parametrize("unit, repeats", [(1, 1), (2, 1), (1, 2)])
def test_weighted_draws_are_the_same_samples_per_step_on_any_layout_and_after_a_resume(unit, repeats):
    labels = imbalanced_labels((300, 30, 30))
    weights = sample_weights(labels, "class_balanced")

    def steps(batch, world, start=0):
        per_rank = []
        for rank in range(world):
            sampler = GlobalOrderSampler(len(labels), batch, rank, world, 9, unit=unit, repeats=repeats,
                                         weights=weights)
            sampler.set_epoch(3, start=start, end=352)
            keys = [key for _, key in sampler]
            per_rank.append([keys[i:i + batch] for i in range(0, len(keys), batch)])
        rows = [sorted(sum((ranks[q] for ranks in per_rank), [])) for q in range(len(per_rank[0]))]
        per_step = 16 // (batch * world)
        return [sorted(sum(rows[s:s + per_step], [])) for s in range(0, len(rows), per_step)]

    reference = steps(16, 1)
    assert steps(8, 2) == steps(4, 4) == steps(2, 8) == reference
    assert steps(2, 2, start=64) == reference[4:]  # resumed mid-epoch on another layout


def test_uniform_sampling_has_no_weights_and_keeps_the_permutation():
    assert sample_weights([0, 1, 1], "uniform") is None
    weights = sample_weights([0, 1, 1], "class_balanced")
    assert np.allclose(weights, [1.0, 0.5, 0.5])


@pytest.mark.parametrize("repeats", [1, 2])
def test_an_image_drawn_again_gets_another_key_so_each_draw_is_augmented_differently(repeats):
    labels = imbalanced_labels((300, 3))
    sampler = GlobalOrderSampler(len(labels), 8, 0, 1, seed=2, weights=sample_weights(labels, "class_balanced"),
                                 repeats=repeats)
    sampler.set_epoch(1)
    keys = [key for _, key in sampler]
    assert len(keys) == len(set(keys))  # no two positions share a key (a crop, policy, erase, mix draw)
    rare = [key for key in keys if key % len(labels) >= 300]
    assert len(rare) > 100 and len({key % len(labels) for key in rare}) == 3  # 3 images, drawn ~50 times each
