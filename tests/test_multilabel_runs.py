"""--multi_label end to end, on real processes: labels from a CSV's space-separated label lists,
sigmoid outputs and BCE (with mixing and --pos_weight), validation mAP and F1 identical on 1 and 2
processes and equal to scikit-learn's on the model's probabilities, tuned thresholds kept in the
checkpoint and applied by predict.py."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, torchrun, train_cmd
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from dataset import load_eval, normalize, planar
from model import build_model

pytestmark = pytest.mark.slow

CLASSES = ("blue", "green", "red")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Images whose colour channels are bright for each label they carry; train.csv and val.csv."""
    root = tmp_path_factory.mktemp("multilabel")
    rng = np.random.RandomState(0)
    for split, count in (("train", 32), ("val", 12)):
        os.makedirs(root / split)
        rows = ["image,label"]
        for i in range(count):
            present = [name for name in CLASSES if rng.rand() < 0.5] or ["red"]
            pixels = rng.randint(0, 80, (20, 20, 3)).astype(np.uint8)
            for name in present:
                pixels[..., ("red", "green", "blue").index(name)] = rng.randint(170, 256, (20, 20))
            Image.fromarray(pixels).save(root / split / f"{i:03d}.png")
            rows.append(f"{split}/{i:03d}.png,{' '.join(present)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def flags(root, out, batch_size, **extra):
    values = dict(train_csv=root / "train.csv", val_csv=root / "val.csv", model="tiny_cnn", image_size=16,
                  batch_size=batch_size, epochs=2, num_workers=0, mixup_alpha=0.2, pos_weight="balanced",
                  monitor_metric="val_map", checkpoint_dir=out / "checkpoints", log_dir=out / "logs")
    values.update(extra)
    argv = ["--multi_label"]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_two_process_multi_label_validation_equals_scikit_learns_on_all_the_models_probabilities(labelled, tmp_path):
    # Each of the 2 processes scores half the validation images; the history's figures must be those
    # of all 12 images scored in one process (here, by hand), hence the same on any number of processes.
    run_cli(torchrun(2, *flags(labelled, tmp_path / "one", 4)))
    histories = [json.loads((tmp_path / "one" / "logs" / "training_history.json").read_text())]
    checkpoint = torch.load(tmp_path / "one" / "checkpoints" / "checkpoint_latest.pth")
    assert checkpoint["class_names"] == sorted(CLASSES) and len(checkpoint["thresholds"]) == 3
    model = build_model("tiny_cnn", 3)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    rows = (labelled / "val.csv").read_text().splitlines()[1:]
    paths = [str(labelled / row.split(",")[0]) for row in rows]
    targets = np.array([[float(name in row.split(",")[1].split()) for name in checkpoint["class_names"]]
                        for row in rows])
    images = torch.stack([torch.from_numpy(planar(load_eval(path, 16))) for path in paths])
    with torch.no_grad():
        probabilities = torch.sigmoid(model(normalize(images))).numpy()
    assert histories[0]["val_map"][-1] == pytest.approx(
        100 * average_precision_score(targets, probabilities, average="macro"), abs=1e-6)
    assert histories[0]["val_micro_f1"][-1] == pytest.approx(
        100 * f1_score(targets, probabilities >= 0.5, average="micro", zero_division=0), abs=1e-6)
    assert histories[0]["val_macro_f1"][-1] == pytest.approx(
        100 * f1_score(targets, probabilities >= 0.5, average="macro", zero_division=0), abs=1e-6)
    assert histories[0]["val_acc"][-1] == pytest.approx(100 * ((probabilities >= 0.5) == targets).all(1).mean())

    output = tmp_path / "predictions.json"
    run_cli([os.sys.executable, os.path.join(REPO, "predict.py"), "--checkpoint",
             str(tmp_path / "one" / "checkpoints" / "checkpoint_latest.pth"), *paths[:3], "--output", str(output)])
    predicted = json.loads(output.read_text())
    for result, row in zip(predicted, probabilities[:3]):
        by_class = {p["class"]: p["probability"] for p in result["predictions"]}
        assert [by_class[name] for name in checkpoint["class_names"]] == pytest.approx(row.tolist(), abs=1e-6)
        assert result["labels"] == [name for name, p, t in zip(checkpoint["class_names"], row,
                                                                checkpoint["thresholds"]) if p >= t]


def test_a_single_label_checkpoint_is_not_resumed_as_multi_label(labelled, tmp_path):
    run_cli(train_cmd(*flags(labelled, tmp_path, 8, epochs=1)))
    argv = flags(labelled, tmp_path, 8, epochs=2)
    argv.remove("--multi_label")
    argv = [word for word in argv if word not in ("--pos_weight", "balanced", "--monitor_metric", "val_map")]
    result = run_cli(train_cmd(*argv, "--resume", str(tmp_path / "checkpoints" / "checkpoint_latest.pth")),
                     check=False)
    assert result.returncode == 2 and "was trained with several labels per image (--multi_label)" in result.stderr


def test_a_multi_label_model_exported_to_onnx_gives_pytorchs_probabilities_and_its_thresholds(labelled, tmp_path):
    import onnxruntime

    run_cli(train_cmd(*flags(labelled, tmp_path, 8, epochs=1)))
    checkpoint_path = tmp_path / "checkpoints" / "checkpoint_latest.pth"
    output = tmp_path / "model.onnx"
    run_cli([os.sys.executable, os.path.join(REPO, "export.py"), "--checkpoint", str(checkpoint_path), "--format",
             "onnx", "--output", str(output)])
    checkpoint = torch.load(checkpoint_path)
    metadata = json.loads((tmp_path / "model.onnx.json").read_text())
    assert metadata["multi_label"] and metadata["thresholds"] == checkpoint["thresholds"]
    model = build_model("tiny_cnn", 3)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    images = torch.stack([torch.from_numpy(planar(load_eval(str(labelled / "val" / f"{i:03d}.png"), 16)))
                          for i in range(4)])
    with torch.no_grad():
        expected = torch.sigmoid(model(normalize(images))).numpy()
    session = onnxruntime.InferenceSession(str(output))
    got = session.run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
