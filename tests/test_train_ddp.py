"""train_ddp.py: the training loop's guarantees, proven on real runs (1 process and real torchrun)."""
import json
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    REPO,
    assert_same_weights,
    data_flags,
    load_weights,
    run_cli,
    torchrun,
    train_cmd,
    wait_for_checkpoint,
)

import train_ddp
from dataset import IMAGENET_MEAN, IMAGENET_STD, AugmentedImageFolder, build_loaders
from engine.batches import BatchStage
from engine.checkpoint import load_checkpoint
from engine.distributed import DistContext
from engine.metrics import evaluate
from model import build_model


def test_one_process_run_writes_loadable_checkpoints_and_history(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    result = run_cli(train_cmd(*data_flags(tiny_data, out, epochs=2)))
    assert "1 process on cpu" in result.stdout
    best = torch.load(f"{out}/checkpoints/checkpoint_best.pth")  # weights_only=True by default
    latest = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert latest["epoch"] == 2
    assert latest["class_names"] == ["circle", "square", "triangle"]
    for key in ("model_state_dict", "optimizer_state_dict", "scaler_state_dict", "best_acc", "config"):
        assert key in best
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in latest["model_state_dict"])
    assert latest["config"]["batch_size"] == 4 and latest["config"]["epochs"] == 2
    history = json.load(open(f"{out}/logs/training_history.json"))
    assert history["epoch"] == [1, 2]
    assert latest["best_acc"] == max(history["val_acc"])
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "learning_rate", "epoch_seconds",
                "samples_per_second"):
        assert len(history[key]) == 2 and all(v >= 0 for v in history[key])


def test_seeds_loading_snippet_works_verbatim_on_a_cli_checkpoint(tiny_data, tmp_path):
    run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path))))
    snippet = (
        "import torch\n"
        "from model import ResNet18Animals90\n"
        "checkpoint = torch.load('checkpoints/checkpoint_best.pth')\n"
        "model = ResNet18Animals90(num_classes=3, pretrained=False)\n"
        "model.load_state_dict(checkpoint['model_state_dict'])\n"
        "print('loaded', sum(p.numel() for p in model.parameters()))\n")
    result = run_cli([sys.executable, "-c", snippet], cwd=str(tmp_path))
    assert result.stdout.startswith("loaded 11")  # ResNet-18 with a 3-way head: 11.18M parameters


def test_accumulation_of_k_micro_batches_equals_one_batch_k_times_larger(tiny_data, tmp_path):
    # TinyCNN has no batch norm, so a batch's gradient is the mean of its samples' gradients and
    # 2 micro-batches of 4 average to exactly the gradient of one batch of 8 (up to float rounding).
    common = dict(model="tiny_cnn", epochs=2, lr_scheduler="none")
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/big", batch_size=8, **common)))
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/accum", batch_size=4,
                                  gradient_accumulation_steps=2, **common)))
    big = load_weights(f"{tmp_path}/big/checkpoints/checkpoint_latest.pth")
    accum = load_weights(f"{tmp_path}/accum/checkpoints/checkpoint_latest.pth")
    assert_same_weights(big, accum, exact=False, atol=1e-5)
    initial = build_model("tiny_cnn", 3).state_dict()
    assert not torch.allclose(initial["fc.weight"], big["fc.weight"])  # training did move the weights


def test_short_last_accumulation_group_is_averaged_over_its_own_micro_batches(tiny_data, tmp_path):
    # 24 images / batch 4 = 6 micro-batches; with k=4 the groups are 4 + 2. The short group's
    # loss is divided by 2, so it equals one update on a batch of 8 images.
    common = dict(model="tiny_cnn", lr_scheduler="none", batch_size=4)
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/k4", gradient_accumulation_steps=4, **common)))
    latest = torch.load(f"{tmp_path}/k4/checkpoints/checkpoint_latest.pth")
    steps = [s["step"] for s in latest["optimizer_state_dict"]["state"].values()]
    assert all(int(s) == 2 for s in steps)  # two optimizer updates: ceil(6 / 4)


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tiny_data, tmp_path):
    common = dict(model="tiny_cnn", epochs=2)
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/one", batch_size=8, **common)))
    result = run_cli(torchrun(2, *data_flags(tiny_data, f"{tmp_path}/two", batch_size=4, **common)))
    assert "2 processes on cpu (gloo)" in result.stdout
    one = load_weights(f"{tmp_path}/one/checkpoints/checkpoint_latest.pth")
    two = load_weights(f"{tmp_path}/two/checkpoints/checkpoint_latest.pth")
    assert_same_weights(one, two, exact=False, atol=1e-5)
    history_one = json.load(open(f"{tmp_path}/one/logs/training_history.json"))
    history_two = json.load(open(f"{tmp_path}/two/logs/training_history.json"))
    assert history_one["train_acc"] == history_two["train_acc"]  # same samples, same predictions


def evaluate_in_one_process(checkpoint_path, val_dir, image_size):
    checkpoint = torch.load(checkpoint_path)
    model = build_model(checkpoint["config"]["model"], len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    val_set = AugmentedImageFolder(val_dir, image_size, train=False)
    _, val_loader = build_loaders(val_set, val_set, batch_size=3, num_workers=0, rank=0, world_size=1,
                                  seed=0, pin_memory=False)
    args = train_ddp.parse_args(["--batch_size", "3"])
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    stage = BatchStage(ctx.device, IMAGENET_MEAN, IMAGENET_STD, torch.contiguous_format)
    pieces = SimpleNamespace(amp_dtype=torch.float32, stage=stage)
    return evaluate(model, val_loader, len(val_set), pieces, ctx, args.batch_size, args.use_amp)


def test_distributed_validation_equals_one_process_exactly_on_an_odd_sized_set(tiny_data, tmp_path):
    # 8 val images over 3 processes: shards of 3, 3 and 2 images; no padding duplicates. Batch 3
    # gives batches of 3, 3 and 2 images in both runs: convolution kernels may round differently
    # for another batch size (oneDNN does for a batch of one), which no aggregation can undo.
    out = str(tmp_path / "run")
    run_cli(torchrun(3, *data_flags(tiny_data, out, batch_size=3)))
    history = json.load(open(f"{out}/logs/training_history.json"))
    val_loss, val_acc = evaluate_in_one_process(f"{out}/checkpoints/checkpoint_latest.pth",
                                                tiny_data["val_dir"], image_size=16)
    assert history["val_loss"][0] == val_loss
    assert history["val_acc"][0] == val_acc
    assert val_acc * 8 / 100 == pytest.approx(round(val_acc * 8 / 100))  # a multiple of 1/8: 8 images


def test_resume_continues_at_the_next_epoch_with_the_saved_optimizer_state(tiny_data, tmp_path):
    # The schedule is constant so a 2-epoch run resumed for a 3rd must equal a straight 3-epoch run.
    common = dict(model="tiny_cnn", lr_scheduler="none")
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/straight", epochs=3, **common)))
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/split", epochs=2, **common)))
    first_leg = torch.load(f"{tmp_path}/split/checkpoints/checkpoint_latest.pth")
    result = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/split", epochs=3,
                                           resume=f"{tmp_path}/split/checkpoints/checkpoint_latest.pth",
                                           **common)))
    assert "Resumed from" in result.stdout and "epoch 2 done" in result.stdout
    assert "Epoch 1/3 |" not in result.stdout and "Epoch 3/3 |" in result.stdout
    resumed = torch.load(f"{tmp_path}/split/checkpoints/checkpoint_latest.pth")
    straight = torch.load(f"{tmp_path}/straight/checkpoints/checkpoint_latest.pth")
    assert resumed["epoch"] == 3 and resumed["history"]["epoch"] == [1, 2, 3]
    assert_same_weights(resumed["model_state_dict"], straight["model_state_dict"], exact=True)
    def step(ckpt):
        return int(next(iter(ckpt["optimizer_state_dict"]["state"].values()))["step"])

    assert step(resumed) == step(straight) == step(first_leg) * 3 // 2


@pytest.mark.parametrize("flags, message", [
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(epochs=-1), "--epochs must be at least 1"),
    (dict(learning_rate=0), "--learning_rate must be in (0, 10]"),
    (dict(num_workers=-2), "--num_workers must be 0 or more"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be at least 1"),
    (dict(batch_size=10**7), "beyond any sensible value"),
    (dict(train_dir="/nonexistent/train"), "train folder not found: /nonexistent/train"),
    (dict(batch_size=64), "fewer than --batch_size 64"),
    (dict(model="resnet_9000"), "unknown model 'resnet_9000'"),
    (dict(resume="/nonexistent.pth"), "checkpoint not found: /nonexistent.pth"),
    (dict(checkpoint_dir="/proc/checkpoints"), "--checkpoint_dir /proc/checkpoints is not writable"),
])
def test_bad_input_gives_one_clear_error_and_exit_code_2(tiny_data, tmp_path, capsys, flags, message):
    code = train_ddp.main(data_flags(tiny_data, str(tmp_path), **flags))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not os.path.exists(f"{tmp_path}/checkpoints")


def test_train_folder_without_class_folders_and_mismatched_val_classes(tiny_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_ddp.main(data_flags(tiny_data, str(tmp_path), train_dir=str(empty))) == 2
    assert "has no class sub-folders" in capsys.readouterr().err
    os.rename(f"{tiny_data['val_dir']}/square", f"{tiny_data['val_dir']}/rectangle")
    assert train_ddp.main(data_flags(tiny_data, str(tmp_path))) == 2
    assert "val classes differ from train classes" in capsys.readouterr().err


def test_resume_refuses_other_classes_and_other_models(tiny_data, tmp_path, capsys):
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/a", model="tiny_cnn")))
    checkpoint = f"{tmp_path}/a/checkpoints/checkpoint_latest.pth"
    before = open(checkpoint, "rb").read()
    assert train_ddp.main(data_flags(tiny_data, f"{tmp_path}/a", resume=checkpoint)) == 2
    assert "holds a 'tiny_cnn' model, but --model is 'resnet18'" in capsys.readouterr().err
    os.rename(f"{tiny_data['train_dir']}/square", f"{tiny_data['train_dir']}/rectangle")
    os.rename(f"{tiny_data['val_dir']}/square", f"{tiny_data['val_dir']}/rectangle")
    assert train_ddp.main(data_flags(tiny_data, f"{tmp_path}/a", resume=checkpoint, model="tiny_cnn")) == 2
    assert "resume needs the same classes" in capsys.readouterr().err
    assert open(checkpoint, "rb").read() == before


def test_amp_float16_trains_with_a_grad_scaler_and_saves_its_state(tiny_data, tmp_path):
    out = str(tmp_path / "amp")
    run_cli(train_cmd(*data_flags(tiny_data, out, model="tiny_cnn", use_amp=True, amp_dtype="float16",
                                  max_grad_norm=1.0)))
    latest = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert latest["scaler_state_dict"]["scale"] > 0  # an enabled GradScaler has a scale
    assert latest["config"]["use_amp"] is True


def test_help_documents_every_flag():
    result = run_cli(train_cmd("--help"))
    for flag in ("--train_dir", "--val_dir", "--epochs", "--batch_size", "--learning_rate", "--num_workers",
                 "--use_amp", "--gradient_accumulation_steps", "--max_grad_norm", "--resume",
                 "--checkpoint_dir", "--log_dir", "--seed", "--image_size", "--amp_dtype",
                 "--find_unused_parameters", "--distributed", "--demo"):
        assert flag in result.stdout


# ------------------------------------------------------------------ runs do not overwrite each other

def only_folder(path):
    [name] = os.listdir(path)
    return os.path.join(path, name)


def test_a_new_run_moves_the_previous_runs_files_aside_and_says_where(tiny_data, tmp_path, capsys):
    out = str(tmp_path)
    run_cli(train_cmd(*data_flags(tiny_data, out, model="tiny_cnn")))
    run_cli([sys.executable, os.path.join(REPO, "export.py"), "--checkpoint", f"{out}/checkpoints/checkpoint_best.pth",
             "--format", "torchscript"])
    first = {name: open(f"{out}/checkpoints/{name}", "rb").read() for name in os.listdir(f"{out}/checkpoints")}
    assert {"checkpoint_best.pth", "checkpoint_best.pt", "checkpoint_best.pt.json"} <= set(first)
    first_history = open(f"{out}/logs/training_history.json").read()

    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn", seed=7)) == 0
    printed = capsys.readouterr().out
    moved_checkpoints, moved_logs = only_folder(f"{out}/checkpoints/previous"), only_folder(f"{out}/logs/previous")
    assert os.path.basename(moved_checkpoints) == os.path.basename(moved_logs)  # one name for the run in both
    assert (f"Note: this is a new run, so the previous run's files moved to {moved_checkpoints}/ and {moved_logs}/ "
            f"(to continue that run instead: --resume {moved_checkpoints}/checkpoint_latest.pth)\n") in printed
    assert {name: open(f"{moved_checkpoints}/{name}", "rb").read() for name in os.listdir(moved_checkpoints)} == first
    assert load_checkpoint(f"{moved_checkpoints}/checkpoint_best.pth")["config"]["seed"] == 42
    assert open(f"{moved_logs}/training_history.json").read() == first_history
    assert sorted(os.listdir(f"{out}/checkpoints")) == ["checkpoint_best.pth", "checkpoint_latest.pth", "previous"]
    assert torch.load(f"{out}/checkpoints/checkpoint_best.pth")["config"]["seed"] == 7  # the new run's, no stale export

    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn", seed=7, epochs=2, auto_resume=True)) == 0
    printed = capsys.readouterr().out
    assert "Resumed from" in printed and "Note:" not in printed  # --auto_resume continues in place
    assert os.listdir(f"{out}/checkpoints/previous") == [os.path.basename(moved_checkpoints)]
    assert torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["history"]["epoch"] == [1, 2]


def test_a_new_run_from_the_previous_runs_weights_reads_them_where_they_moved(tiny_data, tmp_path, capsys):
    out = str(tmp_path)
    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn")) == 0
    best = f"{out}/checkpoints/checkpoint_best.pth"
    weights = load_weights(best)
    capsys.readouterr()
    # resume.py's way out of a refused resume: "start a new run from its weights with --pretrained_weights"
    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn", pretrained_weights=best,
                                     learning_rate=1e-9, lr_scheduler="none")) == 0
    moved = f"{only_folder(f'{out}/checkpoints/previous')}/checkpoint_best.pth"
    assert f"; --pretrained_weights now reads {moved}\n" in capsys.readouterr().out
    assert torch.load(best)["config"]["pretrained_weights"] == moved
    assert_same_weights(load_weights(best), weights, exact=False, atol=1e-6)  # it started from those weights


@pytest.mark.slow
def test_a_fresh_run_that_torchrun_restarts_keeps_its_own_files(tiny_data, tmp_path):
    out = str(tmp_path)
    os.makedirs(f"{out}/checkpoints")
    with open(f"{out}/checkpoints/checkpoint_best.pth", "wb") as f:
        f.write(b"an older run's")  # moved aside by the first attempt, once
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "--max_restarts=1", os.path.join(REPO, "train_ddp.py"),
               *data_flags(tiny_data, out, model="tiny_cnn", epochs=40)]  # no --auto_resume: starts over
    job = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_checkpoint(f"{out}/checkpoints/checkpoint_latest.pth", lambda checkpoint: checkpoint["epoch"] >= 1)
    [worker] = subprocess.check_output(["pgrep", "-P", str(job.pid)]).split()
    os.kill(int(worker), signal.SIGKILL)
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 0, output
    assert output.count("the previous run's files moved to") == 1, output
    [older] = os.listdir(f"{out}/checkpoints/previous")
    assert os.listdir(f"{out}/checkpoints/previous/{older}") == ["checkpoint_best.pth"]
    assert torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["epoch"] == 40


def test_a_fast_dev_run_and_a_failed_start_move_nothing(tiny_data, tmp_path, capsys):
    out = str(tmp_path)
    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn")) == 0
    before = sorted(os.listdir(f"{out}/checkpoints")), sorted(os.listdir(f"{out}/logs"))
    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn", fast_dev_run=True)) == 0
    assert train_ddp.main(data_flags(tiny_data, out, model="tiny_cnn", batch_size=64)) == 2  # more than the images
    assert "files moved to" not in capsys.readouterr().out
    assert (sorted(os.listdir(f"{out}/checkpoints")), sorted(os.listdir(f"{out}/logs"))) == before


# ------------------------------------------------------------------ what a run prints and leaves

def test_the_end_line_names_the_best_accuracy_once(tiny_data, tmp_path, capsys):
    assert train_ddp.main(data_flags(tiny_data, str(tmp_path), model="tiny_cnn", epochs=2)) == 0
    printed = capsys.readouterr().out
    history = json.load(open(f"{tmp_path}/logs/training_history.json"))
    best = max(history["val_acc"])
    epoch = history["val_acc"].index(best) + 1
    ending = (rf"^Done in \d+ s: best val_acc {best:.2f}% at epoch {epoch}; checkpoints in {tmp_path}/checkpoints/, "
              rf"history and config in {tmp_path}/logs/$")
    assert re.search(ending, printed, re.MULTILINE), printed
    assert f"| best val_acc {best:.2f}% |" in printed.splitlines()[-2]  # the epoch lines say it the same way


def test_an_epoch_shorter_than_log_every_steps_shows_its_loss_on_the_progress_bar(tiny_data, tmp_path, capsys):
    # 24 images in batches of 4: 6 steps an epoch, fewer than the default --log_every_steps 10
    assert train_ddp.main(data_flags(tiny_data, str(tmp_path), model="tiny_cnn", epochs=2)) == 0
    bar = capsys.readouterr().err
    for epoch in (1, 2):
        [shown] = re.findall(rf"Epoch {epoch}/2: [^\r]*\| 1/6 \[[^\r]*", bar)  # the bar after the first step
        assert re.search(r"acc=[\d.]+%, grad_norm=[\d.]+, loss=[\d.]+, lr=", shown), shown


def test_an_unreadable_image_in_the_first_epoch_leaves_no_config_json(tiny_data, tmp_path, capsys):
    bad = f"{tiny_data['train_dir']}/circle/notes.jpg"
    with open(bad, "w") as f:
        f.write("a text file named .jpg")
    assert train_ddp.main(data_flags(tiny_data, str(tmp_path), model="tiny_cnn", num_sanity_val_steps=0)) == 2
    assert f"error: cannot read image {bad}" in capsys.readouterr().err
    assert not os.path.exists(f"{tmp_path}/logs") and not os.path.exists(f"{tmp_path}/checkpoints")
