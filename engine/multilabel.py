"""Multi-label classification (--multi_label): an image carries any number of the classes. Each
class is its own yes/no question: sigmoid outputs, binary cross-entropy (with --pos_weight), and
metrics of ranked scores and thresholds, each equal to scikit-learn's:

- mAP: the mean over classes of average precision (sklearn's average_precision_score, macro), the
  area under a class's precision-recall steps, independent of any threshold;
- micro and macro F1 of the predictions above a threshold (0.5, or the per-class thresholds tuned
  on validation, which checkpoints keep for predict.py and export.py).

Evaluation gathers every image's probabilities on every rank (metrics.py's per-sample scheme), so
the figures are the same on any number of processes.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.distributed import all_reduce_sum
from engine.metrics import evaluation_batches

DEFAULT_THRESHOLD = 0.5


def positive_weights(targets):
    """--pos_weight balanced: per class, negatives / positives among the training images (BCE's
    pos_weight), so a rare label's misses weigh as much as its many negatives; 1 for a class with
    no positive or no negative image."""
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    return np.where((positives > 0) & (negatives > 0), negatives / np.maximum(positives, 1), 1.0).tolist()


def multilabel_loss(logits, targets, pos_weight=None, label_smoothing=0.0):
    """Binary cross-entropy of every (image, class) pair, averaged; targets in [0, 1] (mixing
    makes them fractional), smoothed towards 1/2 by label_smoothing."""
    targets = targets.to(logits.dtype) * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


def average_precision(scores, positives):
    """scikit-learn's average_precision_score for one class: sum over distinct score thresholds,
    from the highest, of (recall step) x precision. None when the class has no positive (sklearn
    warns and returns 0 for it; it is left out of the mean here and said so in the report)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    total = positives.sum()
    if total == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # one point per distinct score
    true_positives = np.cumsum(positives)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_scores(predicted, targets):
    """(micro F1, macro F1, per-class F1) of boolean predictions, in %, 0/0 as 0 (sklearn's
    zero_division=0)."""
    predicted, targets = np.asarray(predicted, dtype=bool), np.asarray(targets, dtype=bool)
    hits = (predicted & targets).sum(axis=0)
    predicted_count, actual = predicted.sum(axis=0), targets.sum(axis=0)
    per_class = np.where(predicted_count + actual > 0, 2 * hits / np.maximum(predicted_count + actual, 1), 0.0)
    denominator = predicted_count.sum() + actual.sum()
    micro = 2 * hits.sum() / denominator if denominator else 0.0
    return 100 * float(micro), 100 * float(per_class.mean()), (100 * per_class).tolist()


def tune_thresholds(probabilities, targets):
    """Per class, the threshold among its validation scores (and 0.5) that gives the best F1 on
    validation; ties keep the higher threshold. Used for predictions after training. Each class
    costs one sort: for every candidate t the images predicted (score >= t) and the hits among
    them are counts above t in the sorted scores."""
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets, dtype=bool)
    thresholds = []
    for scores, positives in zip(probabilities.T, targets.T):
        order = np.argsort(scores, kind="mergesort")
        ascending, hits_above = scores[order], np.r_[np.cumsum(positives[order][::-1])[::-1], 0]
        candidates = np.unique(np.r_[scores, DEFAULT_THRESHOLD])[::-1]
        first = np.searchsorted(ascending, candidates, side="left")  # the first score >= t
        predicted, hits = len(scores) - first, hits_above[first]
        total = predicted + positives.sum()
        f1 = np.where(total > 0, 2 * hits / np.maximum(total, 1), 0.0)
        thresholds.append(float(candidates[int(np.argmax(f1))]))
    return thresholds


def multilabel_metrics(probabilities, targets, thresholds=None):
    """The validation report of sigmoid `probabilities` (N, C) against 0/1 `targets`: mAP (macro,
    over classes with a positive), micro and macro F1 at `thresholds` (per class; default 0.5), and
    per-class AP and F1, all in %."""
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets) > 0.5
    thresholds = np.full(probabilities.shape[1], DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds)
    per_class_ap = [average_precision(scores, positives) for scores, positives in zip(probabilities.T, targets.T)]
    scored = [ap for ap in per_class_ap if ap is not None]
    micro, macro, per_class_f1 = f1_scores(probabilities >= thresholds, targets)
    return dict(map=100 * float(np.mean(scored)) if scored else 0.0, micro_f1=micro, macro_f1=macro,
                per_class_ap=[None if ap is None else 100 * ap for ap in per_class_ap], per_class_f1=per_class_f1)


def multilabel_report(evaluation, class_names, epoch, weights):
    """The best checkpoint's per-class figures as plain data (log_dir/best_per_class.json): AP and
    F1 at 1/2, and the tuned threshold, per class; `weights`: "model" or "ema"."""
    report = evaluation.report
    per_class = [dict(name=name, ap=ap, f1=f1, threshold=threshold) for name, ap, f1, threshold
                 in zip(class_names, report["per_class_ap"], report["per_class_f1"], evaluation.thresholds)]
    return dict(epoch=epoch, weights=weights, multi_label=True, map=report["map"], micro_f1=report["micro_f1"],
                macro_f1=report["macro_f1"], exact_match_accuracy=evaluation.acc, class_names=list(class_names),
                per_class=per_class)


@dataclass
class MultiLabelEvaluation:
    """One model's exact multi-label validation over all ranks."""
    loss: float
    acc: float             # exact-match accuracy (every label of the image right at the thresholds), %
    report: dict           # multilabel_metrics at the default threshold: map, micro_f1, macro_f1, per class
    thresholds: list       # per class, tuned on this validation (tune_thresholds)
    confusion = None       # no confusion matrix: the single-label report's per-class table does not apply

    def metrics(self, prefix):
        """The epoch record's entries: loss, exact-match acc, mAP, micro and macro F1 (at 0.5)."""
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.acc, f"{prefix}map": self.report["map"],
                f"{prefix}micro_f1": self.report["micro_f1"], f"{prefix}macro_f1": self.report["macro_f1"]}


@torch.no_grad()
def evaluate_multilabel(model, loader, dataset_size, num_classes, training, ctx, batch_size, use_amp, max_batches=0,
                        stop=None):
    """Exact multi-label validation, as metrics.evaluate_classes does it for one label: every rank
    writes its images' sigmoid probabilities, targets and BCE into their slots of dataset-sized
    rows, one all-reduce gives every rank all of them, and the metrics are computed from those
    (the same on every rank, and on any number of processes). None when the ranks stop on a signal."""
    model.eval()
    classes = num_classes
    # Per sample: C probabilities, C targets, loss, evaluated (1) or not (0).
    rows = torch.zeros(2 * classes + 2, dataset_size, device=ctx.device, dtype=torch.float64)
    for batch in evaluation_batches(loader, dataset_size, ctx, batch_size, max_batches, stop):
        if batch is None:
            return None
        images, labels, indices = batch
        images, labels = training.stage.eval_batch(images, labels)
        with torch.autocast(ctx.device.type, dtype=training.amp_dtype, enabled=use_amp):
            logits = model(images)
        logits, labels = logits.float(), labels.float()
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
        columns = torch.cat([torch.sigmoid(logits), labels, losses[:, None], torch.ones_like(losses)[:, None]], dim=1)
        rows[:, indices.to(ctx.device)] = columns.double().T
    all_reduce_sum(rows)
    done = rows[-1].bool().cpu()
    probabilities, targets = rows[:classes].T.cpu()[done].numpy(), rows[classes:2 * classes].T.cpu()[done].numpy()
    count = max(int(done.sum()), 1)
    thresholds = tune_thresholds(probabilities, targets)
    exact = int(((probabilities >= DEFAULT_THRESHOLD) == (targets > 0.5)).all(axis=1).sum())
    return MultiLabelEvaluation(rows[2 * classes].sum().item() / count, 100 * exact / count,
                                multilabel_metrics(probabilities, targets), thresholds)
