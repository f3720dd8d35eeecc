"""engine/losses.py: the training loss (cross-entropy or focal, smoothed, class-weighted, hard or
soft targets) against its formula, and --class_weights against scikit-learn."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from core.errors import ConfigError
from engine.losses import class_weight_values, training_loss

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 4.0, 1.0], [0.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 2, 1, 1])


def focal_by_hand(logits, targets, gamma, weights=None):
    """-sum_c w_c t_c (1 - p_c)^gamma log p_c, averaged over the batch, one sample at a time."""
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist()):
        probabilities = np.exp(row) / np.exp(row).sum()
        for c, (p, t) in enumerate(zip(probabilities, target)):
            total -= (weights[c] if weights is not None else 1.0) * t * (1 - p) ** gamma * np.log(p)
    return total / len(logits)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_loss_equals_its_formula_for_hard_labels_with_smoothing_and_class_weights(smoothing, gamma):
    targets = F.one_hot(LABELS, 3).double() * (1 - smoothing) + smoothing / 3
    weights = [0.5, 2.0, 1.0]
    got = training_loss(LOGITS, LABELS, smoothing, torch.tensor(weights), "focal", gamma)
    assert got.item() == pytest.approx(focal_by_hand(LOGITS, targets, gamma, weights), rel=1e-6)


def test_focal_loss_takes_mixed_soft_targets_and_with_gamma_zero_is_soft_cross_entropy():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    assert training_loss(LOGITS, soft, 0.0, None, "focal", 2.0).item() == pytest.approx(
        focal_by_hand(LOGITS, soft, 2.0), rel=1e-6)
    torch.testing.assert_close(training_loss(LOGITS, soft, 0.1, None, "focal", 0.0),
                               F.cross_entropy(LOGITS, soft, label_smoothing=0.1))


def test_focal_loss_weighs_confident_right_examples_less_than_cross_entropy_does():
    confident = torch.tensor([[6.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 1.0, 0.0]])
    label = torch.tensor([0])
    ratio_easy = training_loss(confident, label, loss="focal") / training_loss(confident, label)
    ratio_hard = training_loss(hard, label, loss="focal") / training_loss(hard, label)
    assert ratio_easy < 0.01 < 0.3 < ratio_hard


def test_cross_entropy_is_torchs_with_the_class_weights():
    weights = torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(training_loss(LOGITS, LABELS, 0.1, weights),
                               F.cross_entropy(LOGITS, LABELS, weight=weights, label_smoothing=0.1))


def test_balanced_class_weights_equal_scikit_learns():
    labels = [0] * 50 + [1] * 5 + [2] * 20
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    assert np.allclose(class_weight_values("balanced", labels, ["a", "b", "c"]), expected)
    assert class_weight_values("none", labels, ["a", "b", "c"]) is None


def test_class_weights_from_a_file_follow_the_class_order_and_must_name_every_class(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"cat": 2.0, "dog": 0.5}))
    assert class_weight_values(str(path), [0, 1], ["dog", "cat"]) == [0.5, 2.0]
    with pytest.raises(ConfigError, match="has no weight for bird"):
        class_weight_values(str(path), [0, 1], ["dog", "cat", "bird"])
    with pytest.raises(ConfigError, match=r"names classes the data does not have \(cat\)"):
        class_weight_values(str(path), [0], ["dog"])
    path.write_text(json.dumps({"cat": -1}))
    with pytest.raises(ConfigError, match="positive numbers"):
        class_weight_values(str(path), [0], ["cat"])
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read --class_weights"):
        class_weight_values(str(path), [0], ["cat"])
