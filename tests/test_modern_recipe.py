"""The modern recipe end to end, on real processes: with mixing, TrivialAugment, erasing, repeated
augmentation, FixRes, EMA with warm-up and no weight decay on norms all on, a SIGKILLed 2-process run
resumes to bit-identical weights (file path and cache path), and a 2-process run resumed on 1 process
trains the same samples with the same pairs and lambda at every step (the sample trace)."""
import os
import signal

import pytest
import torch
from conftest import data_flags, run_cli, torchrun, train_cmd, wait_for_checkpoint, write_image_folder
from test_fault_tolerance import assert_same_run, start

from inputs.sampling import read_trace

pytestmark = pytest.mark.slow

RECIPE = dict(model="tiny_cnn", epochs=2, batch_size=2, train_crop_size=16, image_size=20, resize_size=22,
              auto_augment="ta_wide", random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=0.5,
              label_smoothing=0.1, ra_reps=2, use_ema=True, ema_steps=2, ema_warmup=True, ema_decay=0.9,
              norm_weight_decay=0.0, optimizer="sgd", learning_rate=0.05, nesterov=True, lr_warmup_epochs=1,
              lr_min=0.001, color_jitter=0.3, save_every_steps=1, log_every_steps=1, trace_samples=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return dict(train_dir=write_image_folder(str(root / "train"), per_class=8, size=(26, 22)),
                val_dir=write_image_folder(str(root / "val"), per_class=2, seed=1))


def mid_epoch(checkpoint):
    return checkpoint["epoch"] == 0 and checkpoint["step"] >= 2


@pytest.mark.parametrize("path", ["files", "cache"])
def test_the_full_recipe_resumes_bit_exactly_after_sigkill_on_two_processes(data, tmp_path, path):
    extra = dict(num_workers=1) if path == "files" else dict(cache_images=str(tmp_path / "cache"))
    reference = data_flags(data, str(tmp_path / "reference"), **RECIPE, **extra)
    run_cli(torchrun(2, *reference))
    flags = data_flags(data, str(tmp_path / "killed"), **RECIPE, **extra)
    job = start(torchrun(2, *flags))
    latest = f"{tmp_path}/killed/checkpoints/checkpoint_latest.pth"
    wait_for_checkpoint(latest, mid_epoch)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    run_cli(torchrun(2, *flags, "--auto_resume"))
    assert_same_run(latest, f"{tmp_path}/reference/checkpoints/checkpoint_latest.pth")
    pairs = read_trace(f"{tmp_path}/reference/logs", "pairs")
    modes = {mode for step in pairs.values() for *_, mode in step}
    assert modes == {"mixup", "cutmix"} and len(pairs) == 12  # 24 images a epoch, 4 per step, 2 epochs


def test_a_two_process_mixing_run_resumed_on_one_process_mixes_the_same_pairs_with_the_same_lambda(data, tmp_path):
    reference = data_flags(data, str(tmp_path / "reference"), **RECIPE)
    run_cli(torchrun(2, *reference))
    flags = data_flags(data, str(tmp_path / "resized"), **RECIPE)
    job = start(torchrun(2, *flags))
    latest = f"{tmp_path}/resized/checkpoints/checkpoint_latest.pth"
    killed_at = wait_for_checkpoint(latest, mid_epoch)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    resumed = run_cli(train_cmd(*data_flags(data, str(tmp_path / "resized"), **{**RECIPE, "batch_size": 4}),
                                "--auto_resume"))
    assert "Resumed from" in resumed.stdout
    for field in ("indices", "pairs"):
        expected, got = read_trace(f"{tmp_path}/reference/logs", field), read_trace(f"{tmp_path}/resized/logs", field)
        assert got == expected, field
    assert killed_at["step"] >= 2 and len(read_trace(f"{tmp_path}/resized/logs", "pairs")) == 12


def test_settle_checks_every_size_of_the_progressive_ramp_before_training(data, monkeypatch):
    # A model may take the smallest and the full size but not one in between (a ViT with 14 px patches
    # and the ramp's 16 px steps): every epoch's size is checked before anything is built.
    from config import parse_args
    from engine import training
    from engine.distributed import DistContext

    checked = []
    monkeypatch.setattr(training, "check_image_size", lambda model, size: checked.append(size))
    args = parse_args(data_flags(data, "/tmp/unused", model="tiny_cnn", train_crop_size=112, image_size=112,
                                 progressive_min_size=56, progressive_start_epoch=1, progressive_end_epoch=4,
                                 epochs=5))
    training.settle(args, DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert sorted(set(checked)) == [56, 64, 80, 112] == sorted(set(training.progressive_sizes(args)))
