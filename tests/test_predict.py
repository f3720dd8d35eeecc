"""predict.py: real checkpoints from the training CLI, real images, the real prediction CLI."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, REPO, data_flags, make_tiny_data, run_cli, train_cmd
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

import predict
from dataset import AugmentedImageFolder, load_eval, normalize
from engine.checkpoint import checkpoint_preprocessing
from model import build_model, model_from_checkpoint

PREDICT = [sys.executable, os.path.join(REPO, "predict.py")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The conftest tiny dataset (val: 8 images), and checkpoints of a tiny_cnn and a resnet18."""
    root = tmp_path_factory.mktemp("predict")
    data = make_tiny_data(str(root))
    run_cli(train_cmd(*data_flags(data, f"{root}/tiny", model="tiny_cnn", epochs=2)))
    run_cli(train_cmd(*data_flags(data, f"{root}/resnet", model="resnet18", epochs=1)))
    return dict(data, tiny=f"{root}/tiny/checkpoints/checkpoint_best.pth",
                resnet=f"{root}/resnet/checkpoints/checkpoint_best.pth")


def validation_probabilities(checkpoint_path, val_dir):
    """{path: softmax over classes} computed as training's `evaluate` does, one image at a time."""
    checkpoint = torch.load(checkpoint_path)
    model = build_model(checkpoint["model_name"], len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    val_set = AugmentedImageFolder(val_dir, checkpoint["config"]["image_size"], train=False)
    with torch.no_grad():
        return {path: model(normalize(val_set[i][0][None])).softmax(dim=1)[0].tolist()
                for i, (path, _) in enumerate(val_set.samples)}


def run_predict(*args, check=True):
    return run_cli(PREDICT + [str(a) for a in args], timeout=120, check=check)


def test_folder_predictions_equal_the_validation_computation(trained, tmp_path):
    out = tmp_path / "preds.json"
    result = run_predict("--checkpoint", trained["tiny"], trained["val_dir"], "--topk", 10, "--output", out)
    preds = json.loads(out.read_text())
    expected = validation_probabilities(trained["tiny"], trained["val_dir"])
    assert [p["path"] for p in preds] == sorted(expected)  # every val image once, in path order
    for p in preds:
        assert len(p["predictions"]) == len(CLASSES)  # --topk 10 clipped to the 3 classes
        probs = [q["probability"] for q in p["predictions"]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=1e-6)
        for q in p["predictions"]:
            assert q["probability"] == pytest.approx(expected[p["path"]][CLASSES.index(q["class"])], abs=1e-6)
        assert p["predictions"][0]["class"] == CLASSES[max(range(3), key=expected[p["path"]].__getitem__)]
    table = result.stdout.splitlines()
    assert len(table) == 8 and all(line.startswith(p["path"]) for line, p in zip(table, preds))


def test_csv_output_for_files_and_folders(trained, tmp_path):
    one_file = os.path.join(trained["val_dir"], "circle", "000.png")
    out = tmp_path / "preds.csv"
    run_predict("--checkpoint", trained["tiny"], one_file, os.path.join(trained["val_dir"], "square"),
                "--topk", 2, "--batch_size", 1, "--output", out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "rank", "class", "probability", "error"]
    assert len(rows) == 3 * 2  # (1 file + 2 square images) x top-2
    assert [r["rank"] for r in rows] == ["1", "2"] * 3
    assert rows[0]["path"] == rows[1]["path"] == one_file
    assert all(r["class"] in CLASSES and 0 < float(r["probability"]) < 1 and r["error"] == "" for r in rows)


def test_unreadable_images_are_reported_and_the_rest_predicted(trained, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(trained["val_dir"], folder)
    (folder / "circle" / "broken.jpg").write_bytes(b"not an image")
    png = (folder / "circle" / "000.png").read_bytes()
    (folder / "square" / "truncated.png").write_bytes(png[:len(png) // 2])
    shutil.copy(folder / "triangle" / "000.png", folder / "triangle" / "UPPER.PNG")  # extension case
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "preds.csv"
    result = run_predict("--checkpoint", trained["tiny"], folder, "--output", out,
                         "--batch_size", 3, "--num_workers", 2)  # bad and good images share batches
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "broken.jpg" in warnings[0] and "truncated.png" in warnings[1]
    rows = list(csv.DictReader(out.open()))
    errors = [r for r in rows if r["error"]]
    assert sorted(os.path.basename(r["path"]) for r in errors) == ["broken.jpg", "truncated.png"]
    assert all(r["rank"] == r["class"] == r["probability"] == "" for r in errors)
    assert len({r["path"] for r in rows if not r["error"]}) == 9  # 8 val images + UPPER.PNG
    assert len(result.stdout.splitlines()) == 11 and result.stdout.count("ERROR:") == 2


def test_resnet18_checkpoint(trained, tmp_path):
    image = os.path.join(trained["val_dir"], "triangle", "001.png")
    out = tmp_path / "preds.json"
    run_predict("--checkpoint", trained["resnet"], image, "--topk", 1, "--device", "auto", "--output", out)
    [pred] = json.loads(out.read_text())
    expected = validation_probabilities(trained["resnet"], trained["val_dir"])[image]
    assert len(pred["predictions"]) == 1
    assert pred["predictions"][0]["probability"] == pytest.approx(max(expected), abs=1e-6)


def tta_probabilities_by_hand(checkpoint_path, path, tta):
    """The mean softmax over an image's views, one view at a time: validation's center crop and its
    mirror made with torch.flip, or torchvision's own Resize and FiveCrop transforms."""
    checkpoint = torch.load(checkpoint_path)
    model, prep = model_from_checkpoint(checkpoint), checkpoint_preprocessing(checkpoint)
    if tta == "flip":
        center = TF.pil_to_tensor(load_eval(path, prep["image_size"], prep["resize_size"]))
        views = [center, center.flip(-1)]
    else:
        resized = transforms.Resize(prep["resize_size"])(Image.open(path).convert("RGB"))
        views = [TF.pil_to_tensor(crop) for crop in transforms.FiveCrop(prep["image_size"])(resized)]
    with torch.no_grad():
        return torch.stack([model(normalize(view[None], prep["mean"], prep["std"])).softmax(dim=1)[0]
                            for view in views]).mean(dim=0).tolist()


@pytest.mark.parametrize("tta", ["flip", "multi_crop"])
def test_tta_probabilities_are_the_mean_softmax_of_the_views_computed_by_hand(trained, tmp_path, tta):
    out = tmp_path / "preds.json"
    assert predict.main(["--checkpoint", trained["tiny"], trained["val_dir"], "--tta", tta, "--batch_size", "3",
                         "--output", str(out)]) == 0
    preds = json.loads(out.read_text())
    plain = validation_probabilities(trained["tiny"], trained["val_dir"])
    assert len(preds) == 8
    for p in preds:
        expected = tta_probabilities_by_hand(trained["tiny"], p["path"], tta)
        assert {q["class"]: q["probability"] for q in p["predictions"]} == pytest.approx(
            dict(zip(CLASSES, expected)), abs=1e-6)
    assert max(abs(q["probability"] - plain[p["path"]][CLASSES.index(q["class"])])
               for p in preds for q in p["predictions"]) > 1e-5  # the views changed the probabilities


def test_a_16_bit_png_is_predicted_as_its_8_bit_high_bytes_not_as_white(trained, tmp_path):
    noise = np.random.default_rng(0).normal(0, 2500, (40, 50))
    values = np.clip(126 * 257 + noise, 0, 65535).astype(np.uint16)  # mean level 126 of 255
    Image.fromarray(values).save(tmp_path / "wide.png")  # PIL mode I;16
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "narrow.png")
    preprocessing = checkpoint_preprocessing(torch.load(trained["tiny"]))
    pixels = predict.ImageFiles([str(tmp_path / "wide.png")], preprocessing)[0][1]
    assert abs(pixels.float().mean().item() - 126) < 1.5 and (pixels == 255).float().mean() < 0.01
    out = tmp_path / "preds.json"
    run_predict("--checkpoint", trained["tiny"], tmp_path / "wide.png", tmp_path / "narrow.png", "--output", out)
    wide, narrow = json.loads(out.read_text())
    assert wide["predictions"] == narrow["predictions"]


def test_ema_weights_are_offered_only_by_checkpoints_that_have_them(trained, tmp_path, capsys):
    checkpoint = torch.load(trained["tiny"])
    ema = {f"module.{k}": v.clone() for k, v in checkpoint["model_state_dict"].items()}  # AveragedModel layout
    ema["module.fc.bias"] += torch.tensor([0.0, 0.0, 50.0])  # EMA weights that always say "triangle"
    ema["n_averaged"] = torch.tensor(7)
    with_ema = str(tmp_path / "ema.pth")
    torch.save(dict(checkpoint, ema_state_dict=ema), with_ema)
    image = os.path.join(trained["val_dir"], "circle", "000.png")

    def top1(path, *flags):
        out = tmp_path / "p.json"
        assert predict.main(["--checkpoint", path, image, "--output", str(out), *flags]) == 0
        return json.loads(out.read_text())[0]["predictions"][0]

    assert top1(with_ema, "--weights", "ema")["class"] == "triangle"
    assert top1(with_ema) == top1(with_ema, "--weights", "model") == top1(trained["tiny"])
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", with_ema, "--help"])
    assert "--weights {model,ema}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", trained["tiny"], "--help"])
    assert "ema" not in capsys.readouterr().out.lower()
    assert predict.main(["--checkpoint", trained["tiny"], image, "--weights", "ema"]) == 2
    assert "error: unrecognized arguments: --weights ema" in capsys.readouterr().err


def error_cases(trained, tmp_path):
    text_file, not_checkpoint, empty = tmp_path / "notes.txt", tmp_path / "tensor.pth", tmp_path / "empty"
    text_file.write_text("hello")
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait for a writer forever
    torch.save({"weights": torch.zeros(2)}, not_checkpoint)
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    val = trained["val_dir"]
    return {
        "missing checkpoint": (["--checkpoint", tmp_path / "nope.pth", val], "checkpoint not found"),
        "text file as checkpoint": (["--checkpoint", text_file, val], str(text_file)),
        "other torch file": (["--checkpoint", not_checkpoint, val], "not a training checkpoint"),
        "no images": (["--checkpoint", trained["tiny"], empty], "no images found"),
        "missing input": (["--checkpoint", trained["tiny"], tmp_path / "gone"], "input not found"),
        "fifo input": (["--checkpoint", trained["tiny"], tmp_path / "pipe.png"], "is not a regular file or a folder"),
        "output format": (["--checkpoint", trained["tiny"], val, "--output", tmp_path / "p.txt"], ".csv or .json"),
        "output folder": (["--checkpoint", trained["tiny"], val, "--output", tmp_path / "x" / "p.csv"],
                          "folder does not exist"),
        "topk": (["--checkpoint", trained["tiny"], val, "--topk", 0], "--topk"),
        "no checkpoint flag": ([val], "required: --checkpoint"),
    }


def test_bad_input_is_one_error_line_and_exit_2(trained, tmp_path, capsys):
    for name, (argv, message) in error_cases(trained, tmp_path).items():
        assert predict.main([str(a) for a in argv]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "", name
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (name, captured.err)
        assert message in captured.err, (name, captured.err)
    assert not os.path.exists(tmp_path / "p.txt")


def test_bad_input_on_the_command_line_exits_2_without_a_traceback(trained, tmp_path):
    result = run_predict("--checkpoint", tmp_path / "nope.pth", trained["val_dir"], check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: checkpoint not found: {tmp_path / 'nope.pth'}\n"


def test_folders_are_walked_as_training_walks_them(trained, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(trained["val_dir"], folder)
    os.symlink(".", folder / "circle" / "again")  # a loop: every image once, one warning
    os.mkfifo(folder / "square" / "pipe.png")
    (folder / "triangle" / "._000.png").write_bytes(b"macOS metadata, not a PNG")
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(folder / "circle" / "000.png", folder / ".ipynb_checkpoints" / "000-checkpoint.png")
    Image.new("RGB", (6000, 1), (200, 30, 30)).save(folder / "triangle" / "strip.png")  # 1.5 GB before
    out = tmp_path / "preds.json"
    result = run_predict("--checkpoint", trained["tiny"], folder, "--output", out)
    assert result.stderr.splitlines() == [  # real folders are walked first, then links
        f"warning: skipping {folder}/square/pipe.png: a FIFO (named pipe), not a regular file",
        f"warning: skipping {folder}/circle/again: it leads to {folder}/circle, which is already included "
        "(a link loop, or a second link to one folder)"]
    preds = json.loads(out.read_text())
    expected = sorted(p.replace(trained["val_dir"], str(folder)) for p in validation_probabilities(
        trained["tiny"], trained["val_dir"])) + [f"{folder}/triangle/strip.png"]
    assert [p["path"] for p in preds] == sorted(expected)
    assert all(len(p["predictions"]) == 3 and "error" not in p for p in preds)


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_quoted_and_json_is_exact(trained, tmp_path,
                                                                                        monkeypatch):
    checkpoint = torch.load(trained["tiny"])
    classes = ['=HYPERLINK("http://x.example","y")', "\tTab", "\rCR"]
    formula_checkpoint = str(tmp_path / "formulas.pth")
    torch.save(dict(checkpoint, class_names=classes), formula_checkpoint)
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["=1+2.png", "+cmd.png", "-2.png", "@SUM(A1).png", "plain.png"]
    for name in names:
        shutil.copy(os.path.join(trained["val_dir"], "circle", "000.png"), inputs / name)
    (inputs / "-broken.png").write_bytes(b"not an image")
    names.append("-broken.png")
    out = tmp_path / "preds.csv"
    run_cli(PREDICT + ["--checkpoint", formula_checkpoint, "--topk", "3", "--output", str(out), "--", *names],
            cwd=inputs)
    rows = list(csv.DictReader(out.open(newline="")))
    quoted = {name: name if name == "plain.png" else "'" + name for name in names}
    assert [r["path"] for r in rows] == [quoted[name] for name in names[:-1] for _ in range(3)] + ["'-broken.png"]
    assert sorted(r["class"] for r in rows if r["class"]) == sorted(["'" + c for c in classes] * 5)
    assert rows[-1]["error"] and not rows[-1]["error"].startswith(predict.FORMULA_STARTS)

    monkeypatch.chdir(inputs)
    assert predict.main(["--checkpoint", formula_checkpoint, "--output", str(tmp_path / "p.json"), "--", *names]) == 0
    preds = json.loads((tmp_path / "p.json").read_text())
    assert [p["path"] for p in preds] == names
    assert all(sorted(q["class"] for q in p["predictions"]) == sorted(classes) for p in preds[:-1])
