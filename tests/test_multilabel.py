"""engine/multilabel.py: multi-label metrics equal scikit-learn's, thresholds, loss and weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score

from engine.multilabel import (
    average_precision,
    multilabel_loss,
    multilabel_metrics,
    positive_weights,
    tune_thresholds,
)


def random_case(seed, images=60, classes=5, ties=False):
    rng = np.random.RandomState(seed)
    targets = (rng.rand(images, classes) < 0.3).astype(np.float64)
    scores = np.clip(targets * 0.3 + rng.rand(images, classes) * 0.7, 0, 1)
    if ties:
        scores = np.round(scores, 1)  # many equal scores: sklearn's one point per distinct threshold
    return scores, targets


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_map_and_f1_equal_scikit_learns(seed, ties):
    scores, targets = random_case(seed, ties=ties)
    report = multilabel_metrics(scores, targets)
    assert report["map"] == pytest.approx(100 * average_precision_score(targets, scores, average="macro"), abs=1e-9)
    for c in range(targets.shape[1]):
        assert report["per_class_ap"][c] == pytest.approx(100 * average_precision_score(targets[:, c], scores[:, c]))
    predicted = scores >= 0.5
    assert report["micro_f1"] == pytest.approx(100 * f1_score(targets, predicted, average="micro", zero_division=0))
    assert report["macro_f1"] == pytest.approx(100 * f1_score(targets, predicted, average="macro", zero_division=0))


def test_a_class_without_positives_is_left_out_of_the_map():
    scores, targets = random_case(3)
    targets[:, 2] = 0
    report = multilabel_metrics(scores, targets)
    assert report["per_class_ap"][2] is None and average_precision(scores[:, 2], targets[:, 2]) is None
    kept = [0, 1, 3, 4]
    assert report["map"] == pytest.approx(100 * average_precision_score(targets[:, kept], scores[:, kept]))


def test_tuned_thresholds_give_each_class_its_best_validation_f1():
    scores, targets = random_case(4, images=40)
    thresholds = tune_thresholds(scores, targets)
    for c, threshold in enumerate(thresholds):
        best = max(f1_score(targets[:, c], scores[:, c] >= t, zero_division=0) for t in np.r_[scores[:, c], 0.5])
        assert f1_score(targets[:, c], scores[:, c] >= threshold, zero_division=0) == pytest.approx(best)
    tuned = multilabel_metrics(scores, targets, thresholds)
    assert tuned["macro_f1"] >= multilabel_metrics(scores, targets)["macro_f1"]


def test_the_loss_is_binary_cross_entropy_with_positive_weights_and_smoothing():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.3, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    weights = torch.tensor(positive_weights(targets.numpy()))
    assert weights.tolist() == [1.0, 1.0, 1.0]
    smoothed = targets * 0.9 + 0.05
    p = torch.sigmoid(logits)
    by_hand = -(weights * smoothed * torch.log(p) + (1 - smoothed) * torch.log(1 - p)).mean()
    torch.testing.assert_close(multilabel_loss(logits, targets, weights, 0.1), by_hand)
    torch.testing.assert_close(multilabel_loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def test_balanced_positive_weights_are_negatives_over_positives():
    targets = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 1]])
    assert positive_weights(targets) == [1 / 3, 1.0, 1 / 3]


def test_every_figure_is_a_plain_python_number_so_checkpoints_load_with_weights_only():
    scores, targets = random_case(5)
    report = multilabel_metrics(scores, targets)
    for value in (report["map"], report["micro_f1"], report["macro_f1"], *report["per_class_f1"],
                  *tune_thresholds(scores, targets)):
        assert type(value) is float
