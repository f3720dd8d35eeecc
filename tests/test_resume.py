"""resume.py and sampling.py: the resume contract. Every change between runs either continues
exactly, is applied with a note, or is refused in one line; proven on real runs, with the sample
trace (--trace_samples) of a resumed run compared with the uninterrupted one."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from conftest import (
    REPO,
    assert_same_weights,
    data_flags,
    run_cli,
    torchrun,
    train_cmd,
    wait_for_checkpoint,
    write_image_folder,
)

import train_ddp
from config import build_parser, parse_args
from core.errors import ConfigError
from engine import resume
from inputs.sampling import read_trace

TINY = dict(model="tiny_cnn", batch_size=2, trace_samples=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 training images per class (120 in all) and a few validation ones."""
    root = tmp_path_factory.mktemp("photos")
    return dict(train_dir=write_image_folder(str(root / "train"), per_class=40),
                val_dir=write_image_folder(str(root / "val"), per_class=2, seed=1))


@pytest.fixture(scope="module")
def finished_run(tiny_data_module):
    """A one-epoch tiny_cnn run to resume with changed flags (AdamW, cosine, val_acc)."""
    out = tiny_data_module["root"] + "/finished"
    run_cli(train_cmd(*data_flags(tiny_data_module, out, model="tiny_cnn", epochs=1)))
    return out


@pytest.fixture(scope="module")
def tiny_data_module(tmp_path_factory):
    from conftest import make_tiny_data
    return make_tiny_data(str(tmp_path_factory.mktemp("tiny")))


def resume_in_process(data, out, capsys, **flags):
    """train_ddp.main on a copy of the finished run's checkpoints; (exit code, stdout, stderr)."""
    code = train_ddp.main(data_flags(data, out, model="tiny_cnn", auto_resume=True, **flags))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_run(source, target):
    subprocess.run(["cp", "-r", source, target], check=True)
    return target


# ------------------------------------------------------------------ the contract's table

def test_every_flag_has_exactly_one_place_in_the_resume_contract():
    """A flag added to config.py without a decision here fails: it would change silently on resume."""
    flags = {action.dest for action in build_parser()._actions} - {"help"}
    classes = dict(FREE=set(resume.FREE), APPLIED=set(resume.APPLIED), RESETTABLE=set(resume.RESETTABLE),
                   NEVER=set(resume.NEVER))
    placed = {flag: [name for name, members in classes.items() if flag in members] for flag in flags}
    assert {flag: where for flag, where in placed.items() if len(where) != 1} == {}  # none missing, none twice
    assert set().union(*classes.values()) - flags == set()  # no name the parser does not know
    assert len(resume.APPLIED) == len(classes["APPLIED"])
    assert set(resume.EPOCH_START_ONLY) <= classes["APPLIED"]
    assert {name for resets in resume.RESETTABLE.values() for name in resets} == set(resume.RESETS)
    assert set(resume.RESETS) <= classes["FREE"] and set(resume.TRAINED_WITHOUT) <= flags


def saved_run(tmp_path, samples_done=0, **flags):
    """plan_resume's inputs without a real run: a checkpoint dict of the parsed flags, and the flags."""
    argv = ["--checkpoint_dir", str(tmp_path), "--log_dir", str(tmp_path), "--batch_size", "4"]
    checkpoint = dict(config=vars(parse_args(argv)), epoch=1, samples_done=samples_done, global_batch=4,
                      rng=[None], crop_generator="counter-v1")
    changed = [arg for flag, value in flags.items() for arg in [f"--{flag}"] + ([] if value is True else [str(value)])]
    return checkpoint, parse_args(argv + changed)


def test_a_new_seed_applies_from_an_epochs_start_and_is_refused_in_the_middle_of_one(tmp_path):
    checkpoint, args = saved_run(tmp_path, seed=7)
    before = dict(vars(args))
    plan = resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
    assert plan.notes == ("applied from here: --seed 42 -> 7",) and plan.reset == frozenset()
    assert (plan.gradient_accumulation_steps, plan.amp_dtype) == (1, "auto")
    assert vars(args) == before  # the plan only reads the flags: settle applies it
    checkpoint, args = saved_run(tmp_path, samples_done=8, seed=7)
    with pytest.raises(ConfigError, match=r"^ck.pth stopped in the middle of epoch 2, whose sample order comes from "
                                          r"--seed 42: pass --seed 42 \(a new seed applies from an epoch's start\)$"):
        resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)


def test_the_plan_names_the_parts_reset_and_keeps_the_global_batch(tmp_path):
    checkpoint, args = saved_run(tmp_path, optimizer="sgd", reset_optimizer=True, reset_best=True, batch_size=2)
    plan = resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
    assert plan.reset == {"optimizer", "best"} and plan.gradient_accumulation_steps == 2
    assert plan.notes == ("gradient accumulation 2 keeps the global batch at 4 on 1 process(es) (was 4 x 1 processes "
                          "x 1 accumulation)", "--reset_best: forget the best value, top-k and early-stopping count",
                          "--reset_optimizer: start the optimizer's state (moments) afresh")


# ------------------------------------------------------------------ refusals, each with its way out

@pytest.mark.parametrize("flags, refusal, way_out", [
    (dict(optimizer="sgd"), "was trained with --optimizer adamw, this run asks for --optimizer sgd",
     dict(reset_optimizer=True)),
    (dict(warmup_steps=3), "was trained with --warmup_steps 0, this run asks for --warmup_steps 3",
     dict(reset_lr_schedule=True)),
    (dict(lr_scheduler="step"), "was trained with --lr_scheduler cosine, this run asks for --lr_scheduler step",
     dict(reset_lr_schedule=True)),
    (dict(monitor_metric="val_loss"), "was trained with --monitor_metric val_acc, this run asks for "
                                      "--monitor_metric val_loss", dict(reset_best=True)),
    (dict(backbone_lr_scale=0.1), "was trained with --backbone_lr_scale 1.0, this run asks for 0.1",
     dict(reset_optimizer=True, reset_lr_schedule=True)),
])
def test_a_change_that_cannot_continue_is_refused_in_one_line_naming_the_way_out(
        tiny_data_module, finished_run, tmp_path, capsys, flags, refusal, way_out):
    out = copy_run(finished_run, str(tmp_path / "run"))
    before = open(f"{out}/checkpoints/checkpoint_latest.pth", "rb").read()
    code, _, err = resume_in_process(tiny_data_module, out, capsys, epochs=2, **flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and refusal in err and "Traceback" not in err
    assert f"--{next(iter(way_out))}" in err
    assert open(f"{out}/checkpoints/checkpoint_latest.pth", "rb").read() == before  # untouched
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, **flags, **way_out)
    assert code == 0 and "Epoch 2/2 |" in printed
    assert f"--{next(iter(way_out))}:" in printed  # the resume line says what was started afresh


def test_reset_optimizer_starts_fresh_moments_and_keeps_the_schedule(tiny_data_module, finished_run, tmp_path,
                                                                   capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))
    saved = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    code, _, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, optimizer="sgd", reset_optimizer=True)
    assert code == 0
    resumed = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert "momentum_buffer" in resumed["optimizer_state_dict"]["state"][0]  # SGD's state, not AdamW's
    assert resumed["scheduler_state_dict"]["last_epoch"] == 2 * saved["scheduler_state_dict"]["last_epoch"]


def test_raising_epochs_replans_the_cosine_to_reach_zero_at_the_new_last_epoch(tiny_data_module, tmp_path,
                                                                               capsys):
    out = str(tmp_path / "run")
    run_cli(train_cmd(*data_flags(tiny_data_module, out, model="tiny_cnn", epochs=2)))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=5)
    assert code == 0 and "schedule re-planned for 5 epochs (was 2)" in printed
    rates = json.load(open(f"{out}/logs/training_history.json"))["learning_rate"]  # each epoch's last step
    # Epochs 3-5 follow the cosine of a 5-epoch run (6 steps per epoch), as if planned that long.
    five_epoch_cosine = [1e-3 * (1 + math.cos(math.pi * (6 * epoch - 1) / 30)) / 2 for epoch in (3, 4, 5)]
    assert len(rates) == 5 and rates[2:] == pytest.approx(five_epoch_cosine, rel=1e-9)
    scheduler = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["scheduler_state_dict"]
    assert scheduler["T_max"] == 5 * 6 and scheduler["last_epoch"] == 30
    assert scheduler["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)  # the floor, at the last step


def test_applied_changes_are_named_on_the_resume_line_and_reach_the_optimizer(tiny_data_module, finished_run,
                                                                              tmp_path, capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, weight_decay=0.2, max_grad_norm=1.0)
    assert code == 0
    assert "applied from here: --weight_decay 0.01 -> 0.2, --max_grad_norm 0.0 -> 1.0" in printed
    assert "crops are drawn" not in printed  # the checkpoint's crops came from the same generator
    groups = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["optimizer_state_dict"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.2]


def test_a_checkpoint_from_before_the_counter_based_crops_resumes_with_a_note(tiny_data_module, finished_run,
                                                                             tmp_path, capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))
    path = f"{out}/checkpoints/checkpoint_latest.pth"
    older = torch.load(path)
    assert older.pop("crop_generator") == "counter-v1"
    torch.save(older, path)
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2)
    assert code == 0
    assert ("training crops are drawn by augment.py's counter-based generator from here (this checkpoint's run "
            "drew them per sample with Python's random): same distribution, other crops") in printed
    assert torch.load(path)["crop_generator"] == "counter-v1"


@pytest.mark.parametrize("trained_with", ["auto", "float16"])  # float16: also what older checkpoints hold
def test_a_resumed_amp_run_keeps_the_dtype_it_trained_with(tiny_data_module, tmp_path, capsys, trained_with):
    out = str(tmp_path / "run")
    run_cli(train_cmd(*data_flags(tiny_data_module, out, model="tiny_cnn", use_amp=True, amp_dtype=trained_with,
                                  limit_train_batches=2)))
    trained = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["config"]
    assert trained["amp_dtype"] != "auto" or not trained["use_amp"]  # the checkpoint holds what ran
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, use_amp=True,
                                         limit_train_batches=2)
    assert code == 0 and "Epoch 2/2 |" in printed
    assert "--amp_dtype" not in printed.split("Resumed from")[1].splitlines()[0]  # nothing changed
    resumed = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert (resumed["config"]["use_amp"], resumed["config"]["amp_dtype"]) == (trained["use_amp"], trained["amp_dtype"])
    assert ("scale" in resumed["scaler_state_dict"]) == (trained["amp_dtype"] == "float16")


def test_another_global_batch_is_refused_naming_the_batch_sizes_that_keep_it(tiny_data_module, finished_run,
                                                                            tmp_path, capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))  # trained with 4 x 1 process x 1
    code, _, err = resume_in_process(tiny_data_module, out, capsys, epochs=2, batch_size=4,
                                     gradient_accumulation_steps=2)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "trained with a global batch of 4 samples (4 x 1 processes x 1 accumulation); 4 x 1 processes x 2 " \
           "accumulation cannot keep it: use --batch_size 1 or 2 or 4" in err
    assert f"--pretrained_weights {out}/checkpoints/checkpoint_latest.pth" in err
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, batch_size=2)
    assert code == 0 and "gradient accumulation 2 keeps the global batch at 4 on 1 process(es)" in printed


# ------------------------------------------------------------------ layouts changed mid-epoch

def kill_mid_epoch(command, out):
    """Start a run, SIGKILL it (whole session) right after its first mid-epoch checkpoint."""
    job = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_checkpoint(f"{out}/checkpoints/checkpoint_latest.pth", lambda c: c["epoch"] == 0 and c["step"] >= 2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    saved = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert saved["epoch"] == 0 and 0 < saved["samples_done"] < saved["epoch_samples"]
    return saved


@pytest.fixture(scope="module")
def two_process_reference(photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_process_reference"))
    run_cli(torchrun(2, *data_flags(photos, out, epochs=2, **TINY)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("resume_on", ["1 process, batch 2", "1 process, batch 4"])
def test_a_two_process_run_resumed_on_one_process_trains_the_same_samples_and_weights(
        photos, two_process_reference, tmp_path, resume_on):
    out = str(tmp_path)
    flags = data_flags(photos, out, epochs=2, save_every_steps=1, **TINY)
    kill_mid_epoch(torchrun(2, *flags), out)
    batch = resume_on.split()[-1]
    resumed = run_cli(train_cmd(*flags, "--auto_resume", "--batch_size", batch))
    accumulation = {"2": 2, "4": 1}[batch]
    if accumulation == 2:
        assert "gradient accumulation 2 keeps the global batch at 4 on 1 process(es)" in resumed.stdout
    assert read_trace(f"{out}/logs") == read_trace(f"{two_process_reference}/logs")
    # tiny_cnn has no batch norm: the same samples per step give the same updates, up to rounding.
    assert_same_weights(torch.load(f"{out}/checkpoints/checkpoint_latest.pth")["model_state_dict"],
                        torch.load(f"{two_process_reference}/checkpoints/checkpoint_latest.pth")["model_state_dict"],
                        exact=False, atol=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_elastic_job_that_loses_a_node_goes_on_smaller_with_the_same_samples_per_step(
        photos, two_process_reference, tmp_path):
    """Two torchrun agents ("nodes") on 127.0.0.1 with --nnodes 1:2; one is SIGKILLed mid-epoch.
    The other's workers fail, it restarts them alone, they resume from the latest checkpoint on one
    process with twice the accumulation, and the run trains exactly the reference's samples."""
    out = str(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic_test",
               "--max_restarts=3", "--monitor_interval=0.5",
               "--rdzv_conf=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2",
               os.path.join(REPO, "train_ddp.py"), *data_flags(photos, out, epochs=2, save_every_steps=1, **TINY),
               "--auto_resume"]
    env = dict(os.environ, PYTHONPATH=REPO)
    survivor = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    time.sleep(1)  # the survivor hosts the rendezvous store
    lost = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_checkpoint(f"{out}/checkpoints/checkpoint_latest.pth", lambda c: c["epoch"] == 0 and c["step"] >= 2)
        workers = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(lost.pid)]).split()]
        for pid in workers:  # torchrun's workers run in their own sessions: the node goes down whole
            os.kill(pid, signal.SIGKILL)
        os.killpg(lost.pid, signal.SIGKILL)
        output = survivor.communicate(timeout=180)[0]
    finally:
        for job in (survivor, lost):
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert survivor.returncode == 0, output[-3000:]
    assert "gradient accumulation 2 keeps the global batch at 4 on 1 process(es)" in output
    assert read_trace(f"{out}/logs") == read_trace(f"{two_process_reference}/logs")



# ------------------------------------------------------------------ the modern recipe's flags

def resume_notes(printed):
    """The notes of the "Resumed from" line: what it says changed, in its order."""
    line = next(line for line in printed.splitlines() if line.startswith("Resumed from"))
    return line.split("; ")[1:]


REPLANNED = "schedule re-planned for 2 epochs (was 1)"  # every resume of finished_run with --epochs 2 says so


@pytest.mark.parametrize("flag, value, groups", [  # groups: (kind, weight decay, peak rate) from the head back
    # tiny_cnn has no norm layer; biases are a group of their own only with --bias_weight_decay (torchvision's rule)
    ("norm_weight_decay", 0.0, [("default", 0.01, 1e-3)]),
    ("bias_weight_decay", 0.0, [("default", 0.01, 1e-3), ("bias", 0.0, 1e-3)]),
    ("layer_decay", 0.5, [("default", 0.01, rate) for rate in (1e-3, 5e-4, 2.5e-4)]),
])
def test_a_flag_that_regroups_the_optimizer_is_refused_in_one_line_unless_both_resets_are_given(
        tiny_data_module, finished_run, tmp_path, capsys, flag, value, groups):
    out = copy_run(finished_run, str(tmp_path / "run"))
    latest = f"{out}/checkpoints/checkpoint_latest.pth"
    before = open(latest, "rb").read()
    for one_reset in ({}, dict(reset_optimizer=True), dict(reset_lr_schedule=True)):
        code, _, err = resume_in_process(tiny_data_module, out, capsys, epochs=2, **{flag: value}, **one_reset)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, one_reset
        assert err.startswith(f"error: {latest} was trained with no --{flag}, this run asks for {value}")
        assert f"asks for {value}, which regroups the optimizer's parameters" in err
        assert err.rstrip().endswith("or add --reset_optimizer --reset_lr_schedule to start both afresh")
    assert open(latest, "rb").read() == before
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, **{flag: value},
                                         reset_optimizer=True, reset_lr_schedule=True)
    assert code == 0 and "Epoch 2/2 |" in printed
    assert resume_notes(printed)[-2:] == ["--reset_lr_schedule: start a new schedule over the remaining epochs",
                                          "--reset_optimizer: start the optimizer's state (moments) afresh"]
    saved = torch.load(latest)["optimizer_state_dict"]["param_groups"]
    assert [(group["kind"], group["weight_decay"]) for group in saved] == [group[:2] for group in groups]
    assert [group["initial_lr"] for group in saved] == pytest.approx([group[2] for group in groups], rel=1e-12)


@pytest.mark.parametrize("flag, value, trained", [("lr_min", 1e-4, 0.0), ("lr_warmup_epochs", 1, 0)])
def test_a_new_floor_or_warm_up_of_the_learning_rate_needs_a_new_schedule(tiny_data_module, finished_run, tmp_path,
                                                                          capsys, flag, value, trained):
    out = copy_run(finished_run, str(tmp_path / "run"))
    latest = f"{out}/checkpoints/checkpoint_latest.pth"
    code, _, err = resume_in_process(tiny_data_module, out, capsys, epochs=3, **{flag: value})
    assert code == 2 and err == (f"error: {latest} was trained with --{flag} {trained}, this run asks for --{flag} "
                                 f"{value}: pass --{flag} {trained} to continue it, or add --reset_lr_schedule to "
                                 "start a new schedule over the remaining epochs\n")
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=3, **{flag: value},
                                         reset_lr_schedule=True)
    assert code == 0 and "Epoch 3/3 |" in printed
    assert resume_notes(printed)[-1] == "--reset_lr_schedule: start a new schedule over the remaining epochs"
    schedule = torch.load(latest)["scheduler_state_dict"]
    if flag == "lr_min":  # the new cosine over the 12 steps left ends at the floor
        assert schedule["eta_min"] == 1e-4 and schedule["_last_lr"][0] == pytest.approx(1e-4, rel=1e-9)
    else:  # it warms up for one epoch (6 steps) of the 12 left, then anneals
        assert schedule["_milestones"] == [6] and schedule["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


def test_augmentation_and_mixing_turned_on_apply_from_the_next_step_with_a_note_naming_old_and_new_values(
        tiny_data_module, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, auto_augment="ta_wide",
                                         random_erase=0.25, mixup_alpha=0.2, trace_samples=True)
    assert code == 0
    assert resume_notes(printed) == [REPLANNED, "applied from here: --auto_augment None -> ta_wide, --random_erase "
                                                "0.0 -> 0.25, --mixup_alpha 0.0 -> 0.2"]
    resumed = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert resumed["draws"] == dict(crop="counter-v1", policy="policy-v1", erase="policy-v1", mix="mix-v1")
    pairs = read_trace(f"{out}/logs", "pairs")  # epoch 2 only: the finished run traced nothing
    assert sorted(pairs) == [(2, step) for step in range(1, 7)]
    assert all(len(step) == 2 and {mode for *_, mode in step} == {"mixup"} for step in pairs.values())


def test_a_new_ra_reps_is_refused_in_the_middle_of_an_epoch_and_applied_from_an_epochs_start(
        tiny_data_module, finished_run, tmp_path, capsys):
    checkpoint, args = saved_run(tmp_path, samples_done=8, ra_reps=2)
    with pytest.raises(ConfigError, match=r"^ck.pth stopped in the middle of epoch 2, whose sample order comes from "
                                          r"--ra_reps 1: pass --ra_reps 1 \(a new ra_reps applies from an epoch's "
                                          r"start\)$"):
        resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
    out = copy_run(finished_run, str(tmp_path / "run"))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, ra_reps=2, trace_samples=True)
    assert code == 0 and resume_notes(printed) == [REPLANNED, "applied from here: --ra_reps 1 -> 2"]
    keys = [key for (epoch, _), keys in read_trace(f"{out}/logs").items() if epoch == 2 for key in keys]
    # 24 samples: 12 images twice each, as copies with their own keys (image + copy x 24), augmented apart.
    assert len(keys) == len(set(keys)) == 24
    assert sorted(Counter(key % 24 for key in keys).values()) == [2] * 12


def older_checkpoint(finished_run, target, draws=None):
    """A copy of finished_run whose checkpoint is as older versions wrote it: no recipe flags in its
    config (TRAINED_WITHOUT's), no `draws` (or the given ones)."""
    out = copy_run(finished_run, target)
    path = f"{out}/checkpoints/checkpoint_latest.pth"
    checkpoint = torch.load(path)
    for flag in resume.TRAINED_WITHOUT:
        del checkpoint["config"][flag]
    del checkpoint["draws"]
    if draws is not None:
        checkpoint["draws"] = draws
    torch.save(checkpoint, path)
    return out


def test_a_checkpoint_from_before_the_recipes_flags_resumes_with_their_defaults_and_notes_only_a_change(
        tiny_data_module, finished_run, tmp_path, capsys):
    out = older_checkpoint(finished_run, str(tmp_path / "defaults"))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2)
    assert code == 0 and resume_notes(printed) == [REPLANNED]  # the defaults are what it trained with
    resumed = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert set(resume.TRAINED_WITHOUT) <= set(resumed["config"]) and resumed["draws"] == dict(crop="counter-v1")
    out = older_checkpoint(finished_run, str(tmp_path / "mixing"))
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2, mixup_alpha=0.2)
    assert code == 0 and resume_notes(printed) == [REPLANNED, "applied from here: --mixup_alpha 0.0 -> 0.2"]


def test_draws_recorded_by_another_generator_give_one_note_for_each_draw_this_run_makes(
        tiny_data_module, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, str(tmp_path / "run"))
    path = f"{out}/checkpoints/checkpoint_latest.pth"
    checkpoint = torch.load(path)
    checkpoint["draws"] = dict(crop="counter-v0", mix="mix-v0")  # this run does not mix: no note for that
    torch.save(checkpoint, path)
    code, printed, _ = resume_in_process(tiny_data_module, out, capsys, epochs=2)
    assert code == 0 and resume_notes(printed) == [
        REPLANNED, "crop draws are made by counter-v1 from here (this checkpoint's run used counter-v0): same "
                   "distribution, other draws"]
    assert torch.load(path)["draws"] == dict(crop="counter-v1")


@pytest.mark.parametrize("flag, value", [("norm_weight_decay", 0.0), ("layer_decay", 0.5), ("lr_warmup_decay", 0.1)])
def test_a_refusal_names_a_way_to_continue_that_a_command_line_can_give(tmp_path, flag, value):
    checkpoint, args = saved_run(tmp_path, **{flag: value})  # the checkpoint's run left the flag unset
    with pytest.raises(ConfigError) as refused:
        resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
    assert f"--{flag} None" not in str(refused.value)
    assert f"was trained with no --{flag}" in str(refused.value) and f"leave --{flag} out" in str(refused.value)


def test_with_repeated_augmentation_mixing_cannot_be_switched_in_the_middle_of_an_epoch(tmp_path):
    # ranks take pairs with mixing, so the copies of --ra_reps interleave otherwise: the rest of the epoch would change
    checkpoint, args = saved_run(tmp_path, samples_done=8, mixup_alpha=0.2)
    checkpoint["config"]["ra_reps"] = args.ra_reps = 2
    with pytest.raises(ConfigError, match="with mixing off and --ra_reps 2, whose sample sequence depends on it"):
        resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
    checkpoint["samples_done"] = 0  # at an epoch's start it applies
    assert "--mixup_alpha 0.0 -> 0.2" in " ".join(resume.plan_resume(checkpoint, "ck.pth", args, world_size=1).notes)
    checkpoint["samples_done"], checkpoint["config"]["ra_reps"], args.ra_reps = 8, 1, 1  # no repeats: no change
    assert resume.plan_resume(checkpoint, "ck.pth", args, world_size=1)
