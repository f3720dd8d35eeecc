"""Top-5 accuracy, macro-F1, balanced accuracy and the best checkpoint's per-class metrics
(log_dir/best_per_class.json), proven on real runs: one process and real torchrun count every
validation image exactly once, and scikit-learn computes the same numbers from the predictions."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import data_flags, run_cli, torchrun, train_cmd
from PIL import Image
from sklearn import metrics as sk

import train_ddp

SEVEN_CLASSES = tuple(f"class{k}" for k in range(7))


def write_seven_class_folder(root, per_class, seed):
    """Class k: noise dominated by colour channel k % 3, with a bright band whose width grows with k // 3."""
    rng = np.random.RandomState(seed)
    for k, name in enumerate(SEVEN_CLASSES):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            pixels = rng.randint(0, 90, size=(20, 24, 3)).astype(np.uint8)
            pixels[..., k % 3] = rng.randint(160, 256, size=(20, 24))
            pixels[:, : 4 * (k // 3)] = 255
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:03d}.png"))
    return root


def make_seven_class_data(root):
    """train: 7 classes x 4 images; val: 7 x 2 minus one = 13 images (shards of 7 and 6 on 2 ranks)."""
    train = write_seven_class_folder(os.path.join(root, "train"), per_class=4, seed=0)
    val = write_seven_class_folder(os.path.join(root, "val"), per_class=2, seed=1)
    os.remove(os.path.join(val, "class3", "001.png"))
    return dict(train_dir=train, val_dir=val)


def read_run(out):
    history = json.load(open(f"{out}/logs/training_history.json"))
    report = json.load(open(f"{out}/logs/best_per_class.json"))
    best_epoch = torch.load(f"{out}/checkpoints/checkpoint_best.pth")["epoch"]
    return history, report, best_epoch


def test_one_and_two_processes_give_the_same_top5_and_per_class_report(tmp_path):
    data = make_seven_class_data(str(tmp_path / "data"))
    common = dict(model="tiny_cnn", epochs=2, learning_rate=0.05)
    one = run_cli(train_cmd(*data_flags(data, f"{tmp_path}/one", batch_size=8, **common)))
    run_cli(torchrun(2, *data_flags(data, f"{tmp_path}/two", batch_size=4, **common)))
    history, report, best_epoch = read_run(f"{tmp_path}/one")
    history_two, report_two, _ = read_run(f"{tmp_path}/two")
    assert report_two == report  # every count, so no image was duplicated or dropped across ranks
    assert history_two["val_acc5"] == history["val_acc5"] and history_two["val_acc"] == history["val_acc"]
    assert history_two["val_macro_f1"] == history["val_macro_f1"]
    assert history_two["val_balanced_acc"] == history["val_balanced_acc"]

    assert len(history["val_acc5"]) == 2 and "top-5" in one.stdout
    assert all(acc5 >= acc and acc5 * 13 / 100 == round(acc5 * 13 / 100)  # whole images out of 13
               for acc, acc5 in zip(history["val_acc"], history["val_acc5"]))
    assert report["epoch"] == best_epoch and report["weights"] == "model"
    assert report["class_names"] == list(SEVEN_CLASSES)
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (7, 7) and confusion.sum() == report["images"] == 13
    assert confusion.sum(axis=1).tolist() == [2, 2, 2, 1, 2, 2, 2]  # rows are the true classes
    val_acc = history["val_acc"][best_epoch - 1]
    assert 100 * np.trace(confusion) / 13 == report["accuracy"] == val_acc
    for k, entry in enumerate(report["per_class"]):
        assert entry["name"] == SEVEN_CLASSES[k] and entry["correct"] == confusion[k, k]
        assert entry["recall"] == 100 * confusion[k, k] / confusion[k].sum()
    assert sum(e["recall"] * e["images"] for e in report["per_class"]) / 13 == pytest.approx(val_acc)
    # The best epoch's predictions, as (true, predicted) pairs, through scikit-learn.
    labels = [true for (true, _), count in np.ndenumerate(confusion) for _ in range(count)]
    predicted = [guess for (_, guess), count in np.ndenumerate(confusion) for _ in range(count)]
    assert history["val_macro_f1"][best_epoch - 1] == pytest.approx(
        100 * sk.f1_score(labels, predicted, average="macro", zero_division=0), rel=1e-12)
    assert history["val_balanced_acc"][best_epoch - 1] == pytest.approx(
        100 * sk.balanced_accuracy_score(labels, predicted), rel=1e-12)
    _, _, f1, _ = sk.precision_recall_fscore_support(labels, predicted, labels=range(7), zero_division=0)
    assert [e["f1"] for e in report["per_class"]] == pytest.approx(100 * f1, rel=1e-12)

    result = run_cli([sys.executable, "utils.py", "--confusion", f"{tmp_path}/one/logs/best_per_class.json",
                      "--output", f"{tmp_path}/confusion.png"])
    assert result.stdout.strip() == f"wrote {tmp_path}/confusion.png (7 classes)"


def test_with_five_classes_or_fewer_no_top5_and_the_ema_is_reported(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    result = run_cli(train_cmd(*data_flags(tiny_data, out, model="tiny_cnn", epochs=2, use_ema=True)))
    history, report, best_epoch = read_run(out)
    assert "val_acc5" not in history and "ema_val_acc5" not in history and "top-5" not in result.stdout
    assert report["weights"] == "ema" and report["epoch"] == best_epoch  # the monitored model, as for best
    assert report["accuracy"] == history["ema_val_acc"][best_epoch - 1]
    assert np.array(report["confusion_matrix"]).sum() == 8  # the 8 validation images of tiny_data


class RecordingLogger:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((metrics, step))


def test_top5_goes_to_wandb_and_tensorboard_as_val_acc5_only_when_measured():
    record = dict(epoch=1, train_loss=1.0, train_acc=50.0, samples_per_second=10.0, val_loss=1.2, val_acc=40.0)
    logger = RecordingLogger()
    train_ddp.log_epoch(logger, record, global_step=7)
    with_ema = dict(record, val_acc5=90.0, ema_val_loss=1.1, ema_val_acc=45.0, ema_val_acc5=95.0)
    train_ddp.log_epoch(logger, with_ema, global_step=14)
    (without, _), (with_top5, step) = logger.logged
    assert "val/acc5" not in without and step == 14
    assert with_top5["val/acc5"] == 90.0 and with_top5["val/ema_acc5"] == 95.0 and with_top5["val/ema_acc"] == 45.0
