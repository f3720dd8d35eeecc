"""What the loop measures: the running sums of a training epoch, exact distributed evaluation
(loss, top-1 and top-5 accuracy, confusion matrix), per-class metrics and test-time augmentation.

Both stay on the device while batches go by (adding to them never waits for the GPU); the host
reads them at joint checks, log points and the end of an epoch.

Test-time augmentation (TTA) is one function of a batch (tta_log_probabilities), so training's
validation, evaluate.py and predict.py score an image the same way: the mean of the softmax over
views of it. The views of multi_crop come from the resized, uncropped image, which only a loader
that opens the file itself has (tta_views); training's loaders deliver center crops, so its
validation offers none and flip.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from dataset import load_eval, open_resized
from engine.distributed import JointChecks, all_reduce_sum
from model import last_linear_name

TTA_MODES = ("none", "flip", "multi_crop")


class EpochSums:
    """One rank's running training sums of the epoch in progress, as named 0-dim views of one
    float64 tensor on the device: one all-reduce sums them, one copy saves them mid-epoch."""

    FIELDS = ("loss", "correct", "seen", "skipped_images", "nonfinite_steps", "nonfinite_streak",
              "learning_rate")
    SUMMED = FIELDS[:4]  # over ranks; the non-finite counters and the learning rate agree already

    def __init__(self, device, saved=None):
        self.values = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        if saved is not None:
            self.values.copy_(torch.tensor([saved.get(name, 0.0) for name in self.FIELDS], dtype=torch.float64))
        for position, name in enumerate(self.FIELDS):
            setattr(self, name, self.values[position])
        self.seen_before, self.seconds = 0.0, 0.0  # set by the loop: what this process trained, and how long

    @classmethod
    def resume(cls, device, partials, rank, world_size):
        """This rank's sums at the start of an epoch: zero, or its share of a mid-epoch checkpoint's
        (every rank's, in rank order). On another number of processes rank 0 takes all of them
        (the totals are all-reduced sums either way); the other fields agree across ranks."""
        if not partials:
            return cls(device)
        # Checkpoints before named sums hold six-slot tensors: the first six fields, in order.
        partials = [p if isinstance(p, dict) else dict(zip(cls.FIELDS, p.tolist())) for p in partials]
        if len(partials) == world_size:
            return cls(device, partials[rank])
        carried = dict(partials[0])
        for name in cls.SUMMED:
            carried[name] = sum(partial[name] for partial in partials) if rank == 0 else 0.0
        return cls(device, carried)

    def add_batch(self, loss, logits, labels, skipped):
        """A micro-batch's loss and hits: the top class is the label, or with multi-label targets
        (B, classes) every class's sigmoid is on the target's side of 1/2 (exact match)."""
        self.loss += loss.detach().double() * len(labels)
        if labels.dim() == 2:
            self.correct += ((logits > 0) == (labels > 0.5)).all(dim=1).sum()
        else:
            self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += len(labels)
        self.skipped_images += skipped

    def add_update(self, nonfinite, learning_rate):
        """After an optimizer step: count a skipped non-finite step and the streak of them."""
        self.nonfinite_steps += nonfinite
        self.nonfinite_streak.add_(1).mul_(nonfinite)
        self.learning_rate.fill_(learning_rate)

    def to_saved(self):
        """Plain floats by name, for a mid-epoch checkpoint (a host sync: only when saving)."""
        return dict(zip(self.FIELDS, self.values.tolist()))

    def epoch_totals(self):
        """The epoch's metrics over all ranks; throughput counts only the samples this process
        trained, over `seconds` (`seen_before` were trained before a resume)."""
        seen_timed = self.seen - self.seen_before
        totals = all_reduce_sum(torch.stack([getattr(self, name) for name in self.SUMMED] + [seen_timed]))
        loss, correct, seen, skipped, seen_timed = totals.tolist()
        return dict(train_loss=loss / seen, train_acc=100 * correct / seen, learning_rate=self.learning_rate.item(),
                    samples_per_second=seen_timed / max(self.seconds, 1e-9), skipped_images=int(skipped),
                    nonfinite_steps=int(self.nonfinite_steps.item()))


@dataclass
class Evaluation:
    """One model's exact validation over all ranks."""
    loss: float
    acc: float                # top-1 accuracy, %
    acc5: float | None        # top-5 accuracy, %; None with 5 classes or fewer (it would always be 100)
    confusion: torch.Tensor   # int64 [true class, predicted class] counts of the evaluated images, on the CPU
    predicted: torch.Tensor | None = None  # int64 per dataset item: its predicted class, -1 if not evaluated; CPU

    def metrics(self, prefix):
        """The epoch record's entries: {prefix}loss, {prefix}acc, {prefix}macro_f1, {prefix}balanced_acc
        and, with top-5, {prefix}acc5."""
        values = {f"{prefix}loss": self.loss, f"{prefix}acc": self.acc, f"{prefix}macro_f1": macro_f1(self.confusion),
                  f"{prefix}balanced_acc": balanced_accuracy(self.confusion)}
        if self.acc5 is not None:
            values[f"{prefix}acc5"] = self.acc5
        return values


def evaluate(model, loader, dataset_size, training, ctx, batch_size, use_amp, max_batches=0, stop=None):
    """Exact global (loss, accuracy %) of `model` (evaluate_classes); None when stopped."""
    evaluation = evaluate_classes(model, loader, dataset_size, training, ctx, batch_size, use_amp, max_batches, stop)
    return None if evaluation is None else (evaluation.loss, evaluation.acc)


@torch.no_grad()
def evaluate_classes(model, loader, dataset_size, training, ctx, batch_size, use_amp, max_batches=0, stop=None,
                     tta="none"):
    """Exact global loss, top-1 and top-5 accuracy and confusion matrix, as an Evaluation. Each
    rank fills its own samples' slots of dataset-sized vectors (its shard is
    distributed.validation_shard); the all-reduce adds zeros elsewhere, so every rank ends with
    the same per-sample values (loss, hits, true and predicted label) a one-process run computes,
    summed in the same order. Runs on the unwrapped model on every rank: no collective inside the
    forward. Images not evaluated (--limit_val_batches, unreadable with --skip_bad_images) are
    left out of the sums, the count and the confusion matrix. `batch_size`: the loader's, per
    process; `max_batches`: at most that many batches per process (0: all). `training`: anything
    with the run's `stage` (a BatchStage) and `amp_dtype`.

    `tta` (TTA_MODES): images are scored by the mean softmax of their views
    (tta_log_probabilities); the loss is the negative log of that mean at the true class, the
    prediction its argmax. multi_crop needs a loader of tta_views' five-crop stacks.

    With `stop` (a StopRequest), the ranks check jointly about every 0.25 s whether to stop, at
    batches every rank reaches (shards differ by one image at most); None when they stop."""
    model.eval()
    num_classes = model.get_submodule(last_linear_name(model)).out_features
    # Rows: loss, top-1 hit, top-5 hit, true label, predicted label, evaluated (1) or not (0).
    per_sample = torch.zeros(6, dataset_size, device=ctx.device, dtype=torch.float64)
    for batch in evaluation_batches(loader, dataset_size, ctx, batch_size, max_batches, stop):
        if batch is None:
            return None
        images, labels, indices = batch
        images, labels = training.stage.eval_batch(images, labels)
        indices = indices.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=training.amp_dtype, enabled=use_amp):
            log_probabilities = tta_log_probabilities(model, images, tta)
        predicted = log_probabilities.argmax(dim=1)
        top5_hits = (log_probabilities.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(dim=1)
        # Without TTA this is F.cross_entropy of the logits, bit for bit (it is log_softmax, then nll_loss).
        columns = (F.nll_loss(log_probabilities, labels, reduction="none"), predicted == labels, top5_hits,
                   labels, predicted, torch.ones_like(labels))
        per_sample[:, indices] = torch.stack([column.double() for column in columns])
    all_reduce_sum(per_sample)  # one collective for all six vectors
    losses, hits, top5_hits, labels, predicted, evaluated = per_sample
    count = max(evaluated.sum().item(), 1)
    done = evaluated.bool()
    confusion = confusion_matrix(labels[done].long(), predicted[done].long(), num_classes)
    return Evaluation(losses.sum().item() / count, 100 * hits.sum().item() / count,
                      100 * top5_hits.sum().item() / count if num_classes > 5 else None, confusion.cpu(),
                      torch.where(done, predicted, -1).long().cpu())


def tta_log_probabilities(model, images, mode="none"):
    """The log of each image's class probabilities, float32 (N, classes), under test-time
    augmentation `mode` (TTA_MODES): the mean of the softmax over its views. none: the image
    alone (log_softmax of the logits); flip: the image and its horizontal mirror; multi_crop:
    `images` is (N, 5, C, H, W), tta_views' five crops of each image, normalised. All views go
    through the model in one batch. The mean is taken in log space (logsumexp - log views), so
    the loss of a confidently wrong image stays finite where its mean probability would round to 0."""
    if mode == "none":
        return model(images).float().log_softmax(dim=1)
    if mode == "flip":
        views = torch.cat((images, images.flip(-1)))  # all images, then all mirrors
        log_probabilities = model(views).float().log_softmax(dim=1).unflatten(0, (2, len(images)))
    elif mode == "multi_crop":
        log_probabilities = model(images.flatten(0, 1)).float().log_softmax(dim=1)
        log_probabilities = log_probabilities.unflatten(0, images.shape[:2]).transpose(0, 1)
    else:
        raise ValueError(f"unknown test-time augmentation {mode!r}; expected one of {', '.join(TTA_MODES)}")
    return log_probabilities.logsumexp(dim=0) - math.log(len(log_probabilities))


def tta_views(path, preprocessing, mode="none"):
    """The uint8 views tta_log_probabilities scores for the image file at `path`, under a
    checkpoint's `preprocessing` (engine.checkpoint.checkpoint_preprocessing): validation's center
    crop (dataset.load_eval), (3, H, W), for none and flip (the mirror is made on the device);
    for multi_crop, torchvision's FiveCrop of the image resized to resize_size (four corners,
    then the center, which is validation's crop), stacked (5, 3, H, W). Without its mirrors:
    flip and the crops are separate modes, so each one's effect can be measured on its own."""
    image_size, resize_size = preprocessing["image_size"], preprocessing["resize_size"]
    if mode != "multi_crop":
        return TF.pil_to_tensor(load_eval(path, image_size, resize_size))
    return torch.stack([TF.pil_to_tensor(crop) for crop in TF.five_crop(open_resized(path, resize_size), image_size)])


def evaluation_batches(loader, dataset_size, ctx, batch_size, max_batches=0, stop=None):
    """This rank's evaluation batches (images, labels, indices), at most `max_batches` (0: all).
    With `stop` (a StopRequest) the ranks check jointly about every 0.25 s, at batches every rank
    reaches (shards differ by one image at most); when they agree to stop, None comes instead of
    the next batch, and no more."""
    max_batches = max_batches or len(loader)
    shared_batches = min(max_batches, math.ceil(dataset_size // ctx.world_size / batch_size))
    checks = JointChecks(ctx.device) if stop is not None else None
    for batch_index, (images, labels, indices, _) in enumerate(loader):
        if batch_index == max_batches:
            return
        if checks and batch_index < shared_batches and checks.due(batch_index + 1, last_of_epoch=False):
            if checks.run(batch_index + 1, stop, 0, ctx.is_main)[0]:
                yield None
                return
        yield images, labels, indices


def confusion_matrix(labels, predicted, num_classes):
    """[true class, predicted class] counts, int64."""
    pairs = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return pairs.view(num_classes, num_classes)


def per_class_metrics(confusion):
    """Per class (rows: true class, columns: predicted class): its images, the images predicted
    as it, the correct ones, precision, recall and F1 in %. A class's recall is its accuracy (the
    share of its images predicted correctly); F1 is the harmonic mean of precision and recall,
    2 correct / (images + predicted). 0/0 counts as 0: the precision of a class never predicted,
    the recall of a class without images, the F1 of a class neither present nor predicted
    (scikit-learn's precision_recall_fscore_support with zero_division=0)."""
    confusion = torch.as_tensor(confusion, dtype=torch.int64)
    metrics = []
    for images, predicted, correct in zip(confusion.sum(dim=1).tolist(), confusion.sum(dim=0).tolist(),
                                          confusion.diagonal().tolist()):
        metrics.append(dict(images=images, predicted=predicted, correct=correct,
                            precision=100 * correct / predicted if predicted else 0.0,
                            recall=100 * correct / images if images else 0.0,
                            f1=200 * correct / (images + predicted) if images + predicted else 0.0))
    return metrics


def macro_f1(confusion):
    """The unweighted mean of the classes' F1 scores, in %, over the classes that occur as a true or
    a predicted label (scikit-learn's f1_score(average="macro"); 0/0 counts as 0): rare classes
    weigh as much as common ones."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    correct, images, predicted = confusion.diagonal(), confusion.sum(dim=1), confusion.sum(dim=0)
    present = (images + predicted) > 0
    f1 = torch.where(present, 2 * correct / (images + predicted).clamp(min=1), 0.0)
    return 100 * f1[present].mean().item() if present.any() else 0.0


def balanced_accuracy(confusion):
    """The mean of the per-class recalls, in %, over the classes that have images (scikit-learn's
    balanced_accuracy_score): plain accuracy of a model that ignores rare classes looks good, this
    does not."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    images = confusion.sum(dim=1)
    present = images > 0
    return 100 * (confusion.diagonal()[present] / images[present]).mean().item() if present.any() else 0.0


def class_report(confusion, class_names, epoch, weights):
    """The best checkpoint's per-class metrics as plain data (log_dir/best_per_class.json);
    `weights` says which model was evaluated: "model", or "ema" (the monitored one with an EMA)."""
    per_class = per_class_metrics(confusion)
    images = sum(entry["images"] for entry in per_class)
    correct = sum(entry["correct"] for entry in per_class)
    return dict(epoch=epoch, weights=weights, images=images, accuracy=100 * correct / images if images else 0.0,
                class_names=list(class_names), confusion_matrix=torch.as_tensor(confusion).tolist(),
                per_class=[dict(name=name, **entry) for name, entry in zip(class_names, per_class)])
