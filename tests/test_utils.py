"""utils.py: the history, its plot CLI and atomic JSON."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import utils
from conftest import REPO, run_cli
from utils import HISTORY_KEYS, append_history, new_history, write_json_atomic


def three_epoch_history():
    history = new_history()
    for epoch in (1, 2, 3):
        record = dict.fromkeys(HISTORY_KEYS, 0)  # counters such as skipped images stay 0 here
        record.update(epoch=epoch, train_loss=2.0 / epoch, train_acc=30.0 * epoch, val_loss=2.2 / epoch,
                      val_acc=28.0 * epoch, learning_rate=1e-3 / epoch, epoch_seconds=1.5,
                      samples_per_second=400.0 + epoch, ema_val_acc=27.0 * epoch)
        append_history(history, record)
    return history


def plot_cmd(*args):
    return [sys.executable, os.path.join(REPO, "utils.py"), *map(str, args)]


# ------------------------------------------------------------------ history

def test_history_has_one_list_per_key_and_appends_records_in_order():
    history = three_epoch_history()
    assert list(history) == list(HISTORY_KEYS) + ["ema_val_acc"]  # optional metrics get their own list
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "learning_rate", "epoch_seconds",
            "samples_per_second"} <= set(HISTORY_KEYS)
    assert history["epoch"] == [1, 2, 3]
    assert history["val_acc"] == [28.0, 56.0, 84.0]
    assert history["ema_val_acc"] == [27.0, 54.0, 81.0]
    with pytest.raises(KeyError):
        append_history(history, dict(epoch=4))
    assert new_history() == {key: [] for key in HISTORY_KEYS}


# ------------------------------------------------------------------ plot CLI

def test_plot_cli_writes_a_png_of_the_curves(tmp_path):
    history_path = tmp_path / "training_history.json"
    history_path.write_text(json.dumps(three_epoch_history()))
    output = tmp_path / "plots" / "curves.png"
    output.parent.mkdir()
    result = run_cli(plot_cmd("--history", history_path, "--output", output), cwd=str(tmp_path))
    assert result.stdout.strip() == f"wrote {output} (3 epochs)"
    assert output.stat().st_size > 1000
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 800)  # figsize (11, 8) at 100 dpi
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank


def test_plot_cli_missing_history_exits_2_with_one_error_line(tmp_path):
    result = run_cli(plot_cmd("--history", tmp_path / "none.json", "--output", tmp_path / "c.png"),
                     cwd=str(tmp_path), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot read history {tmp_path}/none.json: [Errno 2] No such file or directory: "
        f"'{tmp_path}/none.json'"]
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    ('{"epoch": [1], "train_loss": [0.5]}', "missing keys"),
    ("[1, 2, 3]", "expected a JSON object"),
    ("3", "expected a JSON object"),
    ("null", "expected a JSON object"),
    ("", "Expecting value"),
])
def test_plot_invalid_history_exits_2_with_one_error_line(tmp_path, capsys, content, reason):
    history_path = tmp_path / "history.json"
    history_path.write_text(content)
    code = utils.main(["--history", str(history_path), "--output", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot read history {history_path}: ")
    assert reason in err
    assert not (tmp_path / "c.png").exists()


def test_plot_history_folder_instead_of_file_exits_2(tmp_path, capsys):
    assert utils.main(["--history", str(tmp_path), "--output", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read history {tmp_path}: ")


# ------------------------------------------------------------------ write_json_atomic

def test_write_json_atomic_writes_readable_json_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "logs" / "training_history.json")  # the folder is created
    write_json_atomic(path, three_epoch_history())
    assert json.load(open(path)) == three_epoch_history()
    write_json_atomic(path, {"epoch": [1]})  # overwrites
    assert json.load(open(path)) == {"epoch": [1]}
    assert os.listdir(tmp_path / "logs") == ["training_history.json"]


def test_write_json_atomic_failure_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "history.json")
    write_json_atomic(path, {"epoch": [1]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"epoch": [object()]})  # not JSON-serialisable
    assert json.load(open(path)) == {"epoch": [1]}
