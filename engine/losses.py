"""The training loss: cross-entropy or focal loss, with --label_smoothing, per-class weights
(--class_weights) and hard or soft (mixed) targets. Validation stays plain cross-entropy.

Focal loss (Lin et al., 2017) scales each class's log-likelihood term by (1 - p)^gamma, so
confidently right examples weigh little and the rare, hard ones dominate the gradient. Written
for probability targets, -sum_c w_c t_c (1 - p_c)^gamma log p_c, it covers hard labels (one-hot),
smoothed labels and mixup/cutmix targets alike; gamma 0 is weighted cross-entropy.
"""
import json
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from engine.multilabel import multilabel_loss, positive_weights


def loss_weights(args, labels, class_names):
    """The per-class weights of the run's training loss, or None: --class_weights, or with
    --multi_label the BCE's --pos_weight (`labels`: the training images' classes or label rows)."""
    if args.multi_label:
        return positive_weights(labels) if args.pos_weight == "balanced" else None
    return class_weight_values(args.class_weights, labels, class_names)


def build_criterion(args, weights, device):
    """(logits, targets) -> the run's training loss: multilabel_loss with --multi_label, else
    training_loss with --loss, --label_smoothing and the per-class `weights` (loss_weights)."""
    weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    if args.multi_label:
        return partial(multilabel_loss, pos_weight=weights, label_smoothing=args.label_smoothing)
    return partial(training_loss, label_smoothing=args.label_smoothing, weights=weights, loss=args.loss,
                   focal_gamma=args.focal_gamma)


def class_weight_values(spec, labels, class_names):
    """--class_weights as a list of floats in class order, or None: `balanced` gives class c the
    weight n_images / (n_classes x images of c) (scikit-learn's compute_class_weight), a JSON file
    maps every class name to a weight."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(labels), minlength=len(class_names)).astype(np.float64)
        return (len(labels) / (len(class_names) * np.maximum(counts, 1))).tolist()
    given = read_class_weights(spec)
    unknown = sorted(set(given) - set(class_names))
    missing = [name for name in class_names if name not in given]
    if unknown or missing:
        problem = (f"names classes the data does not have ({', '.join(unknown[:5])})" if unknown
                   else f"has no weight for {', '.join(missing[:5])}")
        raise ConfigError(f"--class_weights {spec} {problem}; it must map each of the {len(class_names)} class "
                          "names to a weight")
    return [float(given[name]) for name in class_names]


def read_class_weights(path):
    """A JSON file's {class name: positive weight}; a ConfigError in one line otherwise."""
    try:
        with open(path) as f:
            weights = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --class_weights {path} ({getattr(exc, 'strerror', None) or exc}); give "
                          "none, balanced, or a JSON file mapping class names to weights") from None
    if not isinstance(weights, dict) or not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                                                and value > 0 for value in weights.values()):
        raise ConfigError(f"--class_weights {path} must hold a JSON object mapping class names to positive numbers")
    return weights


def training_loss(logits, targets, label_smoothing=0.0, weights=None, loss="ce", focal_gamma=2.0):
    """The batch's mean training loss. `targets`: class indices, or (B, classes) probabilities
    (mixing); `weights`: per-class weights on the logits' device, or None. Cross-entropy is
    torch's (its weighted mean over hard labels divides by the labels' weights)."""
    if loss == "ce":
        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing)
    classes = logits.shape[1]
    if targets.dim() == 1:
        targets = F.one_hot(targets, classes).to(logits.dtype)
    targets = targets * (1 - label_smoothing) + label_smoothing / classes
    log_probabilities = F.log_softmax(logits.float(), dim=1)
    terms = targets * (1 - log_probabilities.exp()).pow(focal_gamma) * log_probabilities
    if weights is not None:
        terms = terms * weights
    return -terms.sum(dim=1).mean()
