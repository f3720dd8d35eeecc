"""Each training flag's effect, proven on real runs of train_ddp.py (one process, or torchrun where
several processes matter) on the tiny dataset, read back from the files the runs write: checkpoints,
logs/training_history.json, logs/config.json, TensorBoard event files and the offline wandb run.

The tiny train set is 24 images: batch 4 gives 6 optimizer steps per epoch; the val set has 8 images.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLASSES,
    assert_same_weights,
    data_flags,
    load_weights,
    make_tiny_data,
    read_wandb_records,
    run_cli,
    torchrun,
    train_cmd,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_recipe import closed_form_lr

import train_ddp
from config import Settled, build_parser
from dataset import AugmentedImageFolder, normalize
from engine.distributed import DistContext
from engine.training import build_training, cpu_has_native_bfloat16, resolve_amp, settle
from model import build_model

STEPS_PER_EPOCH = 6  # 24 training images, batch 4
# On a 2-core machine torch's default intra-op threads fight over the cores (a tiny_cnn step then
# takes ~100 ms instead of ~1 ms); torchrun sets this for its workers anyway.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def train(data, out, nproc=1, env=None, check=True, timeout=240, **flags):
    """Run train_ddp.py for real on `data`, writing under `out` (tiny_cnn unless model= is given)."""
    flags.setdefault("model", "tiny_cnn")
    argv = data_flags(data, out, **flags)
    command = train_cmd(*argv) if nproc == 1 else torchrun(nproc, *argv)
    return run_cli(command, env={**ONE_THREAD, **(env or {})}, check=check, timeout=timeout)


def history_of(out):
    with open(f"{out}/logs/training_history.json") as f:
        return json.load(f)


def latest(out):
    return torch.load(f"{out}/checkpoints/checkpoint_latest.pth")  # weights_only=True: plain data only


def optimizer_steps(checkpoint):
    """The optimizer's step count, the same for every parameter."""
    steps = {int(state["step"]) for state in checkpoint["optimizer_state_dict"]["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()


def tensorboard_scalars(out):
    events = EventAccumulator(f"{out}/logs/tensorboard", size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def f32(value):
    """Event files hold float32: the float32 rounding of a value."""
    return float(torch.tensor(value, dtype=torch.float32))


def initial_weights(model_name="tiny_cnn", seed=42):
    """The weights a run starts from: train_ddp.py seeds torch with --seed, then builds the model."""
    torch.manual_seed(seed)
    return build_model(model_name, len(CLASSES)).state_dict()


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """The tiny dataset of conftest's tiny_data, shared (read-only) by this module's runs."""
    return make_tiny_data(str(tmp_path_factory.mktemp("shared")))


@pytest.fixture(scope="module")
def baseline(shared_data, tmp_path_factory):
    """A plain 2-epoch tiny_cnn run: what the flags that must not change training are compared to."""
    out = str(tmp_path_factory.mktemp("baseline"))
    train(shared_data, out, epochs=2)
    return out


# ------------------------------------------------------------------ 1. learning-rate schedules

@pytest.mark.parametrize("flags", [
    dict(lr_scheduler="cosine", warmup_steps=4, epochs=2),
    dict(lr_scheduler="step", lr_step_epochs=1, lr_gamma=0.5, epochs=3),
    dict(lr_scheduler="none", warmup_steps=3, epochs=1),
], ids=["cosine-warmup", "step", "none-warmup"])
def test_logged_learning_rate_of_each_step_is_the_closed_form_schedule(shared_data, tmp_path, flags):
    lr = 0.01
    train(shared_data, str(tmp_path), learning_rate=lr, use_tensorboard=True, log_every_steps=1, **flags)
    total = STEPS_PER_EPOCH * flags["epochs"]
    expected = [closed_form_lr(i, lr, total, flags.get("warmup_steps", 0), flags["lr_scheduler"],
                               steps_per_epoch=STEPS_PER_EPOCH, step_epochs=flags.get("lr_step_epochs", 30),
                               gamma=flags.get("lr_gamma", 0.1))
                for i in range(total)]
    logged = tensorboard_scalars(str(tmp_path))["train/learning_rate"]
    assert [step for step, _ in logged] == list(range(1, total + 1))  # one point per optimizer step
    # Global step g (1-based) is logged with the loss and gradient norm of that step, so its learning
    # rate is the one that step used: the warm-up starts at lr / (warmup + 1).
    assert [value for _, value in logged] == pytest.approx([f32(v) for v in expected], rel=1e-9, abs=1e-12), \
        f"logged {[v for _, v in logged]}\nexpected (lr used by each step) {expected}"


# ------------------------------------------------------------------ 2. optimizer, weight decay, label smoothing

def test_sgd_gets_its_momentum_and_weight_decay_is_applied(shared_data, tmp_path):
    # One optimizer step (one batch) from the same seeded weights w0, without and with weight decay.
    # Both runs see the same first gradient g, and SGD's first momentum buffer is g + wd * w0, so the
    # weights differ by exactly -lr * wd * w0.
    lr, wd = 0.05, 0.4
    common = dict(optimizer="sgd", momentum=0.8, learning_rate=lr, lr_scheduler="none", limit_train_batches=1)
    train(shared_data, f"{tmp_path}/no_decay", weight_decay=0, **common)
    train(shared_data, f"{tmp_path}/decay", weight_decay=wd, **common)

    checkpoint = latest(f"{tmp_path}/decay")
    [group] = checkpoint["optimizer_state_dict"]["param_groups"]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["fused"]) == (lr, 0.8, wd, True)
    assert group["nesterov"] is False and group["dampening"] == 0 and "betas" not in group
    assert all(set(state) == {"momentum_buffer"} for state in checkpoint["optimizer_state_dict"]["state"].values())

    w0 = initial_weights()
    no_decay = load_weights(f"{tmp_path}/no_decay/checkpoints/checkpoint_latest.pth")
    assert not torch.equal(no_decay["fc.weight"], w0["fc.weight"])  # the step moved the weights
    for key, decayed in checkpoint["model_state_dict"].items():
        torch.testing.assert_close(decayed - no_decay[key], -lr * wd * w0[key], rtol=0, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


def test_label_smoothing_changes_the_training_loss_never_the_validation_loss(shared_data, tmp_path):
    # A learning rate of 1e-9 leaves the weights (and so the losses) as they were, to ~1e-9.
    # These runs use the default optimizer, AdamW: its betas and --weight_decay are checked too.
    common = dict(learning_rate=1e-9, lr_scheduler="none", epochs=1, weight_decay=0.05)
    train(shared_data, f"{tmp_path}/plain", **common)
    train(shared_data, f"{tmp_path}/smoothed", label_smoothing=0.5, **common)
    plain, smoothed = history_of(f"{tmp_path}/plain"), history_of(f"{tmp_path}/smoothed")
    assert abs(smoothed["train_loss"][0] - plain["train_loss"][0]) > 1e-5  # >100x what 1e-9 of lr can move
    assert smoothed["val_loss"][0] == pytest.approx(plain["val_loss"][0], rel=0, abs=1e-6)
    assert smoothed["val_acc"] == plain["val_acc"]

    checkpoint = latest(f"{tmp_path}/smoothed")
    assert checkpoint["config"]["label_smoothing"] == 0.5
    [group] = checkpoint["optimizer_state_dict"]["param_groups"]
    assert (group["betas"], group["weight_decay"], group["decoupled_weight_decay"], group["fused"]) == \
        ((0.9, 0.999), 0.05, True, True)
    assert "momentum" not in group
    assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"}
               for state in checkpoint["optimizer_state_dict"]["state"].values())


# ------------------------------------------------------------------ 3. learning-rate scaling

@pytest.mark.parametrize("mode, factor", [("linear", 2.0), ("sqrt", math.sqrt(2))])
def test_scale_lr_scales_the_learning_rate_by_the_number_of_processes(shared_data, tmp_path, mode, factor):
    lr = 0.001
    result = train(shared_data, str(tmp_path), nproc=2, learning_rate=lr, scale_lr=mode, lr_scheduler="none",
                   limit_train_batches=1)
    [group] = latest(str(tmp_path))["optimizer_state_dict"]["param_groups"]
    assert group["initial_lr"] == lr * factor
    assert group["lr"] == lr * factor  # constant schedule: the scaled rate is the one used
    assert (f"effective batch 8 (4 x 2 processes x 1 accumulation), learning rate {lr * factor:g} "
            f"({mode}-scaled from {lr:g})") in result.stdout


# ------------------------------------------------------------------ 4. EMA

def test_ema_is_saved_loadable_averaged_per_step_and_validated(shared_data, baseline, tmp_path):
    out = str(tmp_path)
    result = train(shared_data, out, epochs=2, use_ema=True, ema_decay=1e-6)
    checkpoint = latest(out)
    # The EMA does not touch training: model_state_dict holds the raw weights, the same as without EMA.
    assert_same_weights(checkpoint["model_state_dict"], load_weights(f"{baseline}/checkpoints/checkpoint_latest.pth"))
    ema = checkpoint["ema_state_dict"]
    assert list(ema) == list(checkpoint["model_state_dict"])  # the plain model's keys
    build_model("tiny_cnn", len(CLASSES)).load_state_dict(ema, strict=True)
    assert checkpoint["ema_num_averaged"] == optimizer_steps(checkpoint) == 2 * STEPS_PER_EPOCH
    # With decay 1e-6 each update keeps 1e-6 of the average: it is the final weights to ~1e-6.
    for key, value in checkpoint["model_state_dict"].items():
        torch.testing.assert_close(ema[key], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
    assert result.stdout.count("(EMA ") == 2  # the EMA is validated every epoch
    history = history_of(out)
    assert len(history.get("ema_val_acc", [])) == 2 and len(history.get("ema_val_loss", [])) == 2, \
        f"history has no EMA metrics: keys {sorted(history)}"
    assert history["ema_val_loss"] == pytest.approx(history["val_loss"], abs=1e-5)
    assert history["ema_val_acc"] == history["val_acc"]


# ------------------------------------------------------------------ 5. channels_last, compile, sync_bn

def test_channels_last_trains_the_same_weights_and_saves_loadable_tensors(shared_data, baseline, tmp_path):
    out = str(tmp_path)
    train(shared_data, out, epochs=2, channels_last=True)
    weights = load_weights(f"{out}/checkpoints/checkpoint_latest.pth")
    assert_same_weights(weights, load_weights(f"{baseline}/checkpoints/checkpoint_latest.pth"), exact=False, atol=1e-5)
    model = build_model("tiny_cnn", len(CLASSES))
    model.load_state_dict(weights, strict=True)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, len(CLASSES))  # a plain contiguous input works


def test_compile_trains_the_same_weights_and_saves_an_uncompiled_state_dict(shared_data, baseline, tmp_path):
    # torch.compile on CPU (inductor, C++ code generation): ~30 s for this run with a cold compile
    # cache on 2 cores, ~10 s with a warm one.
    out = str(tmp_path)
    train(shared_data, out, epochs=2, compile=True, timeout=280)
    weights = load_weights(f"{out}/checkpoints/checkpoint_latest.pth")
    assert not any("_orig_mod." in key or key.startswith("module.") for key in weights)
    build_model("tiny_cnn", len(CLASSES)).load_state_dict(weights, strict=True)
    assert_same_weights(weights, load_weights(f"{baseline}/checkpoints/checkpoint_latest.pth"), exact=False, atol=1e-4)
    assert latest(out)["config"]["compile"] is True


def test_sync_bn_on_cpu_prints_its_note_and_trains_plain_batch_norm(shared_data, tmp_path):
    out = str(tmp_path)
    result = train(shared_data, out, model="resnet18", sync_bn=True, limit_train_batches=2)
    note = [line for line in result.stdout.splitlines() if "--sync_bn" in line]
    assert note == ["Note: --sync_bn needs several CUDA processes (PyTorch's SyncBatchNorm runs only on GPUs); "
                    "each process keeps its own BatchNorm statistics here."]
    weights = load_weights(f"{out}/checkpoints/checkpoint_latest.pth")
    build_model("resnet18", len(CLASSES)).load_state_dict(weights, strict=True)
    assert int(weights["bn1.num_batches_tracked"]) == 2  # batch norm ran in training mode on both batches
    assert math.isfinite(history_of(out)["train_loss"][0])


# ------------------------------------------------------------------ 5a. the settled configuration

def test_settle_resolves_the_derived_values_once_and_the_result_refuses_writes(shared_data, tmp_path, capsys):
    cpu = DistContext(0, 0, 1, torch.device("cpu"))
    parsed = train_ddp.parse_args(data_flags(shared_data, str(tmp_path), model="tiny_cnn", use_amp=True))
    args, plan = settle(parsed, cpu)
    assert isinstance(args, Settled) and plan is None
    assert args.gradient_accumulation_steps == 1 and parsed.gradient_accumulation_steps is None  # parsed stay
    assert (args.use_amp, args.amp_dtype) == ((True, "bfloat16") if cpu_amp_choice() == torch.bfloat16
                                              else (False, "auto"))
    for write in (lambda: setattr(args, "epochs", 2), lambda: delattr(args, "epochs")):
        with pytest.raises(AttributeError, match="--epochs cannot change after engine.training.settle"):
            write()
    assert args.epochs == 1 and set(vars(args)) == set(vars(parsed))
    assert json.loads(json.dumps(vars(args))) == vars(args)  # what logs/config.json and checkpoints hold
    moved = args.replaced(pretrained_weights="weights.pth")
    assert isinstance(moved, Settled) and (moved.pretrained_weights, args.pretrained_weights) == ("weights.pth", None)


def test_a_real_run_trains_on_the_settled_configuration_and_records_it(shared_data, tmp_path, monkeypatch):
    built = []

    def build_training_recording(args, *rest, **options):
        built.append(args)
        return build_training(args, *rest, **options)

    monkeypatch.setattr(train_ddp, "build_training", build_training_recording)
    out = str(tmp_path)
    assert train_ddp.main(data_flags(out=out, data=shared_data, model="tiny_cnn", limit_train_batches=2)) == 0
    [args] = built
    assert isinstance(args, Settled) and args.gradient_accumulation_steps == 1
    with open(f"{out}/logs/config.json") as f:
        assert json.load(f) == vars(args) == latest(out)["config"]


# ------------------------------------------------------------------ 5b. AMP on a CPU

def cpu_amp_choice():
    """What --use_amp must run on this CPU: bfloat16 with native bfloat16 instructions, else float32."""
    return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32


def test_use_amp_on_a_cpu_never_runs_float16_and_says_what_it_runs(shared_data, tmp_path):
    out = str(tmp_path)
    result = train(shared_data, out, use_amp=True)
    said = [line for line in result.stdout.splitlines() if line.startswith(("AMP", "Warning"))]
    saved = latest(out)
    assert "scale" not in saved["scaler_state_dict"]  # no float16 GradScaler ran
    if cpu_amp_choice() == torch.bfloat16:
        assert said == ["AMP: bfloat16 autocast (this CPU has native bfloat16 instructions; float16 autocast is "
                        "many times slower than float32 on a CPU)"]
        assert (saved["config"]["use_amp"], saved["config"]["amp_dtype"]) == (True, "bfloat16")
    else:
        assert len(said) == 1 and said[0].startswith("AMP: full precision (float32) on this CPU")
        assert saved["config"]["use_amp"] is False


def test_the_amp_choice_is_the_training_s_own_and_gpus_keep_float16(shared_data, tmp_path, capsys):
    cpu = DistContext(0, 0, 1, torch.device("cpu"))
    args, _ = settle(train_ddp.parse_args(data_flags(shared_data, str(tmp_path), model="tiny_cnn", use_amp=True,
                                                     gradient_accumulation_steps=1)), cpu)
    training = build_training(args, cpu, len(CLASSES), STEPS_PER_EPOCH)
    assert training.amp_dtype == cpu_amp_choice() and not training.scaler.is_enabled()
    assert len(capsys.readouterr().out.splitlines()) == 1  # the one line that says so
    gpu_args = train_ddp.parse_args(data_flags(shared_data, str(tmp_path), use_amp=True))
    assert resolve_amp(gpu_args, DistContext(0, 0, 1, torch.device("cuda", 0))) == torch.float16
    assert gpu_args.amp_dtype == "float16" and capsys.readouterr().out == ""
    no_amp = train_ddp.parse_args(data_flags(shared_data, str(tmp_path)))
    assert resolve_amp(no_amp, cpu) == torch.float32 and no_amp.amp_dtype == "auto"


def test_float16_asked_on_a_cpu_is_honoured_with_one_line_on_its_cost(shared_data, tmp_path):
    out = str(tmp_path)
    result = train(shared_data, out, use_amp=True, amp_dtype="float16", limit_train_batches=2)
    said = [line for line in result.stdout.splitlines() if line.startswith(("AMP", "Warning"))]
    assert said == ["Warning: float16 autocast on a CPU runs 10-20x slower than float32 (ResNet-18); --amp_dtype "
                    "bfloat16 on a CPU with native bfloat16, or no --use_amp, avoids that"]
    saved = latest(out)
    assert saved["scaler_state_dict"]["scale"] > 0 and saved["config"]["amp_dtype"] == "float16"


# ------------------------------------------------------------------ 6. debugging flags

def test_fast_dev_run_runs_one_batch_each_way_and_writes_nothing(shared_data, tmp_path):
    out = str(tmp_path / "run")
    result = train(shared_data, out, fast_dev_run=True, epochs=5, use_tensorboard=True)
    assert not os.path.exists(out)  # neither checkpoint_dir nor log_dir (nor tensorboard) was created
    assert "fast_dev_run passed in" in result.stdout
    assert "one train and one val batch ran; no files written." in result.stdout
    assert "Epoch 1/1 |" in result.stdout and "Epoch 2/" not in result.stdout  # --epochs 5 is overridden
    assert "Sanity check" not in result.stdout and "tensorboard" not in result.stdout
    assert "0/1 [" in result.stderr  # the progress bar counts one training batch


@pytest.fixture
def noise_data(tmp_path):
    """Pure noise images: nothing to learn, so only memorising them gives 100%."""
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 8), ("val", 3)):
        for name in CLASSES:
            os.makedirs(tmp_path / "noise" / split / name)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(20, 24, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "noise" / split / name / f"{i:03d}.png")
    return dict(train_dir=str(tmp_path / "noise" / "train"), val_dir=str(tmp_path / "noise" / "val"))


def test_overfit_batches_memorises_one_fixed_batch_and_validates_on_it(noise_data, tmp_path):
    out = str(tmp_path / "run")
    result = train(noise_data, out, overfit_batches=1, batch_size=8, epochs=30, learning_rate=0.01,
                   lr_scheduler="none")
    assert "on 8 images (3 classes), validating on 8;" in result.stdout
    history = history_of(out)
    assert history["train_acc"][-1] == 100.0 and history["val_acc"][-1] == 100.0  # noise: memorised
    assert min(history["train_acc"][:3]) < 100.0  # ... by training, not from the start
    # One unaugmented batch, the same images in validation: epoch e+1's training loss (computed
    # before its update) is epoch e's validation loss (the same weights on the same images).
    assert history["train_loss"][1:] == pytest.approx(history["val_loss"][:-1], rel=1e-5, abs=1e-6)


def test_limit_train_and_val_batches(shared_data, tmp_path):
    out = str(tmp_path)
    result = train(shared_data, out, epochs=2, batch_size=3, limit_train_batches=2, limit_val_batches=1)
    checkpoint = latest(out)
    assert optimizer_steps(checkpoint) == 2 * 2  # 2 per epoch instead of 24 / 3 = 8
    assert checkpoint["scheduler_state_dict"]["last_epoch"] == 4  # the schedule spans the limited run
    history = history_of(out)
    for acc in history["val_acc"]:  # 3 images: 0, 33.3, 66.7 or 100
        assert acc * 3 / 100 == pytest.approx(round(acc * 3 / 100))
    for acc in history["train_acc"]:  # 6 images an epoch
        assert acc * 6 / 100 == pytest.approx(round(acc * 6 / 100))
    # The one validation batch is the first 3 val images, unaugmented: recompute its loss here.
    model = build_model("tiny_cnn", len(CLASSES))
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    val_set = AugmentedImageFolder(shared_data["val_dir"], 16, train=False)
    images, labels, _ = zip(*(val_set[i] for i in range(3)))
    with torch.no_grad():
        logits = model(normalize(torch.stack(images)))
    labels = torch.tensor(labels)
    assert history["val_loss"][-1] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert history["val_acc"][-1] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert "validating on 8" in result.stdout  # the set is whole; only the batches are limited


def test_sanity_validation_fails_a_broken_val_set_before_any_training_step(tiny_data, tmp_path):
    bad = os.path.join(tiny_data["val_dir"], "square", "000.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a png")
    # --save_every_steps 1 writes checkpoint_latest.pth after every optimizer step but an epoch's last:
    # whether it exists tells whether any training step ran.
    common = dict(epochs=1, save_every_steps=1)

    default = train(tiny_data, f"{tmp_path}/default", check=False, **common)
    assert default.returncode == 2
    assert default.stderr.strip().splitlines() == [f"error: cannot read image {bad} "
                                                   f"(cannot identify image file '{bad}'); fix or remove it, or "
                                                   "pass --skip_bad_images to skip unreadable files"]
    assert not os.path.exists(f"{tmp_path}/default/checkpoints")
    output = default.stdout + default.stderr
    assert "Sanity check" not in output and "Epoch 1/" not in output  # training never began

    off = train(tiny_data, f"{tmp_path}/off", check=False, num_sanity_val_steps=0, **common)
    assert off.returncode == 2
    assert f"error: cannot read image {bad}" in off.stderr.splitlines()[-1]
    assert "Epoch 1/1" in off.stderr  # the training progress bar ran first
    partial = latest(f"{tmp_path}/off")
    assert partial["step"] == STEPS_PER_EPOCH - 1 and optimizer_steps(partial) == STEPS_PER_EPOCH - 1
    assert "Epoch 1/1 |" not in off.stdout  # validation failed, so the epoch never completed


# ------------------------------------------------------------------ 7. early stopping

def test_early_stopping_stops_both_ranks_when_the_monitor_stops_improving(shared_data, tmp_path):
    # A learning rate of 1e-9 cannot lower the val loss by min_delta 0.1: epoch 1 sets the best,
    # epoch 2 is the first epoch without improvement, and patience 1 stops there.
    # --monitor_metric comes from a config file here; the next test passes it on the command line.
    config = write_config(tmp_path / "monitor.yaml", dict(monitor_metric="val_loss"))
    out = str(tmp_path / "run")
    result = train(shared_data, out, nproc=2, epochs=10, learning_rate=1e-9, lr_scheduler="none", config=config,
                   early_stopping_patience=1, early_stopping_min_delta=0.1, limit_train_batches=1, timeout=180)
    # Exit 0 from torchrun: both ranks left the loop at the same epoch (a rank still training
    # would fail in a collective its partner no longer joins).
    assert result.returncode == 0
    assert history_of(out)["epoch"] == [1, 2]
    assert latest(out)["epoch"] == 2 and latest(out)["stale_epochs"] == 1
    assert latest(out)["config"]["monitor_metric"] == "val_loss"
    assert "Early stopping: val_loss has not improved by more than 0.1 for 1 epochs." in result.stdout
    assert "Epoch 2/10 |" in result.stdout and "Epoch 3/10" not in result.stdout + result.stderr


def test_monitor_flag_can_be_given_on_a_torchrun_command_line(shared_data, tmp_path):
    # torchrun abbreviates its own options anywhere on the line: a flag named `--monitor` was taken
    # for its `--monitor-interval`. `--monitor_metric` is not a prefix of any torchrun option.
    result = train(shared_data, str(tmp_path), nproc=2, monitor_metric="val_loss", fast_dev_run=True, check=False,
                   timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fast_dev_run passed in" in result.stdout


# ------------------------------------------------------------------ 8. top-k checkpoints

@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_save_top_k_keeps_exactly_the_k_best_epochs(shared_data, tmp_path, monitor):
    out = str(tmp_path)
    train(shared_data, out, epochs=4, save_top_k=2, monitor_metric=monitor, learning_rate=0.003)
    history = history_of(out)
    values = history[monitor]
    # Best first; a tie goes to the earlier epoch.
    ranked = sorted(history["epoch"], key=lambda e: ((-1 if monitor == "val_acc" else 1) * values[e - 1], e))
    expected_top = sorted(ranked[:2])
    files = sorted(os.listdir(f"{out}/checkpoints"))
    assert files == sorted(["checkpoint_best.pth", "checkpoint_latest.pth",
                            *[f"checkpoint_epoch{e:03d}.pth" for e in expected_top]])
    for epoch in expected_top:
        saved = torch.load(f"{out}/checkpoints/checkpoint_epoch{epoch:03d}.pth")
        assert saved["epoch"] == epoch
        build_model("tiny_cnn", len(CLASSES)).load_state_dict(saved["model_state_dict"], strict=True)
    best = torch.load(f"{out}/checkpoints/checkpoint_best.pth")
    assert best["epoch"] == ranked[0] and best["best_metric"] == values[ranked[0] - 1]
    assert latest(out)["epoch"] == 4


# ------------------------------------------------------------------ 9. config files

def write_config(path, values):
    with open(path, "w") as f:
        if str(path).endswith(".json"):
            json.dump(values, f)
        else:
            import yaml
            yaml.safe_dump(values, f)
    return str(path)


FROM_FILE = dict(model="tiny_cnn", optimizer="sgd", momentum=0.5, learning_rate=0.005, lr_scheduler="none",
                 weight_decay=0.3, epochs=5, use_ema=True, ema_decay=0.9)


def test_yaml_config_values_are_used_command_line_flags_win_and_config_json_holds_all(shared_data, tmp_path):
    config = write_config(tmp_path / "run.yaml", FROM_FILE)
    out = str(tmp_path / "run")
    # --epochs 1 (data_flags) and --weight_decay 0.2 override the file; --model is not given.
    result = train(shared_data, out, model=None, config=config, weight_decay=0.2)
    assert "Training tiny_cnn on 24 images" in result.stdout

    checkpoint = latest(out)
    [group] = checkpoint["optimizer_state_dict"]["param_groups"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.005, 0.5, 0.2)  # an SGD group
    assert "ema_state_dict" in checkpoint and history_of(out)["epoch"] == [1]

    with open(f"{out}/logs/config.json") as f:
        resolved = json.load(f)
    assert set(resolved) == {action.dest for action in build_parser()._actions} - {"help"}  # every flag
    kept = ("model", "optimizer", "momentum", "learning_rate", "lr_scheduler", "use_ema", "ema_decay")
    assert {key: resolved[key] for key in kept} == {key: FROM_FILE[key] for key in kept}
    assert (resolved["epochs"], resolved["weight_decay"], resolved["batch_size"]) == (1, 0.2, 4)
    assert resolved["config"] == config and resolved["seed"] == 42  # untouched flags keep their defaults
    assert resolved == checkpoint["config"]


def test_json_config_is_read_like_yaml(shared_data, tmp_path):
    config = write_config(tmp_path / "run.json", {**FROM_FILE, "learning_rate": "2e-3"})  # strings convert
    args = train_ddp.parse_args(data_flags(shared_data, str(tmp_path / "run"), config=config, weight_decay=0.2))
    assert {key: getattr(args, key) for key in FROM_FILE} == {**FROM_FILE, "learning_rate": 2e-3, "epochs": 1,
                                                              "weight_decay": 0.2}
    assert args.config == config and args.seed == 42


@pytest.mark.parametrize("suffix, text, key", [
    ("yaml", "batchsize: 8\n", "batchsize"),               # unknown key (a typo)
    ("json", '{"learning_rte": 0.1}', "learning_rte"),
    ("yaml", "batch_size: four\n", "batch_size"),         # not an int
    ("yaml", "batch_size: 4.5\n", "batch_size"),          # a float is not an int (the command line refuses 4.5)
    ("json", '{"use_amp": "yes"}', "use_amp"),             # a switch takes true or false
    ("yaml", "lr_scheduler: linear\n", "lr_scheduler"),   # not one of the choices
], ids=["unknown-yaml", "unknown-json", "str-for-int", "float-for-int", "str-for-bool", "bad-choice"])
def test_config_file_errors_exit_2_with_one_line_naming_the_key(shared_data, tmp_path, capsys, suffix, text, key):
    path = tmp_path / f"bad.{suffix}"
    path.write_text(text)
    # tiny_cnn and --fast_dev_run: a file wrongly accepted costs one batch, not a whole run.
    code = train_ddp.main(data_flags(shared_data, str(tmp_path / "run"), config=str(path), model="tiny_cnn",
                                     fast_dev_run=True))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert f"'{key}'" in err and str(path) in err
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ 10, 11. loggers and the summary line

def test_wandb_and_tensorboard_get_the_step_and_epoch_metrics_of_the_history(shared_data, tmp_path, wandb_env):
    out = str(tmp_path / "run")
    result = train(shared_data, out, epochs=2, use_wandb=True, use_tensorboard=True, log_every_steps=1,
                   monitor_metric="val_loss", wandb_project="flags-test", wandb_name="tiny")
    history = history_of(out)
    total = 2 * STEPS_PER_EPOCH
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # epoch metrics share the epoch's last step
    per_epoch = {"train/epoch_loss": "train_loss", "train/epoch_acc": "train_acc", "val/loss": "val_loss",
                 "val/acc": "val_acc", "train/samples_per_second": "samples_per_second", "epoch": "epoch"}

    [run_file] = (tmp_path / "run" / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    rows = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(rows) == list(range(1, total + 1))
    for step in range(1, total + 1):
        for name in ("train/loss", "train/learning_rate", "train/grad_norm"):
            assert math.isfinite(rows[step][name]), (step, name)
    for epoch, step in enumerate(epoch_ends):
        for name, key in per_epoch.items():
            assert rows[step][name] == history[key][epoch], (step, name)  # wandb keeps float64: exact
    assert [step for step in rows if "val/acc" in rows[step]] == epoch_ends
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["display_name"]) == ("flags-test", "tiny")
    with open(f"{out}/logs/config.json") as f:
        resolved = json.load(f)
    assert {key: run["config"]["update"][key] for key in resolved} == resolved
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]

    scalars = tensorboard_scalars(out)
    for name in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert [step for step, _ in scalars[name]] == list(range(1, total + 1)), name
        assert [f32(rows[step][name]) for step, _ in scalars[name]] == [v for _, v in scalars[name]], name
    for name, key in per_epoch.items():
        assert scalars[name] == [(step, f32(history[key][e])) for e, step in enumerate(epoch_ends)], name

    # 11. The summary line: the best monitored value and its epoch, the total time, where the files are.
    best_epoch = min(history["epoch"], key=lambda e: (history["val_loss"][e - 1], e))
    match = re.search(r"^Done in (\d+) s: best val_loss (\S+) at epoch (\d+) \(best val acc ([\d.]+)%\); "
                      r"checkpoints in (\S+)/, history and config in (\S+)/$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    seconds, best, epoch, best_acc, checkpoint_dir, log_dir = match.groups()
    assert best == f"{history['val_loss'][best_epoch - 1]:.4g}" and int(epoch) == best_epoch
    assert float(best_acc) == pytest.approx(max(history["val_acc"]), abs=0.005)
    assert int(seconds) + 0.5 >= sum(history["epoch_seconds"])  # the whole run, not one epoch
    assert (checkpoint_dir, log_dir) == (f"{out}/checkpoints", f"{out}/logs")
    assert os.path.isfile(f"{checkpoint_dir}/checkpoint_best.pth") and os.path.isfile(f"{log_dir}/config.json")
