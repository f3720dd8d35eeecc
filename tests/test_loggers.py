"""RunLogger against the real wandb (offline) and TensorBoard: everything logged is read back from disk."""
import json
import sys
import time
import types

import torch
from conftest import read_wandb_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.loggers import RunLogger

MAIN = types.SimpleNamespace(is_main=True)
OTHER_RANK = types.SimpleNamespace(is_main=False)
STEPS = {  # step -> what train_ddp.py logs every --log_every_steps (tensors as the loop holds them)
    10: {"train/loss": torch.tensor(2.5), "train/learning_rate": 1e-3, "train/grad_norm": torch.tensor(4.0)},
    20: {"train/loss": torch.tensor(1.25), "train/learning_rate": 5e-4, "train/grad_norm": 2.0},
}
EPOCH = {"train/epoch_loss": 1.5, "train/samples_per_second": 640.0, "val/loss": torch.tensor(0.75),
         "val/acc": 87.5, "epoch": 1}  # logged at the last step, 20


def make_args(tmp_path, use_wandb=False, use_tensorboard=False):
    return types.SimpleNamespace(use_wandb=use_wandb, wandb_project="ddp-classify-test", wandb_name="tiny",
                                 use_tensorboard=use_tensorboard, log_dir=str(tmp_path / "logs"),
                                 learning_rate=1e-3, batch_size=4, model="tiny_cnn")


def log_a_run(logger):
    for step, metrics in STEPS.items():
        logger.log(metrics, step=step)
    logger.log(EPOCH, step=20)
    logger.close()


def test_wandb_offline_run_holds_logged_metrics_and_config(tmp_path, wandb_env, capsys):
    args = make_args(tmp_path, use_wandb=True)
    log_a_run(RunLogger(args, MAIN, config=vars(args)))

    [run_file] = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert f"wandb: offline run in {run_file.parent}" in capsys.readouterr().out
    records = read_wandb_records(run_file)

    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [10, 20]
    expected = {10: STEPS[10], 20: {**STEPS[20], **EPOCH}}  # the epoch metrics join step 20's row
    for step, metrics in expected.items():
        for name, value in metrics.items():
            assert history[step][name] == float(value), (step, name)

    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["display_name"]) == ("ddp-classify-test", "tiny")
    config = run["config"]["update"]
    assert {key: config[key] for key in vars(args)} == vars(args)
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]  # finish() ran


def test_tensorboard_scalars_and_config_read_back(tmp_path, capsys):
    args = make_args(tmp_path, use_tensorboard=True)
    log_a_run(RunLogger(args, MAIN, config=vars(args)))
    assert not (tmp_path / "logs" / "wandb").exists()

    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    expected = {}
    for step, metrics in [*STEPS.items(), (20, EPOCH)]:
        for name, value in metrics.items():
            expected.setdefault(name, []).append((step, float(value)))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, points in expected.items():
        # event files hold float32: compare with the float32 rounding of what was logged
        want = [(step, float(torch.tensor(value, dtype=torch.float32))) for step, value in points]
        assert [(e.step, e.value) for e in events.Scalars(name)] == want, name

    [text] = events.Tensors("config/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line[4:] for line in markdown.splitlines())) == vars(args)
    assert "tensorboard: writing to" in capsys.readouterr().out


def test_both_backends_at_once(tmp_path, wandb_env):
    args = make_args(tmp_path, use_wandb=True, use_tensorboard=True)
    log_a_run(RunLogger(args, MAIN, config=vars(args)))

    [run_file] = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = [r["history"]["item"] for r in read_wandb_records(run_file) if r["type"] == "history"]
    assert [row["val/acc"] for row in history if "val/acc" in row] == [87.5]
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/acc")] == [(20, 87.5)]


def test_missing_wandb_warns_once_and_tensorboard_goes_on(tmp_path, wandb_env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    args = make_args(tmp_path, use_wandb=True, use_tensorboard=True)
    logger = RunLogger(args, MAIN)
    log_a_run(logger)
    logger.close()  # a second close is harmless

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: wandb logging disabled: cannot import wandb")
    assert not (tmp_path / "logs" / "wandb").exists()
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20]


def test_missing_tensorboard_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # so torch imports it again
    log_a_run(RunLogger(make_args(tmp_path, use_tensorboard=True), MAIN))

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: tensorboard logging disabled: cannot import tensorboard")
    assert not (tmp_path / "logs" / "tensorboard").exists()


def test_wandb_online_without_a_server_fails_fast_with_one_warning(tmp_path, wandb_env, monkeypatch, capsys):
    # Nothing listens on 127.0.0.1:9: every request is refused, as on a node without network.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a well-formed dummy key, so init gets to the network
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    start = time.monotonic()
    logger = RunLogger(make_args(tmp_path, use_wandb=True), MAIN)
    assert time.monotonic() - start < 15
    assert logger.wandb_run is None
    log_a_run(logger)

    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb logging disabled: "), warnings


def test_other_ranks_write_and_import_nothing(tmp_path, monkeypatch, capsys):
    # Were a non-main rank to import either package, these would make it print a warning.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log_a_run(RunLogger(make_args(tmp_path, use_wandb=True, use_tensorboard=True), OTHER_RANK))

    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")
