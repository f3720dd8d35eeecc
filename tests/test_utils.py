"""utils.py: the history, its plot CLI, and the history written as JSON (core.files.write_json_atomic)."""
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image

import utils
from core.files import write_json_atomic
from utils import HISTORY_KEYS, append_history, new_history


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


def visible_ticks(ax):
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


@pytest.mark.parametrize("epochs, epoch_ticks", [(1, [1]), (3, [1, 2, 3]), (40, list(range(4, 41, 4)))])
def test_plot_axes_count_whole_epochs_show_loss_on_a_log_scale_and_throughput_from_zero(epochs, epoch_ticks):
    import matplotlib.pyplot as plt

    history = new_history()
    for epoch in range(1, epochs + 1):
        record = dict.fromkeys(HISTORY_KEYS, 0)
        record.update(epoch=epoch, train_loss=3.0 / epoch, val_loss=31.0 if epoch == 1 else 1.5 / epoch,
                      train_acc=60.0, val_acc=55.0, learning_rate=1e-3, samples_per_second=5.71 + 0.05 * (epoch % 3))
        append_history(history, record)
    figure = utils.history_figure(history)
    figure.canvas.draw()
    loss, accuracy, learning_rate, throughput = figure.axes
    assert [visible_ticks(ax) for ax in figure.axes] == [epoch_ticks] * 4  # no epoch 1.25
    assert loss.get_yscale() == "log"  # the diverged first epoch does not flatten the others
    labels = [label.get_text() for label in loss.get_yticklabels() + loss.get_yticklabels(minor=True)]
    assert "10" in labels and not any("times" in label for label in labels)  # 10, not 1x10^1
    low, high = loss.get_ylim()
    assert low <= min(history["train_loss"]) and high >= 31.0
    assert throughput.get_ylim()[0] == 0 and throughput.get_ylim()[1] >= max(history["samples_per_second"])
    plt.close(figure)


@pytest.mark.parametrize("flag, what", [("--history", "history"), ("--confusion", "confusion matrix")])
def test_plot_cli_missing_input_exits_2_with_one_error_line(tmp_path, flag, what):
    result = run_cli(plot_cmd(flag, tmp_path / "none.json", "--output", tmp_path / "c.png"),
                     cwd=str(tmp_path), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot read {what} {tmp_path}/none.json: [Errno 2] No such file or directory: "
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
    assert_plot_refuses(tmp_path, capsys, "--history", "history", content, reason)


def assert_plot_refuses(tmp_path, capsys, flag, what, content, reason):
    """utils.py given `content` after `flag`: exit 2, one `error: cannot read {what} ...` line, no PNG."""
    path = tmp_path / "input.json"
    path.write_text(content)
    code = utils.main([flag, str(path), "--output", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot read {what} {path}: ")
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


# ------------------------------------------------------------------ confusion-matrix plot CLI

def ninety_class_report():
    """A synthetic best_per_class.json: 90 classes, mostly right, some confused with a neighbour."""
    rng = np.random.RandomState(0)
    confusion = np.diag(rng.randint(5, 20, size=90)) + np.eye(90, k=1, dtype=int) * rng.randint(0, 6, size=90)
    names = [f"animal_{k:02d}_with_a_long_name" for k in range(90)]
    return dict(epoch=7, weights="model", class_names=names, confusion_matrix=confusion.tolist())


def test_confusion_cli_draws_90_classes_as_a_readable_png(tmp_path):
    report_path = tmp_path / "best_per_class.json"
    report_path.write_text(json.dumps(ninety_class_report()))
    output = tmp_path / "confusion.png"
    result = run_cli(plot_cmd("--confusion", report_path, "--output", output), cwd=str(tmp_path))
    assert result.stdout.strip() == f"wrote {output} (90 classes)"
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (1620, 1470)  # figsize (16.2, 14.7) at 100 dpi: 90 rows of about 11 pixels
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # a colour scale, text and the matrix: not blank
    assert output.stat().st_size > 20_000


def test_confusion_cli_without_output_writes_confusion_png_and_keeps_curves_png_for_history(tmp_path):
    (tmp_path / "best_per_class.json").write_text(json.dumps(
        dict(epoch=1, class_names=["cat", "dog"], confusion_matrix=[[3, 1], [0, 0]])))  # dog: no images
    (tmp_path / "training_history.json").write_text(json.dumps(three_epoch_history()))
    run_cli(plot_cmd("--confusion", "best_per_class.json"), cwd=str(tmp_path))
    run_cli(plot_cmd("--history", "training_history.json"), cwd=str(tmp_path))
    assert (tmp_path / "confusion.png").stat().st_size > 1000 and (tmp_path / "curves.png").stat().st_size > 1000


MALFORMED_REPORTS = {  # what is wrong: the file's content
    "Expecting property name": "{not json",
    "expected a JSON object with class_names": "[[1, 0], [0, 1]]",
    "expected a JSON object with class_names and": '{"class_names": "ab", "confusion_matrix": [[1]]}',
    "must be 2 x 2 non-negative counts": '{"class_names": ["a", "b"]}',
    "inhomogeneous": '{"class_names": ["a", "b"], "confusion_matrix": [[1, 0], [0]]}',
    "must be 2 x 2": '{"class_names": ["a", "b"], "confusion_matrix": [[1, 0, 0], [0, 1, 0]]}',
    "must be 1 x 1 non-negative counts": '{"class_names": ["a"], "confusion_matrix": [[-1]]}',
    "must be 1 x 1": '{"class_names": ["a"], "confusion_matrix": [[null]]}',
    "could not convert string to float": '{"class_names": ["a"], "confusion_matrix": [["x"]]}',
    "float() argument must be": '{"class_names": ["a"], "confusion_matrix": [[{}]]}',
    "must be 0 x 0": '{"class_names": [], "confusion_matrix": []}',
}


@pytest.mark.parametrize("reason, content", MALFORMED_REPORTS.items())
def test_confusion_cli_malformed_json_exits_2_with_one_error_line(tmp_path, capsys, reason, content):
    assert_plot_refuses(tmp_path, capsys, "--confusion", "confusion matrix", content, reason)


def test_plot_cli_draws_top5_even_when_it_starts_later_than_the_history(tmp_path):
    history = three_epoch_history()
    history["val_acc5"] = [90.0, 95.0]  # resumed at epoch 2 from a checkpoint of a version without top-5
    (tmp_path / "history.json").write_text(json.dumps(history))
    result = run_cli(plot_cmd("--history", "history.json"), cwd=str(tmp_path))
    assert result.stdout.strip() == "wrote curves.png (3 epochs)" and (tmp_path / "curves.png").stat().st_size > 1000
