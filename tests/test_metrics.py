"""metrics.py: the named running sums of a training epoch and the per-class metrics (exact
evaluation across ranks is proven on real torchrun jobs in test_train_ddp.py and
test_classification_metrics.py)."""
import json

import torch

from engine.metrics import EpochSums, Evaluation, class_report, confusion_matrix, per_class_metrics


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
    cpu = torch.device("cpu")
    assert EpochSums(cpu, saved).to_saved() == saved
    resumed = EpochSums.resume(cpu, [saved, dict(saved, loss=0.5)], rank=1, world_size=2)
    assert resumed.to_saved() == dict(saved, loss=0.5)
    six_slots = torch.tensor([1.5, 2.0, 3.0, 1.0, 2.0, 0.0], dtype=torch.float64)  # before named sums
    assert EpochSums.resume(cpu, [six_slots], rank=0, world_size=1).to_saved() == dict(saved, learning_rate=0.0)


def test_on_another_number_of_processes_rank_0_carries_every_ranks_partial_sums():
    cpu = torch.device("cpu")
    partials = [dict(loss=1.0, correct=2.0, seen=4.0, skipped_images=0.0, nonfinite_steps=1.0, nonfinite_streak=0.0,
                     learning_rate=0.1),
                dict(loss=3.0, correct=1.0, seen=4.0, skipped_images=1.0, nonfinite_steps=1.0, nonfinite_streak=0.0,
                     learning_rate=0.1)]
    assert EpochSums.resume(cpu, partials, rank=0, world_size=1).to_saved() == dict(
        loss=4.0, correct=3.0, seen=8.0, skipped_images=1.0, nonfinite_steps=1.0, nonfinite_streak=0.0,
        learning_rate=0.1)
    on_three = [EpochSums.resume(cpu, partials, rank, world_size=3).to_saved() for rank in range(3)]
    assert [s["seen"] for s in on_three] == [8.0, 0.0, 0.0] and all(s["nonfinite_steps"] == 1.0 for s in on_three)


def test_epoch_totals_in_one_process_are_means_over_the_seen_samples():
    sums = EpochSums(torch.device("cpu"), dict(loss=3.0, correct=4.0, seen=8.0, skipped_images=0.0, nonfinite_steps=1.0,
                                                nonfinite_streak=0.0, learning_rate=0.1))
    sums.seen_before, sums.seconds = 6.0, 0.5
    totals = sums.epoch_totals()
    assert totals == dict(train_loss=3.0 / 8, train_acc=50.0, learning_rate=0.1, samples_per_second=4.0,
                          skipped_images=0, nonfinite_steps=1)


# ------------------------------------------------------------------ per-class metrics

# Rows: true class, columns: predicted class. Class 1 has no images, class 3 is never predicted.
CONFUSION = [[2, 1, 0, 0],
             [0, 0, 0, 0],
             [1, 0, 3, 0],
             [1, 1, 0, 0]]


def test_confusion_matrix_counts_true_and_predicted_label_pairs():
    labels, predicted = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 0])
    assert confusion_matrix(labels, predicted, num_classes=3).tolist() == [[2, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_per_class_precision_and_recall_by_hand_with_zero_over_zero_as_zero():
    assert per_class_metrics(CONFUSION) == [
        dict(images=3, predicted=4, correct=2, precision=50.0, recall=200 / 3),
        dict(images=0, predicted=2, correct=0, precision=0.0, recall=0.0),  # recall 0/0
        dict(images=4, predicted=3, correct=3, precision=100.0, recall=75.0),
        dict(images=2, predicted=0, correct=0, precision=0.0, recall=0.0),  # precision 0/0
    ]


def test_class_report_names_the_classes_and_totals_the_images():
    report = class_report(torch.tensor(CONFUSION), ["a", "b", "c", "d"], epoch=3, weights="ema")
    assert {key: report[key] for key in ("epoch", "weights", "images", "accuracy", "class_names")} == dict(
        epoch=3, weights="ema", images=9, accuracy=500 / 9, class_names=["a", "b", "c", "d"])
    assert report["confusion_matrix"] == CONFUSION
    assert [entry["name"] for entry in report["per_class"]] == ["a", "b", "c", "d"]
    assert report["per_class"][2] == dict(name="c", images=4, predicted=3, correct=3, precision=100.0, recall=75.0)
    json.dumps(report)  # plain data


def test_evaluation_metrics_name_top5_only_when_measured():
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    assert Evaluation(0.5, 40.0, None, confusion).metrics("val_") == dict(val_loss=0.5, val_acc=40.0)
    assert Evaluation(0.5, 40.0, 90.0, confusion).metrics("ema_val_") == dict(
        ema_val_loss=0.5, ema_val_acc=40.0, ema_val_acc5=90.0)
