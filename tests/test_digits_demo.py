"""dataset.prepare_digits_demo: scikit-learn's digits written once as an ImageFolder tree for
--demo, deterministically, and never left half-written."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_data, run_cli, train_cmd
from PIL import Image

from dataset import AugmentedImageFolder, prepare_digits_demo


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("one") / "digits"
    train, val = prepare_digits_demo(str(root))
    return dict(root=str(root), train=train, val=val)


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_digits_demo_writes_1797_pngs_in_a_stratified_80_20_split(digits):
    from sklearn.datasets import load_digits

    assert digits["train"] == os.path.join(digits["root"], "train")
    assert digits["val"] == os.path.join(digits["root"], "val")
    assert sorted(os.listdir(digits["root"])) == ["train", "val"]
    names = [str(d) for d in range(10)]
    assert sorted(os.listdir(digits["train"])) == sorted(os.listdir(digits["val"])) == names
    target = load_digits().target
    all_indices = []
    for label in range(10):
        train_files = os.listdir(f"{digits['train']}/{label}")
        val_files = os.listdir(f"{digits['val']}/{label}")
        n_class = int((target == label).sum())
        assert len(train_files) + len(val_files) == n_class
        assert len(val_files) == round(0.2 * n_class)
        indices = [int(f[:-4]) for f in train_files + val_files]
        assert all(f.endswith(".png") for f in train_files + val_files)
        assert all(target[i] == label for i in indices)  # each file is in its digit's folder
        all_indices += indices
    assert sorted(all_indices) == list(range(1797))  # every digit once: train and val disjoint
    assert not [n for n in os.listdir(os.path.dirname(digits["root"])) if n.startswith(".digits-")]


def test_digits_demo_images_are_the_8x8_scans_scaled_to_0_255(digits):
    from sklearn.datasets import load_digits

    images = load_digits().images
    for split, label in [("train", 0), ("val", 7)]:
        folder = f"{digits[split]}/{label}"
        name = sorted(os.listdir(folder))[0]
        with Image.open(f"{folder}/{name}") as image:
            assert image.size == (8, 8) and image.mode == "L"
            pixels = np.asarray(image)
        expected = (images[int(name[:-4])] * (255 / 16)).round().astype(np.uint8)
        assert np.array_equal(pixels, expected)
    dataset = AugmentedImageFolder(digits["val"], 32, train=False)
    assert dataset.classes == [str(d) for d in range(10)] and len(dataset) == 359
    assert dataset[0][0].shape == (3, 32, 32)


def test_digits_demo_is_deterministic_and_written_only_once(digits, tmp_path):
    other = str(tmp_path / "digits")
    prepare_digits_demo(other)
    assert listing(other) == listing(digits["root"])
    sample = os.path.join("val", "3", sorted(os.listdir(f"{other}/val/3"))[5])
    assert open(os.path.join(other, sample), "rb").read() == open(os.path.join(digits["root"], sample), "rb").read()

    stamps = {p: os.stat(os.path.join(other, p)).st_mtime_ns for p in listing(other)}
    os.remove(os.path.join(other, sample))  # a second call must not even look at the files
    assert prepare_digits_demo(other) == (os.path.join(other, "train"), os.path.join(other, "val"))
    assert not os.path.exists(os.path.join(other, sample))
    assert {p: os.stat(os.path.join(other, p)).st_mtime_ns for p in listing(other)} == \
        {p: t for p, t in stamps.items() if p != sample}
    assert sorted(os.listdir(tmp_path)) == ["digits"]  # no staging folder left behind


def test_a_signal_while_the_digits_demo_is_written_leaves_nothing_behind(tmp_path):
    # DEMO_DIR is relative: the demo goes to tmp_path/data/digits.
    job = subprocess.Popen(train_cmd("--demo", "--checkpoint_dir", "run/checkpoints", "--log_dir", "run/logs"),
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and job.poll() is None and not list((tmp_path / "data").glob(".digits-*")):
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=60)[0]
    assert job.returncode == 128 + signal.SIGTERM, output
    assert output == "Stopped by signal 15 while setting up; nothing was trained or saved.\n"
    assert os.listdir(tmp_path / "data") == [] and not os.path.exists(tmp_path / "run")


def class_count(checkpoint_path):
    return len(torch.load(checkpoint_path)["class_names"])


def test_the_demo_then_other_photos_then_the_demo_again_each_keep_the_run_before(tmp_path):
    # The default --checkpoint_dir and --log_dir, as a newcomer runs them, one run after another.
    photos = make_tiny_data(str(tmp_path / "photos"))
    quick = ["--model", "tiny_cnn", "--epochs", "1", "--limit_train_batches", "2", "--limit_val_batches", "1"]
    runs = [["--demo"],
            ["--train_dir", photos["train_dir"], "--val_dir", photos["val_dir"], "--image_size", "16",
             "--batch_size", "4"],
            ["--demo"]]
    outputs, bests = [], []
    for flags in runs:
        outputs.append(run_cli(train_cmd(*flags, *quick), cwd=str(tmp_path)).stdout)
        bests.append(open(tmp_path / "checkpoints" / "checkpoint_best.pth", "rb").read())
    first, second = sorted(os.listdir(tmp_path / "checkpoints" / "previous"))
    assert sorted(os.listdir(tmp_path / "logs" / "previous")) == [first, second]
    assert "files moved to" not in outputs[0]
    for output, moved in zip(outputs[1:], (first, second)):
        assert (f"Note: this is a new run, so the previous run's files moved to checkpoints/previous/{moved}/ and "
                f"logs/previous/{moved}/ (to continue that run instead: --resume "
                f"checkpoints/previous/{moved}/checkpoint_latest.pth)\n") in output
        assert os.path.isfile(tmp_path / "logs" / "previous" / moved / "training_history.json")
    for run, moved in enumerate((first, second)):
        assert open(tmp_path / "checkpoints" / "previous" / moved / "checkpoint_best.pth", "rb").read() == bests[run]
    assert class_count(tmp_path / "checkpoints" / "previous" / first / "checkpoint_best.pth") == 10  # the demo
    assert class_count(tmp_path / "checkpoints" / "previous" / second / "checkpoint_best.pth") == 3  # the photos
    assert class_count(tmp_path / "checkpoints" / "checkpoint_best.pth") == 10  # where the seeds' snippet looks
