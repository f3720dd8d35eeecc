"""metrics.py: the named running sums of a training epoch, the per-class and class-balanced metrics
(against scikit-learn) and test-time augmentation (against the model run by hand on each view);
exact evaluation across ranks is proven on real torchrun jobs in test_train_ddp.py,
test_classification_metrics.py and test_evaluate.py."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as sk

from dataset import IMAGENET_MEAN, IMAGENET_STD, normalize
from engine.batches import BatchStage
from engine.distributed import DistContext
from engine.metrics import (
    EpochSums,
    Evaluation,
    balanced_accuracy,
    class_report,
    confusion_matrix,
    evaluate_classes,
    macro_f1,
    per_class_metrics,
    tta_log_probabilities,
)
from model import build_model


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


def test_per_class_precision_recall_and_f1_by_hand_with_zero_over_zero_as_zero():
    assert per_class_metrics(CONFUSION) == [
        dict(images=3, predicted=4, correct=2, precision=50.0, recall=200 / 3, f1=400 / 7),
        dict(images=0, predicted=2, correct=0, precision=0.0, recall=0.0, f1=0.0),  # recall 0/0
        dict(images=4, predicted=3, correct=3, precision=100.0, recall=75.0, f1=600 / 7),
        dict(images=2, predicted=0, correct=0, precision=0.0, recall=0.0, f1=0.0),  # precision 0/0
    ]
    assert per_class_metrics([[0, 0], [0, 5]])[0] == dict(images=0, predicted=0, correct=0, precision=0.0, recall=0.0,
                                                          f1=0.0)  # neither present nor predicted: F1 0/0


def test_macro_f1_and_balanced_accuracy_by_hand():
    # F1 over the four classes that occur (class 1 only as a prediction, class 3 only as a label).
    assert macro_f1(CONFUSION) == pytest.approx(100 * (4 / 7 + 0 + 6 / 7 + 0) / 4, rel=1e-15)
    # Recall over the classes with images: 0, 2 and 3.
    assert balanced_accuracy(CONFUSION) == pytest.approx(100 * (2 / 3 + 3 / 4 + 0) / 3, rel=1e-15)
    assert macro_f1(torch.zeros(3, 3)) == balanced_accuracy(torch.zeros(3, 3)) == 0.0  # nothing evaluated


def as_labels(confusion):
    """(true labels, predicted labels) with the confusion matrix's counts."""
    pairs = [(true, predicted) for (true, predicted), count in np.ndenumerate(np.asarray(confusion))
             for _ in range(count)]
    return [true for true, _ in pairs], [predicted for _, predicted in pairs]


def random_confusions():
    """Edge cases (an absent class, a never-predicted one, one neither, all right, all wrong), then
    random matrices of 2 to 8 classes, about 40% of cells empty: many have absent classes too."""
    yield CONFUSION
    yield [[3, 0, 1], [0, 0, 0], [2, 0, 4]]
    yield [[5, 0], [0, 2]]
    yield [[0, 4], [3, 0]]
    rng = np.random.RandomState(0)
    for _ in range(40):
        classes = rng.randint(2, 9)
        counts = rng.randint(1, 6, size=(classes, classes)) * (rng.rand(classes, classes) < 0.6)
        counts[0, rng.randint(classes)] += 1  # at least one image
        yield counts.tolist()


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_macro_f1_balanced_accuracy_and_per_class_metrics_equal_scikit_learns():
    for confusion in random_confusions():
        labels, predicted = as_labels(confusion)
        classes = list(range(len(confusion)))
        assert macro_f1(confusion) == pytest.approx(
            100 * sk.f1_score(labels, predicted, average="macro", zero_division=0), rel=1e-12), confusion
        assert balanced_accuracy(confusion) == pytest.approx(
            100 * sk.balanced_accuracy_score(labels, predicted), rel=1e-12), confusion
        precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                            zero_division=0)
        per_class = per_class_metrics(confusion)
        assert [entry["images"] for entry in per_class] == support.tolist()
        for key, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
            assert [entry[key] for entry in per_class] == pytest.approx(100 * expected, rel=1e-12), (key, confusion)


def test_class_report_names_the_classes_and_totals_the_images():
    report = class_report(torch.tensor(CONFUSION), ["a", "b", "c", "d"], epoch=3, weights="ema")
    assert {key: report[key] for key in ("epoch", "weights", "images", "accuracy", "class_names")} == dict(
        epoch=3, weights="ema", images=9, accuracy=500 / 9, class_names=["a", "b", "c", "d"])
    assert report["confusion_matrix"] == CONFUSION
    assert [entry["name"] for entry in report["per_class"]] == ["a", "b", "c", "d"]
    assert report["per_class"][2] == dict(name="c", images=4, predicted=3, correct=3, precision=100.0, recall=75.0,
                                          f1=600 / 7)
    json.dumps(report)  # plain data


def test_evaluation_metrics_name_top5_only_when_measured():
    confusion = torch.tensor(CONFUSION)
    balanced = dict(macro_f1=macro_f1(confusion), balanced_acc=balanced_accuracy(confusion))
    assert Evaluation(0.5, 40.0, None, confusion).metrics("val_") == dict(
        val_loss=0.5, val_acc=40.0, **{f"val_{name}": value for name, value in balanced.items()})
    assert Evaluation(0.5, 40.0, 90.0, confusion).metrics("ema_val_") == dict(
        ema_val_loss=0.5, ema_val_acc=40.0, ema_val_acc5=90.0,
        **{f"ema_val_{name}": value for name, value in balanced.items()})


# ------------------------------------------------------------------ test-time augmentation

def tiny_model(num_classes=5):
    """A tiny_cnn with fixed weights (not torch's random initialisation). The head's rows sum to
    zero: the pooled ReLU features of every image share a large common part, which would otherwise
    give every image the same class."""
    model = build_model("tiny_cnn", num_classes).eval()
    rng = np.random.RandomState(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.from_numpy(rng.normal(0, 0.3, size=parameter.shape)))
        model.fc.weight -= model.fc.weight.mean(dim=1, keepdim=True)
    return model


def uint8_images(*shape, seed=0):
    """Noise under a brightness of its own per image and channel (the last three dimensions are
    channels, height, width), so that the images' predictions differ."""
    rng = np.random.RandomState(seed)
    levels = rng.randint(20, 256, size=shape[:-2] + (1, 1))
    return torch.from_numpy((rng.rand(*shape) * levels).astype(np.uint8))


@torch.no_grad()
def test_without_tta_the_log_probabilities_give_the_logits_cross_entropy_bit_for_bit():
    model, images, labels = tiny_model(), normalize(uint8_images(6, 3, 12, 12)), torch.tensor([0, 1, 2, 3, 4, 0])
    log_probabilities = tta_log_probabilities(model, images, "none")
    assert torch.equal(F.nll_loss(log_probabilities, labels, reduction="none"),
                       F.cross_entropy(model(images), labels, reduction="none"))
    assert torch.equal(log_probabilities.argmax(dim=1), model(images).argmax(dim=1))


@torch.no_grad()
def test_flip_is_the_mean_softmax_of_the_image_and_its_mirror():
    model, images = tiny_model(), normalize(uint8_images(6, 3, 12, 10))
    by_hand = [(model(image[None]).softmax(dim=1) + model(image[None].flip(-1)).softmax(dim=1)) / 2
               for image in images]  # one image and one pass at a time
    probabilities = tta_log_probabilities(model, images, "flip").exp()
    torch.testing.assert_close(probabilities, torch.cat(by_hand), rtol=0, atol=1e-6)
    assert (probabilities - model(images).softmax(dim=1)).abs().max() > 1e-3  # the mirror changed something


@torch.no_grad()
def test_multi_crop_is_the_mean_softmax_of_its_views():
    model, views = tiny_model(), normalize(uint8_images(4, 5, 3, 8, 8))
    by_hand = torch.stack([torch.stack([model(view[None]).softmax(dim=1)[0] for view in image]).mean(dim=0)
                           for image in views])
    torch.testing.assert_close(tta_log_probabilities(model, views, "multi_crop").exp(), by_hand, rtol=0, atol=1e-6)


def test_the_mean_is_taken_in_log_space_so_a_confidently_wrong_image_keeps_a_finite_loss():
    def certain_of_class_1(images):  # logits (0, 1000) for every view: class 0 has probability e^-1000
        return torch.tensor([[0.0, 1000.0]]).expand(len(images), 2)

    log_probabilities = tta_log_probabilities(certain_of_class_1, torch.zeros(3, 3, 4, 4), "flip")
    assert torch.equal(log_probabilities, torch.tensor([[-1000.0, 0.0]]).expand(3, 2))  # naive mean then log: -inf
    with pytest.raises(ValueError, match="unknown test-time augmentation 'ten_crop'"):
        tta_log_probabilities(certain_of_class_1, torch.zeros(1, 3, 4, 4), "ten_crop")


def test_evaluate_classes_with_flip_scores_the_mean_softmax_and_returns_each_images_prediction():
    model, images, labels = tiny_model(), uint8_images(7, 3, 12, 12, seed=1), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    batches = [(images[:3], labels[:3], torch.arange(3), 0), (images[3:6], labels[3:6], torch.arange(3, 6), 0),
               (images[6:], labels[6:], torch.arange(6, 7), 0)]
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run = SimpleNamespace(stage=BatchStage(ctx.device, IMAGENET_MEAN, IMAGENET_STD, torch.contiguous_format),
                          amp_dtype=torch.float32)
    evaluation = evaluate_classes(model, batches, 7, run, ctx, batch_size=3, use_amp=False, tta="flip")
    with torch.no_grad():
        x = normalize(images)
        by_hand = ((model(x).softmax(dim=1) + model(x.flip(-1)).softmax(dim=1)) / 2).double()
    assert evaluation.predicted.tolist() == by_hand.argmax(dim=1).tolist()
    assert evaluation.loss == pytest.approx(-by_hand[range(7), labels].log().mean().item(), abs=1e-6)
    assert evaluation.acc == 100 * (by_hand.argmax(dim=1) == labels).sum().item() / 7
    assert evaluation.confusion.tolist() == confusion_matrix(labels, by_hand.argmax(dim=1), 5).tolist()
    partial = evaluate_classes(model, batches, 7, run, ctx, batch_size=3, use_amp=False, max_batches=1, tta="flip")
    assert partial.predicted.tolist() == by_hand.argmax(dim=1)[:3].tolist() + [-1] * 4  # -1: not evaluated
    assert math.isclose(partial.loss, -by_hand[range(3), labels[:3]].log().mean().item(), abs_tol=1e-6)
