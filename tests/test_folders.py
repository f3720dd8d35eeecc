"""folders.py: the torch-free data-folder checks launch_ddp.py runs before anything spawns, and the
one folder walk of training, predict.py and data_split.py."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLASSES, REPO, data_flags, run_cli, train_cmd
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from core.errors import DataError
from inputs.folders import IMAGE_EXTENSIONS, check_data_folders, find_files, has_files, refuse_empty_classes


def test_check_data_folders_returns_the_sorted_class_names(tiny_data):
    assert check_data_folders(tiny_data["train_dir"], tiny_data["val_dir"]) == list(CLASSES)


def test_check_data_folders_errors_name_the_problem_and_the_fix(tiny_data, tmp_path):
    train, val = tiny_data["train_dir"], tiny_data["val_dir"]
    with pytest.raises(DataError, match=r"train folder not found: /nonexistent/train \(pass --train_dir"):
        check_data_folders("/nonexistent/train", val)
    with pytest.raises(DataError, match=r"val folder not found: /nonexistent/val \(pass --val_dir"):
        check_data_folders(train, "/nonexistent/val")
    a_file = tmp_path / "train.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DataError, match=re.escape(f"train folder is not a directory: {a_file}")):
        check_data_folders(str(a_file), val)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(f"{train}/circle/000.png", flat / "000.png")
    with pytest.raises(DataError, match=re.escape(f"train folder {flat} has no class sub-folders; "
                                                  f"expected {flat}/<class_name>/<image files>")):
        check_data_folders(str(flat), val)
    os.rename(f"{val}/square", f"{val}/rectangle")
    with pytest.raises(DataError) as error:
        check_data_folders(train, val)
    assert "val classes differ from train classes" in str(error.value)
    assert "only in train: ['square']" in str(error.value)
    assert "only in val: ['rectangle']" in str(error.value)


def test_a_class_folder_linking_to_itself_is_one_data_error(tiny_data):
    loop = os.path.join(tiny_data["train_dir"], "loop")
    os.symlink("loop", loop)  # was an OSError traceback
    with pytest.raises(DataError, match=re.escape(f"train folder entry {loop} cannot be followed (Too many "
                                                  "levels of symbolic links); fix or remove it")):
        check_data_folders(tiny_data["train_dir"], tiny_data["val_dir"])


def test_the_launchers_image_extensions_are_torchvisions():
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_a_class_folder_without_images_is_refused_with_the_workers_message(tiny_data):
    train = tiny_data["train_dir"]
    refuse_empty_classes(train, list(CLASSES))
    for image in os.listdir(f"{train}/square"):
        os.remove(f"{train}/square/{image}")
    write_files(Path(train) / "square", ["notes.txt", ".hidden.png", "sub/readme.md"])
    with pytest.raises(DataError, match=re.escape(f"no image files in the class folder(s) square of {train} "
                                                  f"(supported extensions: {', '.join(IMG_EXTENSIONS)})")):
        refuse_empty_classes(train, list(CLASSES))


# ------------------------------------------------------------------ find_files: the one folder walk

def write_files(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_find_files_lists_a_plain_tree_as_torchvisions_image_folder_does(tmp_path):
    # "a-b" sorts before "a/b" as a path: sorted(os.walk) is not a depth-first order.
    write_files(tmp_path / "c", ["x.png", "a/y.png", "a-b/z.png", "a/b/w.PNG", "B/v.jpg", "notes.txt"])
    expected = [path for path, _ in make_dataset(str(tmp_path), {"c": 0}, extensions=IMG_EXTENSIONS)]
    assert find_files(str(tmp_path / "c"), IMG_EXTENSIONS) == (expected, [])
    assert len(expected) == 5


def already_included(link, target):
    return (f"skipping {link}: it leads to {target}, which is already included (a link loop, or a second "
            "link to one folder)")


def test_link_loops_are_walked_once_with_one_warning_per_link(tmp_path):
    folder = tmp_path / "cat"
    write_files(folder, ["a.png", "sub/b.png"])
    plain = find_files(str(folder), IMG_EXTENSIONS)[0]
    os.symlink(".", folder / "again")  # alone: 21x the images
    os.symlink("..", folder / "sub" / "up")  # with a second loop: minutes at 11 GB, deaf to SIGTERM
    began = time.perf_counter()
    paths, warnings = find_files(str(folder), IMG_EXTENSIONS)
    assert time.perf_counter() - began < 1
    assert paths == plain == [str(folder / "a.png"), str(folder / "sub" / "b.png")]
    assert warnings == [already_included(folder / "again", folder), already_included(folder / "sub" / "up", folder)]


def test_links_out_of_the_tree_are_followed_but_one_folder_only_once(tmp_path):
    folder, shared = tmp_path / "cat", tmp_path / "shared"
    write_files(folder, ["a.png"])
    write_files(shared, ["s.png", "deeper/t.png"])
    os.symlink(shared, folder / "x")
    os.symlink(shared, folder / "y")
    os.symlink(shared / "deeper", folder / "z")
    paths, warnings = find_files(str(folder), IMG_EXTENSIONS)
    assert paths == [str(folder / "a.png"), str(folder / "x" / "s.png"), str(folder / "x" / "deeper" / "t.png")]
    assert warnings == [already_included(folder / "y", folder / "x"),
                        already_included(folder / "z", folder / "x" / "deeper")]


def test_hidden_entries_are_skipped_and_what_is_not_a_file_is_named(tmp_path):
    folder = tmp_path / "cat"
    write_files(folder, ["a.png", "._a.png", ".hidden.png", ".ipynb_checkpoints/a-checkpoint.png"])
    os.mkfifo(folder / "pipe.png")  # reading it would wait for a writer forever
    os.symlink("nowhere.png", folder / "gone.png")
    os.symlink("self", folder / "self")
    paths, warnings = find_files(str(folder), IMG_EXTENSIONS)
    assert paths == [str(folder / "a.png")]
    assert warnings == [f"skipping {folder / 'gone.png'}: a link that cannot be followed (No such file or directory)",
                        f"skipping {folder / 'pipe.png'}: a FIFO (named pipe), not a regular file",
                        f"skipping {folder / 'self'}: Too many levels of symbolic links"]


def test_has_files_agrees_with_find_files_on_what_counts_as_an_image(tmp_path):
    cases = {"plain": ["a.png"], "nested": ["sub/deeper/a.JPG"], "other files": ["a.txt", "b.png.bak"],
             "hidden only": [".a.png", ".ipynb_checkpoints/a.png"], "nothing": []}
    for name, files in cases.items():
        write_files(tmp_path / name, files)
        (tmp_path / name).mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "nothing" / "pipe.png")
    os.symlink(".", tmp_path / "nothing" / "loop")
    os.symlink("nowhere.png", tmp_path / "nothing" / "gone.png")
    os.symlink(tmp_path / "nested", tmp_path / "other files" / "link")  # images behind a link count
    for name in cases:
        assert has_files(str(tmp_path / name), IMG_EXTENSIONS) == bool(find_files(str(tmp_path / name),
                                                                                  IMG_EXTENSIONS)[0]), name
    assert [has_files(str(tmp_path / name), IMG_EXTENSIONS) for name in cases] == [True, True, True, False, False]


def test_training_skips_loops_fifos_and_hidden_files_with_one_warning_each(tiny_data, tmp_path):
    train = tiny_data["train_dir"]
    os.symlink(".", f"{train}/circle/again")
    os.symlink(".", f"{train}/circle/twice")
    os.mkfifo(f"{train}/square/pipe.png")
    for hidden in ("._000.png", ".ipynb_checkpoints/000-checkpoint.png"):  # unreadable: would stop training
        write_files(Path(train) / "triangle", [hidden])
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn")), timeout=120)
    assert "Training tiny_cnn on 24 images" in result.stdout and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "warning" in line or "error" in line] == [
        f"warning: {already_included(f'{train}/circle/again', f'{train}/circle')}",
        f"warning: {already_included(f'{train}/circle/twice', f'{train}/circle')}",
        f"warning: skipping {train}/square/pipe.png: a FIFO (named pipe), not a regular file"]


def descriptors_under(pid, folder):
    """The paths under `folder` that process `pid` has open (a directory being scanned)."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            found += [target] if target.startswith(folder) else []
    except OSError:  # it closed one while we looked
        pass
    return found


def test_sigterm_during_a_long_scan_ends_the_run_at_once_without_files(tiny_data, tmp_path):
    many = Path(tiny_data["train_dir"]) / "circle" / "many"
    many.mkdir()
    for i in range(60000):  # hard links: the cheapest files to make; ext4 allows 65,000 per file
        os.link(many.parent / "000.png", many / f"{i:05d}.png")
    job = subprocess.Popen(train_cmd(*data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn")),
                           env=dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not descriptors_under(job.pid, str(many)) and job.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert job.poll() is None, "the scan was not seen"
    job.send_signal(signal.SIGTERM)
    sent = time.time()
    first_line = job.stdout.readline()
    stopped = time.time() - sent
    output = first_line + job.communicate(timeout=60)[0]
    assert first_line == "Stopped by signal 15 while setting up; nothing was trained or saved.\n", output
    assert stopped < 1  # the scan stops at once (measured: under a millisecond)
    assert time.time() - sent < 5  # then the interpreter exits (measured: 1.6 s on a loaded 2-core machine)
    assert job.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and not os.path.exists(tmp_path / "run")
