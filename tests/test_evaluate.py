"""evaluate.py: a real checkpoint from the training CLI scored on real image folders, in one process
and under real torchrun, against scikit-learn and against the model run by hand on each image."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, data_flags, make_tiny_data, run_cli, train_cmd, write_image_folder
from PIL import Image
from sklearn import metrics as sk
from torchvision import transforms
from torchvision.transforms import functional as TF

import evaluate
import utils
from dataset import load_eval, normalize
from engine.checkpoint import checkpoint_preprocessing
from model import model_from_checkpoint

# The seven-class checkpoint's classes: the data's three (circle, square, triangle) at other indices
# than the folders' sorted order, and four the data does not have.
SEVEN = ("kite", "triangle", "circle", "moon", "square", "star", "hexagon")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """conftest's tiny data (val: 8 images of 3 classes), a tiny_cnn trained one epoch on it, and
    that model as a checkpoint of seven classes (SEVEN): the data's classes keep their trained
    head rows; kite's row makes it the prediction of the square images, a class without images."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_tiny_data(str(root))
    run_cli(train_cmd(*data_flags(data, f"{root}/run", model="tiny_cnn")))
    three = f"{root}/run/checkpoints/checkpoint_best.pth"
    checkpoint = torch.load(three)
    weight, bias = checkpoint["model_state_dict"]["fc.weight"], checkpoint["model_state_dict"]["fc.bias"]
    trained = {name: (weight[k], bias[k]) for k, name in enumerate(checkpoint["class_names"])}
    mean_of = {"kite": ("circle", "square", 0.1), "moon": ("square", "triangle", -0.2),
               "star": ("circle", "triangle", -0.05), "hexagon": ("circle", "circle", -1.0)}
    rows = [trained[name] if name in trained else
            ((trained[mean_of[name][0]][0] + trained[mean_of[name][1]][0]) / 2,
             (trained[mean_of[name][0]][1] + trained[mean_of[name][1]][1]) / 2 + mean_of[name][2])
            for name in SEVEN]
    state = dict(checkpoint["model_state_dict"], **{"fc.weight": torch.stack([w for w, _ in rows]),
                                                   "fc.bias": torch.stack([b for _, b in rows])})
    seven = f"{root}/seven.pth"
    torch.save(dict(checkpoint, class_names=list(SEVEN), model_state_dict=state), seven)
    return dict(data, three=three, seven=seven)


def val_images(val_dir):
    """(path, class folder name) of every validation image, in ImageFolder's order."""
    return [(os.path.join(val_dir, name, file), name) for name in sorted(os.listdir(val_dir))
            for file in sorted(os.listdir(os.path.join(val_dir, name)))]


def hand_probabilities(checkpoint_path, val_dir, tta="none"):
    """{path: mean softmax over the views} with the model run on one image's views at a time:
    validation's center crop and its mirror made with torch.flip, or torchvision's own Resize and
    FiveCrop transforms."""
    checkpoint = torch.load(checkpoint_path)
    model, prep = model_from_checkpoint(checkpoint), checkpoint_preprocessing(checkpoint)
    five_crops = transforms.Compose([transforms.Resize(prep["resize_size"]), transforms.FiveCrop(prep["image_size"])])
    probabilities = {}
    with torch.no_grad():
        for path, _ in val_images(val_dir):
            if tta == "multi_crop":
                views = torch.stack([TF.pil_to_tensor(crop) for crop in five_crops(Image.open(path).convert("RGB"))])
            else:
                center = TF.pil_to_tensor(load_eval(path, prep["image_size"], prep["resize_size"]))[None]
                views = torch.cat([center, center.flip(-1)]) if tta == "flip" else center
            softmax = [model(normalize(view[None], prep["mean"], prep["std"])).softmax(dim=1)[0] for view in views]
            probabilities[path] = torch.stack(softmax).double().mean(dim=0).numpy()
    return probabilities


def run_evaluate(tmp_path, name, *flags):
    """evaluate.main in this process; its JSON report."""
    output = tmp_path / f"{name}.json"
    assert evaluate.main([str(f) for f in flags] + ["--output", str(output), "--num_workers", "0"]) == 0
    return json.loads(output.read_text())


@pytest.mark.slow
def test_one_and_two_processes_report_the_same_numbers_equal_to_scikit_learns(checkpoints, tmp_path, capsys):
    flags = ["--checkpoint", checkpoints["seven"], "--data_dir", checkpoints["val_dir"], "--batch_size", "2"]
    report = run_evaluate(tmp_path, "one", *flags)
    two = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   os.path.join(REPO, "evaluate.py"), *flags, "--output", f"{tmp_path}/two.json"])
    assert json.load(open(f"{tmp_path}/two.json")) == report  # every number, count and prediction
    assert two.stdout.count("Evaluated ") == 1 and "with 2 processes on cpu (gloo)" in two.stdout  # rank 0 alone

    images = val_images(checkpoints["val_dir"])
    assert [(p["path"], p["label"]) for p in report["predictions"]] == images
    labels = [SEVEN.index(name) for _, name in images]
    predicted = [SEVEN.index(p["predicted"]) for p in report["predictions"]]
    assert {"kite"} == {p["predicted"] for p in report["predictions"]} - {name for _, name in images}  # the edge case
    classes = list(range(len(SEVEN)))
    assert report["accuracy"] == pytest.approx(100 * sk.accuracy_score(labels, predicted), rel=1e-12)
    assert report["macro_f1"] == pytest.approx(100 * sk.f1_score(labels, predicted, average="macro"), rel=1e-12)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        balanced = sk.balanced_accuracy_score(labels, predicted)
    assert report["balanced_accuracy"] == pytest.approx(100 * balanced, rel=1e-12)
    assert report["confusion_matrix"] == sk.confusion_matrix(labels, predicted, labels=classes).tolist()
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                        zero_division=0)
    assert [e["name"] for e in report["per_class"]] == list(SEVEN)
    assert [e["support"] for e in report["per_class"]] == support.tolist() == [0, 3, 3, 0, 2, 0, 0]
    for key, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert [e[key] for e in report["per_class"]] == pytest.approx(100 * expected, rel=1e-12), key

    by_hand = hand_probabilities(checkpoints["seven"], checkpoints["val_dir"])
    probabilities = np.stack([by_hand[path] for path, _ in images])
    assert predicted == probabilities.argmax(axis=1).tolist()
    losses = -np.log(probabilities[range(len(labels)), labels])  # cross-entropy of each image
    assert report["loss"] == pytest.approx(losses.mean(), abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(
        100 * sk.top_k_accuracy_score(labels, probabilities, k=5, labels=classes), rel=1e-12)

    with Image.open(f"{tmp_path}/one_confusion.png") as picture:
        assert picture.format == "PNG" and picture.width > 300
    # The JSON is also a confusion report that `utils.py --confusion` draws.
    assert utils.main(["--confusion", f"{tmp_path}/one.json", "--output", f"{tmp_path}/again.png"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {tmp_path}/again.png (7 classes)")


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_from_rank_0(checkpoints, tmp_path):
    data = write_image_folder(str(tmp_path / "other"), per_class=1)
    os.rename(os.path.join(data, "square"), os.path.join(data, "hexagon"))
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      os.path.join(REPO, "evaluate.py"), "--checkpoint", checkpoints["three"], "--data_dir", data],
                     check=False)
    assert result.returncode != 0 and "Evaluated " not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: {data} has classes the checkpoint was not trained on: hexagon; the checkpoint's "
                      "classes are circle, square, triangle (the data may hold some of them, not others)"]


@pytest.mark.parametrize("tta", ["flip", "multi_crop"])
def test_tta_scores_the_mean_softmax_of_the_views_computed_by_hand(checkpoints, tmp_path, tta):
    report = run_evaluate(tmp_path, tta, "--checkpoint", checkpoints["seven"], "--data_dir", checkpoints["val_dir"],
                          "--tta", tta, "--batch_size", 3)
    plain = run_evaluate(tmp_path, "none", "--checkpoint", checkpoints["seven"], "--data_dir", checkpoints["val_dir"])
    images = val_images(checkpoints["val_dir"])
    by_hand = hand_probabilities(checkpoints["seven"], checkpoints["val_dir"], tta)
    assert report["tta"] == tta and report["images"] == len(images) == 8
    assert [p["predicted"] for p in report["predictions"]] == [SEVEN[by_hand[path].argmax()] for path, _ in images]
    losses = [-np.log(by_hand[path][SEVEN.index(name)]) for path, name in images]
    assert report["loss"] == pytest.approx(np.mean(losses), abs=1e-6)
    assert abs(report["loss"] - plain["loss"]) > 1e-5  # the views changed the probabilities: not the plain pass
    assert report["accuracy"] == 100 * np.mean([SEVEN[by_hand[path].argmax()] == name for path, name in images])


def test_ema_weights_are_scored_with_weights_ema(checkpoints, tmp_path):
    checkpoint = torch.load(checkpoints["three"])
    ema = {f"module.{k}": v.clone() for k, v in checkpoint["model_state_dict"].items()}  # AveragedModel layout
    ema["module.fc.bias"] += torch.tensor([0.0, 0.0, 50.0])  # EMA weights that always say "triangle"
    ema["n_averaged"] = torch.tensor(7)
    with_ema = str(tmp_path / "ema.pth")
    torch.save(dict(checkpoint, ema_state_dict=ema), with_ema)
    flags = ["--checkpoint", with_ema, "--data_dir", checkpoints["val_dir"]]
    averaged = run_evaluate(tmp_path, "ema", *flags, "--weights", "ema")
    assert averaged["weights"] == "ema" and {p["predicted"] for p in averaged["predictions"]} == {"triangle"}
    assert averaged["accuracy"] == 100 * 3 / 8 and averaged["confusion_matrix"] == [[0, 0, 3], [0, 0, 2], [0, 0, 3]]
    trained = run_evaluate(tmp_path, "model", *flags)
    plain = run_evaluate(tmp_path, "plain", "--checkpoint", checkpoints["three"], "--data_dir", checkpoints["val_dir"])
    assert trained["predictions"] == plain["predictions"] and trained["loss"] == plain["loss"]


def refusals(checkpoints, tmp_path):
    other = write_image_folder(str(tmp_path / "other"), per_class=1)
    os.rename(os.path.join(other, "square"), os.path.join(other, "hexagon"))
    three, val = checkpoints["three"], checkpoints["val_dir"]
    checkpoint = torch.load(three)
    multi_label = str(tmp_path / "multi_label.pth")
    torch.save(dict(checkpoint, config=dict(checkpoint["config"], multi_label=True)), multi_label)
    return {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope.pth", "--data_dir", val],
                               f"checkpoint not found: {tmp_path / 'nope.pth'}"),
        "other classes": (["--checkpoint", three, "--data_dir", other],
                          f"{other} has classes the checkpoint was not trained on: hexagon; the checkpoint's "
                          "classes are circle, square, triangle"),
        "no EMA": (["--checkpoint", three, "--data_dir", val, "--weights", "ema"],
                   f"--weights ema: {three} has no EMA weights"),
        "multi-label checkpoint": (["--checkpoint", multi_label, "--data_dir", val],
                                   f"{multi_label} was trained with several labels per image (--multi_label)"),
        "missing data": (["--checkpoint", three, "--data_dir", tmp_path / "gone"], "folder not found"),
        "output format": (["--checkpoint", three, "--data_dir", val, "--output", tmp_path / "r.csv"], ".json"),
        "unknown tta": (["--checkpoint", three, "--data_dir", val, "--tta", "ten_crop"], "invalid choice"),
    }


def test_refusals_are_one_error_line_and_exit_2(checkpoints, tmp_path, capsys):
    for name, (argv, message) in refusals(checkpoints, tmp_path).items():
        assert evaluate.main([str(a) for a in argv]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "", name
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (name, captured.err)
        assert message in captured.err, (name, captured.err)


def test_an_unreadable_image_is_named_in_one_line_from_a_loader_worker(checkpoints, tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"), per_class=2)
    broken = os.path.join(data, "circle", "broken.png")
    with open(broken, "wb") as f:
        f.write(b"not an image")
    code = evaluate.main(["--checkpoint", checkpoints["three"], "--data_dir", data, "--num_workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot read image {broken} ("), err


def test_a_label_file_scores_the_same_as_the_folders_it_describes(checkpoints, tmp_path):
    rows = ["path,class"] + [f"{os.path.relpath(path, checkpoints['val_dir'])},{name}"
                             for path, name in reversed(val_images(checkpoints["val_dir"]))]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    folders = run_evaluate(tmp_path, "folders", "--checkpoint", checkpoints["seven"], "--data_dir",
                           checkpoints["val_dir"])
    labelled = run_evaluate(tmp_path, "labelled", "--checkpoint", checkpoints["seven"], "--csv", tmp_path / "val.csv",
                            "--image_root", checkpoints["val_dir"], "--image_column", "path", "--label_column", "class")
    for key in ("loss", "accuracy", "macro_f1", "balanced_accuracy", "confusion_matrix", "per_class"):
        assert labelled[key] == folders[key], key
