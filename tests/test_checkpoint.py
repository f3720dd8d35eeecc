"""checkpoint.py: atomic saves, safe loads that refuse code-carrying pickles, unwrap, resume checks."""
import os
import re

import pytest
import torch
import torch.nn as nn

from checkpoint import (REQUIRED_KEYS, CheckpointError, check_resumable, load_checkpoint, save_checkpoint,
                        unwrap)
from model import TinyCNN


def make_state(model=None, **overrides):
    model = model or TinyCNN(num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = dict(model_state_dict=model.state_dict(), optimizer_state_dict=optimizer.state_dict(),
                 scaler_state_dict={}, scheduler_state_dict={}, epoch=2, best_acc=50.0,
                 class_names=["circle", "square", "triangle"], model_name="tiny_cnn",
                 config=dict(model="tiny_cnn", batch_size=4), history=dict(epoch=[1, 2]))
    state.update(overrides)
    return state


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp" in name)


class Wrapper(nn.Module):
    """What DistributedDataParallel looks like to unwrap: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class WriteMarker:
    """Unpickling this runs `open(marker, "w")`: a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ save

def test_save_then_load_round_trips_plain_data(tmp_path):
    torch.manual_seed(0)
    state = make_state()
    path = str(tmp_path / "new" / "folder" / "checkpoint_latest.pth")  # folders are created
    save_checkpoint(state, path)
    assert leftovers(os.path.dirname(path)) == []
    loaded = load_checkpoint(path)
    assert set(loaded) == set(state)
    for key, value in state["model_state_dict"].items():
        assert torch.equal(loaded["model_state_dict"][key], value)
    assert loaded["class_names"] == state["class_names"] and loaded["epoch"] == 2
    assert loaded["config"] == state["config"] and loaded["history"] == state["history"]
    assert torch.load(path)["epoch"] == 2  # PyTorch's default weights_only=True load works too


def test_save_overwrites_and_flushes_before_renaming(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(make_state(epoch=1), path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b))[1])
    save_checkpoint(make_state(epoch=2), path)
    assert events[0] == "fsync"
    assert events[1][0] == "replace" and events[1][2] == path
    assert os.path.dirname(os.path.abspath(events[1][1])) == str(tmp_path)  # same file system
    assert load_checkpoint(path)["epoch"] == 2
    assert leftovers(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "checkpoint_latest.pth")
    save_checkpoint(make_state(epoch=1), path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails mid-way
        save_checkpoint(make_state(epoch=2, config=dict(model="tiny_cnn", hook=lambda x: x)), path)
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


def test_save_interrupted_at_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_best.pth")
    save_checkpoint(make_state(epoch=1), path)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_state(epoch=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_best.pth"]


# ------------------------------------------------------------------ load

def test_load_strips_wrapper_prefixes_from_the_model_state(tmp_path):
    state = make_state()
    plain = state["model_state_dict"]
    state["model_state_dict"] = {"module." + k: v for k, v in plain.items()}
    path = str(tmp_path / "ddp.pth")
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)["model_state_dict"]
    assert list(loaded) == list(plain)
    TinyCNN(num_classes=3).load_state_dict(loaded)  # strict


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {tmp_path}/nope.pth")):
        load_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path))  # a folder is not a checkpoint file


def test_text_file_is_not_a_readable_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("epoch 3, accuracy 91%\n")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path))
    assert f"{path} is not a readable PyTorch checkpoint" in str(error.value)


def test_zero_byte_file_is_not_a_readable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"  # e.g. a copy interrupted by a full disk
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(path))
    assert f"{path} is not a readable PyTorch checkpoint" in str(error.value)


@pytest.mark.parametrize("content", [
    {"model_state_dict": {}},                                   # keys missing
    {k: {} for k in REQUIRED_KEYS if k != "class_names"},       # one key missing
    [1, 2, 3],                                                  # not a dict
    {"weight": torch.zeros(3)},                                 # a bare state dict
])
def test_files_that_are_not_training_checkpoints_are_refused(tmp_path, content):
    path = str(tmp_path / "other.pth")
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"{path} is not a training checkpoint of this project" in message
    assert all(key in message for key in REQUIRED_KEYS)


def test_a_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "MARKER"
    path = str(tmp_path / "checkpoint_latest.pth")
    state = make_state(config=dict(model="tiny_cnn", payload=WriteMarker(str(marker))))
    torch.save(state, path)  # torch.save pickles the payload; nothing runs yet
    assert not marker.exists()

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "refusing to load" in str(error.value) and path in str(error.value)
    assert not marker.exists()
    # The payload is malicious by construction (WriteMarker's __reduce__ opens a file for
    # writing); it is never unpickled unsafely here, as nothing in the project may do that.


# ------------------------------------------------------------------ unwrap

def test_unwrap_returns_the_plain_module_inside_ddp_and_compile_wrappers():
    model = TinyCNN(num_classes=3)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert compiled is not model
    assert unwrap(model) is model
    assert unwrap(Wrapper(model)) is model
    assert unwrap(compiled) is model
    assert unwrap(Wrapper(compiled)) is model           # DDP(torch.compile(model))
    assert unwrap(torch.compile(Wrapper(model))) is model  # torch.compile(DDP(model))
    assert list(unwrap(Wrapper(compiled)).state_dict()) == list(model.state_dict())


# ------------------------------------------------------------------ check_resumable

def test_check_resumable_accepts_the_same_classes_and_model():
    checkpoint = make_state()
    assert check_resumable(checkpoint, "ck.pth", ["circle", "square", "triangle"], "tiny_cnn") is None


def test_check_resumable_refuses_other_classes():
    checkpoint = make_state()
    with pytest.raises(CheckpointError) as error:
        check_resumable(checkpoint, "ck.pth", ["circle", "rectangle", "triangle"], "tiny_cnn")
    message = str(error.value)
    assert "ck.pth was trained on 3 classes (circle, square, triangle...)" in message
    assert "--train_dir has 3 (circle, rectangle, triangle...)" in message
    assert "resume needs the same classes" in message
    with pytest.raises(CheckpointError, match="resume needs the same classes"):
        check_resumable(checkpoint, "ck.pth", ["square", "circle", "triangle"], "tiny_cnn")  # order matters


def test_check_resumable_refuses_another_model_and_names_the_flag():
    with pytest.raises(CheckpointError) as error:
        check_resumable(make_state(), "ck.pth", ["circle", "square", "triangle"], "resnet18")
    assert str(error.value) == ("ck.pth holds a 'tiny_cnn' model, but --model is 'resnet18'; "
                                "pass --model tiny_cnn to resume it")
    old = make_state(config=dict(batch_size=4))  # config without "model": the resnet18 default
    check_resumable(old, "old.pth", ["circle", "square", "triangle"], "resnet18")
    with pytest.raises(CheckpointError, match="holds a 'resnet18' model"):
        check_resumable(old, "old.pth", ["circle", "square", "triangle"], "tiny_cnn")
