"""Imbalanced data end to end, on real processes: class-balanced sampling trains the same samples
at every step on 1 and 2 processes, and validation's macro-F1 and balanced accuracy (in the
epoch line, the history and --monitor_metric) equal scikit-learn's on the model's predictions."""
import json
import os

import pytest
import torch
from conftest import data_flags, run_cli, torchrun, train_cmd, write_image_folder
from sklearn.metrics import balanced_accuracy_score, f1_score

from dataset import load_eval, normalize, planar
from inputs.sampling import read_trace
from model import build_model

pytestmark = pytest.mark.slow

RUN = dict(model="tiny_cnn", epochs=2, batch_size=4, image_size=16, sampling="class_balanced",
           class_weights="balanced", loss="focal", monitor_metric="val_macro_f1", trace_samples=True,
           label_smoothing=0.1)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """30 circles, 3 squares, 3 triangles (10:1) to train on; 4 of each to validate."""
    root = tmp_path_factory.mktemp("imbalanced")
    train = write_image_folder(str(root / "train"), per_class=30)
    for name in ("square", "triangle"):
        for i in range(3, 30):
            os.remove(os.path.join(train, name, f"{i:03d}.png"))
    return dict(train_dir=train, val_dir=write_image_folder(str(root / "val"), per_class=4, seed=1))


def test_balanced_sampling_trains_the_same_samples_on_one_and_two_processes(imbalanced, tmp_path):
    one = run_cli(train_cmd(*data_flags(imbalanced, str(tmp_path / "one"), **{**RUN, "batch_size": 8})))
    run_cli(torchrun(2, *data_flags(imbalanced, str(tmp_path / "two"), **RUN)))
    trace = read_trace(f"{tmp_path}/one/logs")
    assert trace == read_trace(f"{tmp_path}/two/logs")
    drawn = [index for indices in trace.values() for index in indices]
    rare = sum(1 for key in drawn if key % 36 >= 30)  # the 6 rare images are indices 30..35 (key % 36)
    assert len(drawn) == 2 * 32 and 0.5 < rare / len(drawn)  # two thirds expected, not a sixth
    assert "macro-F1" in one.stdout and "bal. acc" in one.stdout


def test_validation_macro_f1_and_balanced_accuracy_equal_scikit_learns(imbalanced, tmp_path):
    run_cli(train_cmd(*data_flags(imbalanced, str(tmp_path), **{**RUN, "epochs": 1})))
    checkpoint = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")
    model = build_model("tiny_cnn", 3)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    labels, predicted = [], []
    for label, name in enumerate(checkpoint["class_names"]):
        folder = os.path.join(imbalanced["val_dir"], name)
        for file in sorted(os.listdir(folder)):
            image = torch.from_numpy(planar(load_eval(os.path.join(folder, file), 16)))
            with torch.no_grad():
                predicted.append(model(normalize(image[None])).argmax(1).item())
            labels.append(label)
    with open(f"{tmp_path}/logs/training_history.json") as f:
        history = json.load(f)
    assert history["val_macro_f1"][-1] == pytest.approx(100 * f1_score(labels, predicted, average="macro"), abs=1e-9)
    assert history["val_balanced_acc"][-1] == pytest.approx(100 * balanced_accuracy_score(labels, predicted),
                                                            abs=1e-9)
    assert checkpoint["best_metric"] == history["val_macro_f1"][-1]
