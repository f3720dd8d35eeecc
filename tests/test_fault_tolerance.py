"""Fault tolerance, on real processes: SIGKILL and exact resume, torchrun restarts, preemption by
SIGTERM, failing ranks, non-finite steps, unreadable images, failed saves."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, data_flags, run_cli, torchrun, train_cmd, wait_for_checkpoint

pytestmark = pytest.mark.slow

LAUNCH = [sys.executable, os.path.join(REPO, "launch_ddp.py")]
TIMING_KEYS = {"epoch_seconds", "samples_per_second"}
# MobileNetV3-small has batch norm and dropout: the dropout masks come from the torch RNG, which
# must be restored exactly for a resumed run to match.
RUN = dict(model="mobilenet_v3_small", epochs=4, image_size=16, save_every_steps=1, log_every_steps=1)


def start(args, **popen):
    return subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def mid_epoch(checkpoint):
    return checkpoint["epoch"] == 0 and checkpoint["step"] >= 2


def assert_same_run(a_path, b_path):
    """Final weights, optimizer state and history equal, tensor for tensor."""
    a, b = torch.load(a_path), torch.load(b_path)
    for key in ("model_state_dict", "scheduler_state_dict", "scaler_state_dict"):
        assert_equal_nested(a[key], b[key], key)
    assert_equal_nested(a["optimizer_state_dict"], b["optimizer_state_dict"], "optimizer")
    def strip(h):
        return {k: v for k, v in h.items() if k not in TIMING_KEYS}

    assert strip(a["history"]) == strip(b["history"])
    assert a["epoch"] == b["epoch"] and a["best_acc"] == b["best_acc"]


def assert_equal_nested(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, 1 and 2 processes, to compare the killed-and-resumed runs against."""
    from conftest import write_image_folder
    root = tmp_path_factory.mktemp("reference")
    data = dict(train_dir=write_image_folder(str(root / "train"), per_class=8),
                val_dir=write_image_folder(str(root / "val"), per_class=3, seed=1))
    run_cli(train_cmd(*data_flags(data, f"{root}/one", **RUN)))
    run_cli(torchrun(2, *data_flags(data, f"{root}/two", batch_size=2, **RUN)))
    return dict(data=data, one=f"{root}/one/checkpoints/checkpoint_latest.pth",
                two=f"{root}/two/checkpoints/checkpoint_latest.pth")


@pytest.mark.parametrize("nproc, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_sigkill_at_a_step_then_resume_equals_the_uninterrupted_run(references, tmp_path, nproc, workers):
    data = references["data"]
    flags = data_flags(data, str(tmp_path), num_workers=workers, **RUN, **({"batch_size": 2} if nproc == 2 else {}))
    command = train_cmd(*flags) if nproc == 1 else torchrun(2, *flags)
    job = start(command)
    latest = f"{tmp_path}/checkpoints/checkpoint_latest.pth"
    killed_at = wait_for_checkpoint(latest, mid_epoch)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, workers and loader processes included
    job.wait(timeout=30)
    assert killed_at["step"] >= 2
    run_cli(command + ["--auto_resume"])
    assert_same_run(latest, references["one" if nproc == 1 else "two"])


def test_torchrun_restarts_a_killed_worker_and_the_run_continues_exactly(references, tmp_path):
    data = references["data"]
    launcher = start(LAUNCH + ["--num_gpus", "2", "--max_restarts", "1"]
                     + data_flags(data, str(tmp_path), batch_size=2, **RUN))
    wait_for_checkpoint(f"{tmp_path}/checkpoints/checkpoint_latest.pth", mid_epoch)
    torchrun_pid = int(subprocess.check_output(["pgrep", "-P", str(launcher.pid)]).split()[0])
    workers = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(torchrun_pid)]).split()]
    os.kill(workers[-1], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, output
    assert "--auto_resume" in output.splitlines()[1] and "Resumed from" in output
    assert_same_run(f"{tmp_path}/checkpoints/checkpoint_latest.pth", references["two"])


def test_sigterm_to_the_launcher_saves_a_resumable_checkpoint_at_a_step_boundary(references, tmp_path):
    data = references["data"]
    flags = data_flags(data, str(tmp_path), batch_size=2, **RUN)
    launcher = start(LAUNCH + ["--num_gpus", "2"] + flags)
    wait_for_checkpoint(f"{tmp_path}/checkpoints/checkpoint_latest.pth", mid_epoch)
    sent = time.time()
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]
    assert time.time() - sent < 30, "not within torchrun's 30 s grace period"
    assert "Stopped by signal 15" in output, output
    saved = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")
    assert saved["step"] > 0 or saved["epoch"] >= 1
    run_cli(torchrun(2, *flags, "--auto_resume"))
    assert_same_run(f"{tmp_path}/checkpoints/checkpoint_latest.pth", references["two"])


def start_with_sigterm_pending(args):
    """Start a job with SIGTERM blocked (as a wrapper may leave it) and send SIGTERM at once: the
    signal waits, pending, until train_ddp.py installs its handler."""
    job = start(args, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
    job.send_signal(signal.SIGTERM)
    return job


def test_a_signal_while_setting_up_ends_the_run_at_once_without_files(tiny_data, tmp_path):
    job = start_with_sigterm_pending(train_cmd(*data_flags(tiny_data, str(tmp_path), model="tiny_cnn")))
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + signal.SIGTERM, output
    assert "Stopped by signal 15 while setting up; nothing was trained or saved." in output
    assert "Traceback" not in output
    assert not os.path.exists(f"{tmp_path}/checkpoints")


def test_a_signal_acted_on_at_the_last_step_of_an_epoch_resumes_into_that_epochs_validation(tmp_path):
    from conftest import write_image_folder

    import train_ddp
    from engine.distributed import StopRequest, setup_distributed
    data = dict(train_dir=write_image_folder(str(tmp_path / "train"), per_class=8),
                val_dir=write_image_folder(str(tmp_path / "val"), per_class=3, seed=1))
    # 24 images in one batch: every epoch is one optimizer step, so the first joint check is at
    # the epoch's last step.
    flags = data_flags(data, f"{tmp_path}/run", **dict(RUN, epochs=2, batch_size=24, save_every_steps=0))
    run_cli(train_cmd(*data_flags(data, f"{tmp_path}/reference", **dict(RUN, epochs=2, batch_size=24,
                                                                       save_every_steps=0))))
    # In this process, the request is in place when training begins, exactly as if the signal had
    # arrived during that one step.
    previous = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}
    try:
        stop = StopRequest()
        stop.signal = signal.SIGTERM
        assert train_ddp.train(train_ddp.parse_args(flags), setup_distributed(), stop) == 128 + signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    latest = f"{tmp_path}/run/checkpoints/checkpoint_latest.pth"
    saved = torch.load(latest)
    assert (saved["epoch"], saved["step"]) == (0, 1)  # epoch 1 trained, not yet validated
    resumed = run_cli(train_cmd(*flags, "--auto_resume"))
    assert "Epoch 1/2 |" in resumed.stdout and "Epoch 2/2 |" in resumed.stdout
    assert_same_run(latest, f"{tmp_path}/reference/checkpoints/checkpoint_latest.pth")


class SignalOnFirstBatch:
    """A validation loader that sends this process a real SIGTERM as it hands out its first batch:
    the signal lands in the middle of the epoch's validation, whatever the machine's speed."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_a_signal_during_validation_stops_at_once_and_keeps_the_epochs_training(tmp_path, monkeypatch):
    from conftest import write_image_folder

    import train_ddp
    from engine import training
    from engine.distributed import StopRequest, setup_distributed
    data = dict(train_dir=write_image_folder(str(tmp_path / "train"), per_class=8),
                val_dir=write_image_folder(str(tmp_path / "val"), per_class=20, seed=1))
    flags = dict(model="tiny_cnn", epochs=2, batch_size=24, num_sanity_val_steps=0)
    run_cli(train_cmd(*data_flags(data, f"{tmp_path}/reference", **flags)))

    def build_data_signalling_in_validation(args, ctx):
        built = training.build_data(args, ctx)
        built.val_loader = SignalOnFirstBatch(built.val_loader)
        return built

    monkeypatch.setattr(train_ddp, "build_data", build_data_signalling_in_validation)
    command = data_flags(data, f"{tmp_path}/run", **flags)
    previous = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}
    try:
        code = train_ddp.train(train_ddp.parse_args(command), setup_distributed(), StopRequest())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert code == 128 + signal.SIGTERM
    latest = f"{tmp_path}/run/checkpoints/checkpoint_latest.pth"
    saved = torch.load(latest)
    assert saved["history"]["epoch"] == []  # validation never finished
    assert (saved["epoch"], saved["step"]) == (0, 1) and saved["samples_done"] == saved["epoch_samples"] == 24
    resumed = run_cli(train_cmd(*command, "--auto_resume"))
    assert "(training done, validation not)" not in resumed.stdout and "Epoch 1/2 |" in resumed.stdout
    assert_same_run(latest, f"{tmp_path}/reference/checkpoints/checkpoint_latest.pth")


def test_a_signal_stops_mid_epoch_at_a_joint_check_whatever_log_every_steps_is(tmp_path):
    from conftest import write_image_folder
    data = dict(train_dir=write_image_folder(str(tmp_path / "train"), per_class=100),
                val_dir=write_image_folder(str(tmp_path / "val"), per_class=1, seed=1))
    # 300 steps of a few ms per epoch, no log point inside an epoch: the joint checks alone
    # (about every 0.25 s) must notice the signal.
    flags = data_flags(data, str(tmp_path), model="tiny_cnn", batch_size=1, epochs=1000, log_every_steps=100000)
    job = start(train_cmd(*flags))
    latest = f"{tmp_path}/checkpoints/checkpoint_latest.pth"
    wait_for_checkpoint(latest, lambda c: c["epoch"] >= 1)  # epoch 2 has just begun
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=60)[0]
    assert job.returncode == 128 + signal.SIGTERM, output
    saved = torch.load(latest)
    assert saved["epoch"] == 1 and 0 < saved["step"] < 300, (saved["epoch"], saved["step"])
    assert "Stopped by signal 15: saved step" in output


def test_a_failing_rank_ends_the_whole_job_quickly_with_its_error_visible(tiny_data, tmp_path):
    with open(f"{tiny_data['train_dir']}/square/003.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    began = time.time()
    # 24 images: 12 per rank, one batch of 12 each, so the bad file is read on one of them.
    result = run_cli(torchrun(2, *data_flags(tiny_data, str(tmp_path), batch_size=12, num_workers=2)), check=False)
    assert time.time() - began < 90
    assert result.returncode != 0
    assert "error: cannot read image" in result.stderr and "square/003.png" in result.stderr
    assert not os.path.exists(f"{tmp_path}/checkpoints/checkpoint_latest.pth")


def test_torchruns_summary_names_the_failing_rank_and_its_message_and_the_other_rank_has_no_traceback(
        tiny_data, tmp_path):
    with open(f"{tiny_data['train_dir']}/square/003.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    result = run_cli(torchrun(2, *data_flags(tiny_data, str(tmp_path), batch_size=12, model="tiny_cnn")), check=False)
    assert result.returncode != 0
    root_cause = result.stderr[result.stderr.index("Root Cause (first observed failure)"):]
    failing_rank = re.search(r"\[rank (\d)\] error: cannot read image", result.stderr).group(1)
    assert re.search(rf"rank\s*: {failing_rank} ", root_cause), root_cause
    assert "error: cannot read image" in root_cause and "square/003.png" in root_cause
    # torchrun prints its own ChildFailedError traceback; none of the ranks prints one.
    assert not re.search(rf'File "{REPO}/\w+\.py"', result.stderr), result.stderr[-3000:]
    assert "another process of this job stopped or failed" in result.stderr


def test_a_sigkilled_rank_without_restarts_ends_the_job(tiny_data, tmp_path):
    job = start(torchrun(2, *data_flags(tiny_data, str(tmp_path), epochs=1000, model="tiny_cnn")))
    wait_for_checkpoint(f"{tmp_path}/checkpoints/checkpoint_latest.pth", lambda c: True)
    workers = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(job.pid)]).split()]
    os.kill(workers[0], signal.SIGKILL)
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "SIGKILL" in output


@pytest.mark.parametrize("bad_file, content", [
    ("square/zero.png", b""),
    ("square/notes.jpg", b"just text, not an image"),
    ("square/truncated.png", None),
])
def test_unreadable_images_fail_naming_the_file_or_are_skipped_and_counted(tiny_data, tmp_path, bad_file, content):
    path = f"{tiny_data['train_dir']}/{bad_file}"
    if content is None:  # a real PNG cut in half
        whole = open(f"{tiny_data['train_dir']}/square/000.png", "rb").read()
        content = whole[: len(whole) // 2]
    with open(path, "wb") as f:
        f.write(content)
    failed = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/fail", num_workers=2, batch_size=5)), check=False)
    assert failed.returncode == 2
    assert f"error: cannot read image {path}" in failed.stderr and "--skip_bad_images" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not os.path.exists(f"{tmp_path}/fail/checkpoints")
    skipped = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/skip", skip_bad_images=True, epochs=2,
                                            batch_size=5)))
    assert f"warning: skipping unreadable image {path}" in skipped.stderr
    history = json.load(open(f"{tmp_path}/skip/logs/training_history.json"))
    assert history["skipped_images"] == [1, 1]  # 25 images in batches of 5: all read every epoch


def test_grayscale_rgba_palette_cmyk_and_uppercase_jpg_train(tiny_data, tmp_path):
    from PIL import Image
    source = Image.open(f"{tiny_data['train_dir']}/circle/000.png")
    source.convert("L").save(f"{tiny_data['train_dir']}/circle/gray.png")
    source.convert("RGBA").save(f"{tiny_data['train_dir']}/circle/alpha.png")
    source.convert("P").save(f"{tiny_data['train_dir']}/circle/palette.png")
    source.convert("CMYK").save(f"{tiny_data['train_dir']}/circle/cmyk.jpg")
    source.save(f"{tiny_data['train_dir']}/circle/UPPER.JPG")
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), batch_size=29)))
    assert "Training resnet18 on 29 images" in result.stdout
    assert json.load(open(f"{tmp_path}/logs/training_history.json"))["skipped_images"] == [0]


def write_weights_with_nan(path):
    from model import build_model
    torch.manual_seed(0)
    state = build_model("tiny_cnn", 3).state_dict()
    state["fc.bias"][1] = float("nan")
    torch.save(state, path)
    return state


def test_non_finite_steps_are_skipped_counted_and_abort_after_the_limit(tiny_data, tmp_path):
    weights = write_weights_with_nan(f"{tmp_path}/nan.pth")
    flags = dict(model="tiny_cnn", pretrained_weights=f"{tmp_path}/nan.pth", lr_scheduler="none")
    # Every step has a NaN loss: all 6 are skipped and counted, the weights never move.
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/skip", max_nonfinite_steps=100, **flags)))
    latest = torch.load(f"{tmp_path}/skip/checkpoints/checkpoint_latest.pth")
    assert latest["history"]["nonfinite_steps"] == [6]
    assert torch.equal(latest["model_state_dict"]["features.0.weight"], weights["features.0.weight"])
    # With a limit of 3 the run stops with a clear error at the first logging point past it.
    failed = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/abort", max_nonfinite_steps=3,
                                           log_every_steps=1, **flags)), check=False)
    assert failed.returncode == 2
    assert "error: 3 consecutive optimizer steps had a non-finite loss or gradient" in failed.stderr
    assert not os.path.exists(f"{tmp_path}/abort/checkpoints/checkpoint_latest.pth")


def test_a_failed_save_reports_clearly_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    flags = data_flags(tiny_data, str(tmp_path), model="tiny_cnn")
    run_cli(train_cmd(*flags))
    latest = f"{tmp_path}/checkpoints/checkpoint_latest.pth"
    before = open(latest, "rb").read()

    def small_file_limit():  # a real write failure: files may not grow past 4 KB (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run(train_cmd(*flags, "--epochs", "2", "--auto_resume"), cwd=REPO, capture_output=True,
                            text=True, timeout=120, preexec_fn=small_file_limit,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2
    assert f"error: could not write checkpoint {latest}: File too large" in result.stderr
    assert "previous checkpoint there is untouched" in result.stderr
    assert open(latest, "rb").read() == before
    assert [f for f in os.listdir(f"{tmp_path}/checkpoints") if ".tmp" in f] == []


def test_resume_refuses_a_malicious_pickle_without_running_it(tiny_data, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model_state_dict": Exploit()}, f"{tmp_path}/evil.pth")
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), resume=f"{tmp_path}/evil.pth")), check=False)
    assert result.returncode == 2
    assert "refusing to load" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
