"""config.py's data-folder checks: the torch-free checks launch_ddp.py runs before anything spawns."""
import os
import re
import shutil

import pytest

from config import DataError, check_data_folders
from conftest import CLASSES


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
