"""Label files (--train_csv, --val_csv; inputs/label_files.py): a CSV describing a class-folder tree
trains exactly as the folders do, on every input path and in any row order; every bad file is one
line naming the file and row, from the launcher before anything spawns too."""
import csv
import os
import random
import shutil
import sys

import pytest
import torch
from conftest import CLASSES, REPO, assert_same_weights, data_flags, run_cli

import train_ddp
from config import parse_args
from core.errors import ConfigError, DataError
from dataset import AugmentedImageFolder, AugmentedLabelFile
from fastload.cache_file import cache_name
from inputs.label_files import read_label_file, run_data

LAUNCH = [sys.executable, os.path.join(REPO, "launch_ddp.py")]


def tree_rows(root, split):
    """(image path relative to root, class) of every file of the class-folder tree root/split."""
    folder = os.path.join(root, split)
    return [(os.path.relpath(os.path.join(parent, name), root), os.path.relpath(parent, folder).split(os.sep)[0])
            for parent, _, files in os.walk(folder) for name in files]


def write_csv(path, rows, header=("image", "label")):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def shuffled(rows, seed=0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


@pytest.fixture
def label_files(tiny_data):
    """data/train.csv and data/val.csv describing the tiny folders, rows shuffled, paths relative to data/."""
    root = os.path.dirname(tiny_data["train_dir"])
    return dict(tiny_data, root=root,
                train_csv=write_csv(f"{root}/train.csv", shuffled(tree_rows(root, "train"))),
                val_csv=write_csv(f"{root}/val.csv", shuffled(tree_rows(root, "val"))))


def run_flags(files, out, **overrides):
    """A few steps of tiny_cnn on the folders (data_flags)."""
    return data_flags(files, out, model="tiny_cnn", limit_train_batches=3, num_sanity_val_steps=0, **overrides)


def csv_flags(files, out, **overrides):
    """run_flags on the label files instead of the folders."""
    return run_flags(files, out, **dict(dict(train_csv=files["train_csv"], val_csv=files["val_csv"], train_dir=None,
                                             val_dir=None), **overrides))


# ---------------------------------------------------------------- what a label file gives

def test_a_label_file_of_a_tree_gives_imagefolders_classes_and_sample_order_whatever_its_row_order(tiny_data):
    train = tiny_data["train_dir"]
    os.makedirs(f"{train}/circle/sub")
    shutil.copy(f"{train}/square/000.png", f"{train}/circle/sub/000.png")  # after circle/zz.png, as os.walk goes
    shutil.copy(f"{train}/square/001.png", f"{train}/circle/zz.png")
    folders = AugmentedImageFolder(train, 16, train=True)
    rows = [(os.path.relpath(path, train), CLASSES[label]) for path, label in folders.samples]
    for seed in (0, 1):
        label_file = read_label_file(write_csv(f"{train}/../t.csv", shuffled(rows, seed)), "train", image_root=train)
        assert label_file.classes == list(CLASSES)
        dataset = AugmentedLabelFile(label_file, label_file.classes, 16, train=True)
        assert dataset.samples == folders.samples and dataset.targets == folders.targets
        assert (dataset.classes, dataset.class_to_idx, dataset.root) == (folders.classes, folders.class_to_idx, train)


def test_paths_are_relative_to_the_files_folder_or_image_root_and_absolute_ones_inside_it_count(label_files):
    root, train = label_files["root"], label_files["train_dir"]
    rows = [("train/circle/000.png", "circle"), (f"{root}/train/square/000.png", "square"),
            (" ./train/circle/001.png ", " circle ")]  # spaces around values are not part of them
    at_root = read_label_file(write_csv(f"{root}/a.csv", rows), "train")
    elsewhere = read_label_file(write_csv(f"{root}/../b.csv", rows), "train", image_root=root)
    expected = [(f"{root}/train/circle/000.png", "circle"), (f"{root}/./train/circle/001.png", "circle"),
                (f"{root}/train/square/000.png", "square")]
    assert at_root.samples == elsewhere.samples == expected and at_root.root == elsewhere.root == root
    os.symlink(f"{train}/triangle/000.png", f"{train}/circle/link.png")  # a link within the root is an image
    linked = read_label_file(write_csv(f"{root}/c.csv", [("train/circle/link.png", "triangle")]), "train")
    assert linked.samples == [(f"{train}/circle/link.png", "triangle")]
    bom = f"{root}/excel.csv"
    with open(bom, "wb") as file:  # Excel's "CSV UTF-8" starts with a byte order mark
        file.write("\ufeffimage,label\r\ntrain/circle/000.png,circle\r\n".encode())
    assert read_label_file(bom, "train").samples == [(f"{root}/train/circle/000.png", "circle")]


def test_a_val_file_may_lack_classes_and_keeps_the_train_files_class_indices(label_files):
    root = label_files["root"]
    val_csv = write_csv(f"{root}/val_squares.csv", [("val/square/000.png", "square")])
    args = parse_args(csv_flags(dict(label_files, val_csv=val_csv), root))
    data = run_data(args)
    assert data.classes == list(CLASSES) and data.val.classes == ["square"]
    val_set = AugmentedLabelFile(data.val, data.classes, 16, train=False)
    assert val_set.targets == [1] and val_set.classes == list(CLASSES)


# ---------------------------------------------------------------- refusals, one line each

def refusal(root, text):
    """The message read_label_file raises for a train file of `text` in root."""
    path = f"{root}/bad.csv"
    with open(path, "wb") as file:
        file.write(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError) as error:
        read_label_file(path, "train")
    assert "\n" not in str(error.value)
    return str(error.value)


def test_each_bad_row_is_refused_naming_the_file_and_line(label_files, tmp_path):
    root, good = label_files["root"], "image,label\ntrain/circle/000.png,circle\n"
    where = f"{root}/bad.csv"
    (tmp_path / "outside.png").write_bytes(open(f"{root}/train/circle/000.png", "rb").read())
    os.symlink(tmp_path / "outside.png", f"{root}/train/circle/away.png")
    fix_root = "; list images inside it, or pass --image_root DIR for a folder that holds them all"
    cases = {
        "train/circle/999.png,circle": f"{where}:3: image not found: {root}/train/circle/999.png",
        "train/circle/001.png,": f"{where}:3: empty label for image 'train/circle/001.png'",
        "train/circle/001.png,  ": f"{where}:3: empty label for image 'train/circle/001.png'",
        ",circle": f"{where}:3: empty image path",
        "./train/circle/000.png,square": f"{where}:3: image './train/circle/000.png' is listed twice (first at line 2)",
        "../outside.png,circle": f"{where}:3: image '../outside.png' is outside the image root {root}{fix_root}",
        f"{tmp_path}/outside.png,circle":
            f"{where}:3: image '{tmp_path}/outside.png' is outside the image root {root}{fix_root}",
        "train/circle/away.png,circle": f"{where}:3: image 'train/circle/away.png' is a link to "
                                        f"{os.path.realpath(tmp_path / 'outside.png')}, outside the image root "
                                        f"{root}{fix_root}",
        "train/circle,circle": f"{where}:3: {root}/train/circle is a folder",
        "train/circle/001.png,circle,round": f"{where}:3: 3 field(s) where the header has 2 (quote a path or label "
                                             "that holds a comma)",
    }
    for row, message in cases.items():
        assert refusal(root, f"{good}{row}\n") == message


def test_a_file_that_is_not_a_usable_label_file_is_refused_in_one_line(label_files):
    root = label_files["root"]
    where = f"{root}/bad.csv"
    flags = "name the image and label columns with --image_column NAME and --label_column NAME"
    cases = [
        ("", f"{where} is empty; a label file is a header row (image,label) and then one row per image"),
        ("\n \n", f"{where} is empty; a label file is a header row (image,label) and then one row per image"),
        ("image,label\n\n", f"{where} has a header but no image rows"),
        ("path,class\ntrain/circle/000.png,circle\n",
         f"{where}:1: no column 'image' or 'label' in the header (columns found: 'path', 'class'); {flags}"),
        ("file, label\ntrain/circle/000.png,circle\n",
         f"{where}:1: no column 'image' in the header (columns found: 'file', 'label'); {flags}"),
        ("image;label\ntrain/circle/000.png;circle\n", f"{where}:1: no column 'image' or 'label' in the header "
                                                       f"(columns found: 'image;label') (the file must be "
                                                       f"comma-separated); {flags}"),
        ("image,label,image\na,b,c\n", f"{where}:1: the header names column 'image' twice"),
        (b"image,label\ncaf\xe9.png,circle\n", f"{where}:2: not a CSV file of UTF-8 text (byte 0xe9 is not UTF-8); "
                                               "save it as UTF-8"),
        (open(f"{root}/train/circle/000.png", "rb").read(), f"{where}:3: not a CSV file (it holds binary data)"),
        ("image,label\n" + "x" * 200_000 + ",circle\n",
         f"{where}:2: not a CSV file (field larger than field limit ({csv.field_size_limit()}))"),
    ]
    for text, message in cases:
        assert refusal(root, text) == message
    assert refusal(root, "image,label\n" + "".join(f"train/x{i}.png,circle\n" for i in range(3))) == \
        f"{where}:2: image not found: {root}/train/x0.png (and 2 more problem row(s))"
    for call, message in [((f"{root}/missing.csv", "val"), f"--val_csv file not found: {root}/missing.csv"),
                          ((f"{root}/train", "train"), f"--train_csv {root}/train is a folder; pass a CSV file"),
                          ((label_files["train_csv"], "train", f"{root}/nowhere"),
                           f"--image_root {root}/nowhere is not a folder")]:
        with pytest.raises(DataError) as error:
            read_label_file(*call)
        assert str(error.value) == message


def test_the_train_files_classes_bind_the_val_file_and_the_val_folder(label_files):
    root = label_files["root"]
    val_csv = write_csv(f"{root}/v.csv", [("val/circle/000.png", "circle"), ("val/square/000.png", "hexagon")])
    with pytest.raises(DataError) as error:
        run_data(parse_args(csv_flags(dict(label_files, val_csv=val_csv), root)))
    assert str(error.value) == (f"{val_csv}:3: label 'hexagon' is not a class of the training data ('circle', "
                                "'square', 'triangle')")
    os.rename(f"{label_files['val_dir']}/square", f"{label_files['val_dir']}/rectangle")
    with pytest.raises(DataError) as error:
        run_data(parse_args(csv_flags(label_files, root, val_csv=None, val_dir=label_files["val_dir"])))
    assert str(error.value) == (
        f"the class folders of --val_dir {label_files['val_dir']} differ from the labels of --train_csv "
        f"{label_files['train_csv']} (only in the CSV: 'square'; only in the folder: 'rectangle'); --val_dir needs "
        "one class folder per train label, or pass --val_csv FILE")
    with pytest.raises(ConfigError, match="--demo trains on its own digit folders: leave out --train_csv"):
        run_data(parse_args(["--demo", "--train_csv", label_files["train_csv"]]))


def test_the_launcher_refuses_a_bad_label_file_in_one_line_before_anything_spawns(label_files, tmp_path):
    root = label_files["root"]
    missing = write_csv(f"{root}/missing.csv", [("train/circle/000.png", "circle"), ("train/gone.png", "circle")])
    unknown = write_csv(f"{root}/unknown.csv", [("val/circle/000.png", "disc")])
    cases = [(dict(train_csv=missing), f"error: {missing}:3: image not found: {root}/train/gone.png"),
             (dict(val_csv=unknown), f"error: {unknown}:2: label 'disc' is not a class of the training data "
                                     "('circle', 'square', 'triangle')")]
    for flags, message in cases:
        result = run_cli(LAUNCH + csv_flags(label_files, f"{tmp_path}/out", **flags), check=False)
        assert (result.returncode, result.stderr, result.stdout) == (2, message + "\n", "")
        assert not os.path.exists(f"{tmp_path}/out")


def test_the_launcher_checks_label_files_without_importing_torch(label_files, tmp_path):
    check = ("import sys, launch_ddp; args, rest = launch_ddp.build_parser().parse_known_args(sys.argv[1:]); "
             "launch_ddp.check_launch(args, rest, 0); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy')))")
    result = run_cli([sys.executable, "-c", check] + csv_flags(label_files, str(tmp_path)))
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("input_path, sources", [
    ("files", "both"), ("files", "train_csv"), ("files", "val_csv"), ("cache_images", "both"),
    ("decode_on_device", "both")])
def test_label_files_of_the_tree_train_to_the_folders_weights_bit_for_bit(label_files, tmp_path, input_path, sources):
    extra = {"files": {}, "cache_images": dict(cache_images=f"{tmp_path}/cache"),
             "decode_on_device": dict(decode_on_device=True)}[input_path]
    folder_instead = {"both": {}, "train_csv": dict(val_csv=None, val_dir=label_files["val_dir"]),
                      "val_csv": dict(train_csv=None, train_dir=label_files["train_dir"])}[sources]
    assert train_ddp.main(run_flags(label_files, f"{tmp_path}/folders", **extra)) == 0
    assert train_ddp.main(csv_flags(label_files, f"{tmp_path}/csv", **extra, **folder_instead)) == 0
    folders = torch.load(f"{tmp_path}/folders/checkpoints/checkpoint_latest.pth")
    labelled = torch.load(f"{tmp_path}/csv/checkpoints/checkpoint_latest.pth")
    assert labelled["class_names"] == folders["class_names"] == list(CLASSES)
    for metric in ("train_loss", "train_acc", "val_loss", "val_acc"):  # the same validation too
        assert labelled["history"][metric] == folders["history"][metric]
    assert_same_weights(folders["model_state_dict"], labelled["model_state_dict"], exact=True)


def test_the_image_cache_is_reused_for_the_same_rows_and_rebuilt_when_a_label_or_path_changes(label_files, tmp_path,
                                                                                                capsys):
    root, cache = label_files["root"], f"{tmp_path}/cache"

    def train_key(rows):
        label_file = read_label_file(write_csv(f"{root}/k.csv", rows), "train")
        return cache_name(AugmentedLabelFile(label_file, label_file.classes, 16, train=True), 16, 18, cache)

    rows = sorted(tree_rows(root, "train"))
    relabelled = [(path, "square" if path == "train/circle/000.png" else label) for path, label in rows]
    shutil.copy(f"{root}/train/circle/000.png", f"{root}/train/circle/copy.png")
    moved = [(path.replace("000.png", "copy.png") if path == "train/circle/000.png" else path, label)
             for path, label in rows]
    keys = [train_key(rows), train_key(shuffled(rows)), train_key(relabelled), train_key(moved)]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    assert train_ddp.main(csv_flags(label_files, f"{tmp_path}/a", cache_images=cache)) == 0
    assert capsys.readouterr().out.count("MiB, built in") == 2
    write_csv(label_files["train_csv"], relabelled)
    assert train_ddp.main(csv_flags(label_files, f"{tmp_path}/c", cache_images=cache)) == 0
    out = capsys.readouterr().out
    assert out.count("MiB, built in") == 1 and out.count("MiB, reused") == 1  # the train cache anew, the val one kept
    assert len([name for name in os.listdir(cache) if name.endswith(".u8")]) == 3


def test_resuming_a_label_file_run_checks_the_files_classes(label_files, tmp_path, capsys):
    out = f"{tmp_path}/run"
    assert train_ddp.main(csv_flags(label_files, out)) == 0
    checkpoint = f"{out}/checkpoints/checkpoint_latest.pth"
    assert train_ddp.main(csv_flags(label_files, out, resume=checkpoint, epochs=2)) == 0
    assert torch.load(checkpoint)["epoch"] == 2
    for split in ("train", "val"):
        renamed = [(path, "rectangle" if label == "square" else label) for path, label in tree_rows(label_files["root"],
                                                                                                    split)]
        write_csv(label_files[f"{split}_csv"], renamed)
    capsys.readouterr()
    assert train_ddp.main(csv_flags(label_files, out, resume=checkpoint, epochs=3)) == 2
    assert "resume needs the same classes" in capsys.readouterr().err
