"""metrics.py: the named running sums of a training epoch (exact evaluation across ranks is proven
on real torchrun jobs in test_train_ddp.py)."""
import torch

from metrics import EpochSums


def test_epoch_sums_add_batches_and_updates_under_their_names():
    sums = EpochSums(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    sums.add_batch(torch.tensor(0.5), logits, torch.tensor([0, 1, 1]), skipped=1)
    sums.add_update(torch.tensor(True), learning_rate=0.01)
    sums.add_update(torch.tensor(True), learning_rate=0.02)
    assert sums.to_saved() == dict(loss=1.5, correct=2.0, seen=3.0, skipped_images=1.0, nonfinite_steps=2.0,
                                   nonfinite_streak=2.0, learning_rate=0.02)
    sums.add_update(torch.tensor(False), learning_rate=0.03)  # a finite step ends the streak
    assert (sums.nonfinite_steps.item(), sums.nonfinite_streak.item()) == (2.0, 0.0)


def test_epoch_sums_continue_from_a_saved_partial_epoch_of_either_format():
    saved = dict(loss=1.5, correct=2.0, seen=3.0, skipped_images=1.0, nonfinite_steps=2.0, nonfinite_streak=0.0,
                 learning_rate=0.02)
    assert EpochSums(torch.device("cpu"), saved).to_saved() == saved
    six_slots = torch.tensor([1.5, 2.0, 3.0, 1.0, 2.0, 0.0], dtype=torch.float64)  # before named sums
    assert EpochSums(torch.device("cpu"), six_slots).to_saved() == dict(saved, learning_rate=0.0)


def test_epoch_totals_in_one_process_are_means_over_the_seen_samples():
    sums = EpochSums(torch.device("cpu"), dict(loss=3.0, correct=4.0, seen=8.0, skipped_images=0.0, nonfinite_steps=1.0,
                                                nonfinite_streak=0.0, learning_rate=0.1))
    totals = sums.epoch_totals(seen_before=6.0, seconds=0.5)
    assert totals == dict(train_loss=3.0 / 8, train_acc=50.0, learning_rate=0.1, samples_per_second=4.0,
                          skipped_images=0, nonfinite_steps=1)
