"""checkpoint.py: the schema and RunState, atomic saves, safe loads that refuse code-carrying pickles,
unwrap, resume checks, and the epoch-level decisions (best, early stopping, top-k)."""
import os
import re
import stat
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from engine.checkpoint import (
    EMA_SCHEMA,
    REQUIRED_KEYS,
    SCHEMA,
    CheckpointError,
    RunState,
    is_improvement,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside_previous_run,
    top_k_filename,
    update_top_k,
)
from engine.resume import check_resumable
from model import TinyCNN, strip_wrapper_prefixes, unwrap
from utils import HISTORY_KEYS


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
    assert "the training data has 3 (circle, rectangle, triangle...)" in message
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


# ------------------------------------------------------------------ improvement, top-k

@pytest.mark.parametrize("value, best, min_delta, expected", [
    (50.0, None, 0.0, True),       # the first epoch always improves
    (50.0, None, 99.0, True),
    (50.0, 40.0, 0.0, True),
    (40.0, 40.0, 0.0, False),      # a tie is not an improvement
    (30.0, 40.0, 0.0, False),
    (40.05, 40.0, 0.1, False),     # must beat the best by more than min_delta
    (40.2, 40.0, 0.1, True),
])
def test_is_improvement_for_val_acc_needs_a_higher_value(value, best, min_delta, expected):
    assert is_improvement(value, best, "val_acc", min_delta) is expected


@pytest.mark.parametrize("value, best, min_delta, expected", [
    (0.9, None, 0.0, True),
    (0.5, 0.6, 0.0, True),
    (0.6, 0.6, 0.0, False),
    (0.7, 0.6, 0.0, False),
    (0.55, 0.6, 0.1, False),
    (0.45, 0.6, 0.1, True),
])
def test_is_improvement_for_val_loss_needs_a_lower_value(value, best, min_delta, expected):
    assert is_improvement(value, best, "val_loss", min_delta) is expected


def run_top_k(values, k, monitor):
    """Feed per-epoch values (epochs 1, 2, ...) through update_top_k as train_ddp.py does; return the
    kept list and the per-epoch (entered, dropped) decisions."""
    top_k, decisions = [], []
    for epoch, value in enumerate(values, start=1):
        top_k, entered, dropped = update_top_k(top_k, k, epoch, value, monitor)
        decisions.append((entered, dropped))
    return top_k, decisions


def test_top_k_keeps_the_k_highest_accuracies_and_drops_the_rest():
    top_k, decisions = run_top_k([50.0, 70.0, 60.0, 80.0, 10.0], 2, "val_acc")
    assert top_k == [[80.0, 4], [70.0, 2]]
    assert decisions == [(True, []), (True, []), (True, [1]), (True, [3]), (False, [5])]


def test_top_k_keeps_the_k_lowest_losses():
    top_k, decisions = run_top_k([0.9, 0.5, 0.7, 0.4], 2, "val_loss")
    assert top_k == [[0.4, 4], [0.5, 2]]
    assert decisions == [(True, []), (True, []), (True, [1]), (True, [3])]


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_top_k_ties_keep_the_earlier_epoch(monitor):
    top_k, decisions = run_top_k([5.0, 5.0, 5.0], 2, monitor)
    assert [epoch for _, epoch in top_k] == [1, 2]
    assert decisions[2] == (False, [3])  # a later tie never displaces a kept epoch


def test_top_1_and_a_k_larger_than_the_run():
    assert run_top_k([1.0, 3.0, 2.0], 1, "val_acc")[0] == [[3.0, 2]]
    top_k, decisions = run_top_k([1.0, 3.0, 2.0], 5, "val_acc")
    assert top_k == [[3.0, 2], [2.0, 3], [1.0, 1]] and all(d == (True, []) for d in decisions)


def test_update_top_k_does_not_modify_its_input():
    before = [[70.0, 1], [60.0, 2]]
    update_top_k(before, 2, 3, 80.0, "val_acc")
    assert before == [[70.0, 1], [60.0, 2]]


def test_top_k_file_names_sort_by_epoch():
    assert top_k_filename(7) == "checkpoint_epoch007.pth"
    assert top_k_filename(123) == "checkpoint_epoch123.pth"
    assert sorted(top_k_filename(e) for e in (10, 2, 100)) == [top_k_filename(e) for e in (2, 10, 100)]


# ------------------------------------------------------------------ strip_wrapper_prefixes

def test_strip_wrapper_prefixes_removes_ddp_and_compile_prefixes_only_at_the_start():
    value = torch.ones(1)
    state = {"module.conv1.weight": value, "_orig_mod.fc.bias": 2, "module._orig_mod.layer1.0.bn1.weight": 3,
             "module.module.x": 4, "bn.running_mean": 5, "layer.module.y": 6, "mymodule.z": 7}
    assert strip_wrapper_prefixes(state) == {
        "conv1.weight": value, "fc.bias": 2, "layer1.0.bn1.weight": 3, "x": 4, "bn.running_mean": 5,
        "layer.module.y": 6, "mymodule.z": 7}
    assert strip_wrapper_prefixes(state)["conv1.weight"] is value  # tensors are not copied
    assert list(strip_wrapper_prefixes(state))[:2] == ["conv1.weight", "fc.bias"]  # order kept


def test_strip_wrapper_prefixes_handles_torch_compile_of_a_ddp_model():
    # torch.compile(DDP(model)).state_dict() has keys `_orig_mod.module.<name>`.
    model = TinyCNN(num_classes=2)
    wrapped = nn.Module()
    wrapped.module = model
    compiled = torch.compile(wrapped)
    keys = list(compiled.state_dict())
    assert keys[0] == "_orig_mod.module.features.0.weight"
    assert list(strip_wrapper_prefixes(compiled.state_dict())) == list(model.state_dict())



# ------------------------------------------------------------------ the schema and RunState

def test_a_saved_checkpoint_holds_exactly_the_documented_keys(tiny_data, tmp_path):
    from conftest import REPO, data_flags, run_cli, train_cmd
    for name, extra in (("plain", {}), ("ema", {"use_ema": True})):
        run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/{name}", model="tiny_cnn", **extra)))
    plain = torch.load(f"{tmp_path}/plain/checkpoints/checkpoint_latest.pth")
    with_ema = torch.load(f"{tmp_path}/ema/checkpoints/checkpoint_latest.pth")
    assert set(plain) == set(SCHEMA)
    assert set(with_ema) == set(SCHEMA) | set(EMA_SCHEMA)
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme[readme.index("| key | content |"):].split("\n\n")[0]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    assert set(SCHEMA) | set(EMA_SCHEMA) <= documented, "README's checkpoint table lacks keys"


def built_run(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return SimpleNamespace(model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                           scheduler=torch.optim.lr_scheduler.LinearLR(optimizer), ema=None)


def test_run_state_round_trips_through_a_checkpoint_into_a_freshly_built_run():
    trained = built_run(seed=1)
    trained.model(torch.randn(2, 3, 8, 8)).sum().backward()
    trained.optimizer.step()
    trained.scheduler.step()
    state = RunState(epoch=3, step=2, best_acc=75.0, best_metric=0.5, best_epoch=2, stale_epochs=1,
                     top_k=[[0.5, 2]], history={"epoch": [1, 2, 3]})
    checkpoint = state.to_checkpoint(trained, ["a", "b", "c"], {"model": "tiny_cnn"}, rng=[rng_state()],
                                     train_partial=[{"loss": 1.5}])
    assert set(checkpoint) == set(SCHEMA)
    fresh = built_run(seed=2)
    restored = RunState.restore(checkpoint, fresh, rank=0)
    assert restored == RunState(**{**vars(state), "train_partial": [{"loss": 1.5}]})
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)
    assert fresh.scheduler.state_dict() == trained.scheduler.state_dict()
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1


def test_run_state_end_epoch_decides_best_early_stopping_and_top_k():
    args = SimpleNamespace(monitor_metric="val_loss", early_stopping_min_delta=0.1, save_top_k=1,
                           early_stopping_patience=2)
    state = RunState()
    def record(epoch, acc):
        return dict(dict.fromkeys(HISTORY_KEYS, 0), epoch=epoch, val_acc=acc)

    assert state.end_epoch(record(1, 50.0), 1.0, args) == (
        ["checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_epoch001.pth"], [])
    # Better, but by less than min_delta: best checkpoint and top-k move, early stopping counts it stale.
    assert state.end_epoch(record(2, 40.0), 0.95, args) == (
        ["checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_epoch002.pth"], [1])
    assert (state.best_metric, state.best_epoch, state.best_acc, state.stale_epochs) == (0.95, 2, 50.0, 1)
    assert not state.should_stop_early(args)
    assert state.end_epoch(record(3, 60.0), 2.0, args) == (["checkpoint_latest.pth"], [3])
    assert state.should_stop_early(args) and state.history["epoch"] == [1, 2, 3] and state.epoch == 3


def test_a_save_syncs_the_file_then_its_directory_so_the_rename_survives_a_power_loss(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append("directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(make_state(), str(tmp_path / "checkpoint_latest.pth"))
    assert synced == ["file", "directory"]


# ------------------------------------------------------------------ a new run sets the previous one aside

def write_previous_run(checkpoints, logs, ended="2024-05-06 07:08:09"):
    """A finished run's files, an export of its best checkpoint among them, all last written at `ended`;
    and files that are not the run's (a note of the user's, wandb's own run folder)."""
    files = {f"{checkpoints}/checkpoint_best.pth": b"best", f"{checkpoints}/checkpoint_latest.pth": b"latest",
             f"{checkpoints}/checkpoint_epoch002.pth": b"top-k", f"{checkpoints}/checkpoint_best.onnx": b"onnx",
             f"{checkpoints}/checkpoint_best.onnx.json": b"{}", f"{logs}/training_history.json": b"{}",
             f"{logs}/config.json": b"{}", f"{logs}/best_per_class.json": b"{}",
             f"{logs}/tensorboard/events.out.tfevents.1": b"events", f"{logs}/sample_trace/rank0.jsonl": b"",
             f"{checkpoints}/notes.txt": b"mine", f"{logs}/wandb/run-1/run-1.wandb": b"wandb"}
    stamp = time.mktime(time.strptime(ended, "%Y-%m-%d %H:%M:%S"))
    for path, content in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    for path in files:
        for written in (path, os.path.dirname(path)):  # the folders too: tensorboard/ is one of the run's
            os.utime(written, (stamp, stamp))
    return files


def test_a_previous_run_moves_whole_into_previous_named_after_when_it_ended(tmp_path):
    checkpoints, logs = str(tmp_path / "checkpoints"), str(tmp_path / "logs")
    files = write_previous_run(checkpoints, logs)
    moved = set_aside_previous_run(checkpoints, logs)
    kept = {f"{checkpoints}/notes.txt", f"{logs}/wandb/run-1/run-1.wandb"}  # not the run's: they stay
    for path, content in files.items():
        folder, name = os.path.relpath(path, tmp_path).split(os.sep, 1)
        where = path if path in kept else f"{tmp_path}/{folder}/previous/20240506-070809/{name}"
        assert open(where, "rb").read() == content, path
    assert sorted(os.listdir(checkpoints)) == ["notes.txt", "previous"]
    assert sorted(os.listdir(logs)) == ["previous", "wandb"]
    assert moved[f"{checkpoints}/checkpoint_best.pth"] == f"{checkpoints}/previous/20240506-070809/checkpoint_best.pth"
    assert moved[f"{logs}/tensorboard"] == f"{logs}/previous/20240506-070809/tensorboard"
    assert len(moved) == 10


def test_runs_that_ended_in_the_same_second_get_their_own_folders_and_one_folder_serves_both_dirs(tmp_path):
    out = str(tmp_path / "out")  # --checkpoint_dir and --log_dir the same folder
    write_previous_run(out, out)
    set_aside_previous_run(out, out)
    write_previous_run(out, out)
    moved = set_aside_previous_run(out, out)
    assert sorted(os.listdir(f"{out}/previous")) == ["20240506-070809", "20240506-070809-2"]
    assert set(moved.values()) == {f"{out}/previous/20240506-070809-2/{name}" for name in os.listdir(
        f"{out}/previous/20240506-070809-2")}
    assert set_aside_previous_run(out, out) == {}  # nothing of a run left to move
    assert set_aside_previous_run(str(tmp_path / "none"), str(tmp_path / "none")) == {}
    assert not os.path.exists(tmp_path / "none")


def test_a_previous_run_that_cannot_be_moved_is_one_clear_error_and_stays(tmp_path):
    checkpoints, logs = str(tmp_path / "checkpoints"), str(tmp_path / "logs")
    files = write_previous_run(checkpoints, logs)
    with open(f"{checkpoints}/previous", "w") as f:  # a file where the folder should go
        f.write("in the way")
    with pytest.raises(CheckpointError) as caught:
        set_aside_previous_run(checkpoints, logs)
    assert str(caught.value).startswith(f"cannot move the previous run's files in {checkpoints}/ aside to "
                                        f"{checkpoints}/previous/20240506-070809/ (")
    assert "move or delete them yourself, or pick another --checkpoint_dir and --log_dir" in str(caught.value)
    assert all(open(path, "rb").read() == content for path, content in files.items())
