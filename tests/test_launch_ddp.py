"""launch_ddp.py: spawns train_ddp.py through real torchrun, single- and multi-node; what reaches
the user when a worker fails or the job is stopped."""
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, data_flags, run_cli, train_cmd, wait_for_checkpoint, write_image_folder

import launch_ddp

LAUNCH = [sys.executable, os.path.join(REPO, "launch_ddp.py")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_through_torchrun_with_flags_passed_unchanged(tiny_data, tmp_path):
    out = str(tmp_path)
    result = run_cli(LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, out, batch_size=3, seed=7))
    assert "No CUDA device: running 2 CPU process(es) on the gloo backend." in result.stdout
    command = next(line for line in result.stdout.splitlines() if line.startswith("Running: "))
    assert f"{sys.executable} -m torch.distributed.run --nproc_per_node=2 --standalone" in command
    assert command.endswith(" ".join(data_flags(tiny_data, out, batch_size=3, seed=7)))
    assert "2 processes on cpu (gloo); effective batch 6 (3 x 2 processes x 1 accumulation)" in result.stdout
    latest = torch.load(f"{out}/checkpoints/checkpoint_latest.pth")
    assert latest["config"]["batch_size"] == 3 and latest["config"]["seed"] == 7


def test_two_nodes_meet_at_127_0_0_1_through_c10d_rendezvous(tiny_data, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO)

    def node(rank):
        return subprocess.Popen(
            LAUNCH + ["--num_nodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                      "--master_port", str(port), "--num_gpus", "1"]
            + data_flags(tiny_data, str(tmp_path), model="tiny_cnn"),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert all("--nnodes=2" in o and f"--rdzv_endpoint=127.0.0.1:{port}" in o for o in outputs)
    joined = "".join(outputs)
    assert joined.count("2 processes on cpu (gloo)") == 1  # one global rank 0, on either node
    assert torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")["epoch"] == 1


def test_a_failing_worker_makes_the_launcher_exit_non_zero(tiny_data, tmp_path):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    result = run_cli(LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, str(tmp_path), resume=str(not_a_checkpoint)),
                     check=False)
    assert result.returncode != 0
    assert "is not a readable PyTorch checkpoint" in result.stderr


def test_bad_launch_input_is_refused_before_anything_spawns(tiny_data, tmp_path):
    cases = [
        (["--num_gpus", "0"], "--num_gpus must be at least 1"),
        (["--num_nodes", "2", "--node_rank", "2"], "--node_rank must be in 0..1"),
        (["--train_dir", str(tmp_path / "missing")], "train folder not found"),
        (["--batch_size", "-3"], "--batch_size must be at least 1"),
        (["--resume", str(tmp_path / "missing.pth")], f"checkpoint not found: {tmp_path / 'missing.pth'}"),
    ]
    for extra, message in cases:
        flags = data_flags(tiny_data, str(tmp_path)) + extra
        result = run_cli(LAUNCH + flags, check=False)
        assert result.returncode == 2, result
        assert message in result.stderr and "Traceback" not in result.stderr
        assert "Running:" not in result.stdout


def test_more_gpus_than_visible_is_one_clear_error(monkeypatch, capsys, tiny_data, tmp_path):
    # No GPU on the CI machine: pretend two are visible (checked for real on a GPU in BENCHMARKS.md).
    monkeypatch.setattr(launch_ddp, "cuda_device_count", lambda: 2)
    code = launch_ddp.main(["--num_gpus", "4"] + data_flags(tiny_data, str(tmp_path)))
    err = capsys.readouterr().err
    assert code == 2 and "--num_gpus 4 but only 2 CUDA device(s) are visible" in err


def test_the_launcher_checks_flags_gpus_and_data_without_importing_torch(tiny_data, tmp_path):
    # torchrun and every worker import torch anyway; a third import in the launcher cost seconds.
    check = ("import sys, launch_ddp; args, rest = launch_ddp.build_parser().parse_known_args(sys.argv[1:]); "
             "launch_ddp.check_launch(args, rest, launch_ddp.cuda_device_count()); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy')))")
    result = run_cli([sys.executable, "-c", check, "--num_gpus", "1"] + data_flags(tiny_data, str(tmp_path)))
    assert result.stdout.strip() == "[]"
    assert launch_ddp.cuda_device_count() == torch.cuda.device_count()


def descendants(pid):
    """The processes started under pid, at any depth (torchrun starts each worker in a session of its own)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except OSError:  # gone meanwhile
            pass
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def running(pids):
    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"
    return [pid for pid in pids if state(pid) not in ("gone", "Z")]


def long_epochs(tmp_path):
    """300 training images: one-image steps, about 150 per epoch and rank, so a signal lands mid-epoch."""
    return dict(train_dir=write_image_folder(str(tmp_path / "train"), per_class=100),
                val_dir=write_image_folder(str(tmp_path / "val"), per_class=1, seed=1))


def ignore_stop_signals():
    """What a non-interactive shell does to a job started with `&` (SIGINT), or a wrapper to both."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("signum,started_ignoring", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                     (signal.SIGTERM, True)])
def test_a_stop_signal_to_the_launchers_process_group_saves_and_exits_128_plus_signal_without_traceback(
        tmp_path, signum, started_ignoring):
    # The launcher leads a process group of its own, as a shell's job does; a terminal's Ctrl-C is
    # SIGINT to that whole group, a scheduler's notice SIGTERM to it. A launcher started with the
    # stop signals ignored still stops on them, as its workers do.
    flags = data_flags(long_epochs(tmp_path), str(tmp_path), model="tiny_cnn", batch_size=1, epochs=1000)
    launcher = subprocess.Popen(LAUNCH + ["--num_gpus", "2"] + flags, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO), text=True,
                                start_new_session=True, preexec_fn=ignore_stop_signals if started_ignoring else None)
    latest = f"{tmp_path}/checkpoints/checkpoint_latest.pth"
    wait_for_checkpoint(latest, lambda c: c["epoch"] >= 1)  # epoch 2 has begun
    job = descendants(launcher.pid)
    assert len(job) >= 3, job  # torchrun and its two workers
    os.killpg(launcher.pid, signum)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signum, out + err
    assert "Traceback" not in out + err and "SignalException" not in err, err
    stopped = re.search(rf"Stopped by signal {signum}: saved step (\d+) of epoch (\d+) ", out)
    assert stopped, out[-2000:] + err[-2000:]  # what the run said instead, if the signal landed elsewhere
    step, epoch = map(int, stopped.groups())
    saved = torch.load(latest)
    assert (saved["epoch"], saved["step"]) == (epoch - 1, step) and step > 0
    time.sleep(1)
    assert running(job) == [], "processes left behind"


@pytest.mark.slow
def test_sigterm_to_the_launcher_alone_reaches_the_workers_and_everything_exits(tiny_data, tmp_path):
    launcher = subprocess.Popen(
        LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, str(tmp_path), epochs=1000, model="tiny_cnn"),
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    wait_for_checkpoint(f"{tmp_path}/checkpoints/checkpoint_latest.pth", lambda c: c["epoch"] >= 1)
    job = descendants(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 128 + signal.SIGTERM, output
    time.sleep(1)
    assert running(job) == [], "processes left behind"


def test_help_lists_launcher_and_training_flags():
    result = run_cli(LAUNCH + ["--help"])
    for flag in ("--num_gpus", "--num_nodes", "--node_rank", "--master_addr", "--master_port",
                 "--max_restarts", "--use_amp", "--train_dir", "--gradient_accumulation_steps"):
        assert flag in result.stdout


# ------------------------------------------------------------------ what the user sees when a worker fails

def assert_one_error_line(result, message):
    """Exit 2 and one `error:` line, as for the launcher's own checks: no torchrun report, traceback or
    copy of the line from every rank."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr
    after_running = result.stdout.split("Running: ", 1)[-1].splitlines()[1:] + result.stderr.splitlines()
    shown = [line for line in after_running if line.strip() and not re.match(r"Epoch \d+/\d+: ", line)]
    assert len(shown) < 5, shown  # (progress-bar redraws aside)


@pytest.mark.slow
def test_a_text_file_named_jpg_found_by_one_worker_is_one_error_line_and_exit_2(tiny_data, tmp_path):
    (tmp_path / "data" / "train" / "circle" / "005.jpg").write_text("hello, not an image\n")
    result = run_cli(LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn"),
                     check=False)
    assert "Running: " in result.stdout  # found by a worker, not by the launcher
    assert_one_error_line(result, "error: cannot read image " + str(tmp_path / "data/train/circle/005.jpg"))
    assert not os.path.exists(tmp_path / "run" / "logs" / "config.json")  # nothing written before a checkpoint


@pytest.mark.slow
def test_a_checkpoint_of_other_classes_refused_by_every_worker_is_one_error_line_and_exit_2(tiny_data, tmp_path):
    run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path / "first"), model="tiny_cnn")))
    for split in ("train", "val"):
        shutil.move(str(tmp_path / "data" / split / "circle"), str(tmp_path / "data" / split / "oval"))
    checkpoint = str(tmp_path / "first" / "checkpoints" / "checkpoint_latest.pth")
    result = run_cli(LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn",
                                                                 resume=checkpoint), check=False)
    assert "Running: " in result.stdout
    assert_one_error_line(result, f"error: {checkpoint} was trained on 3 classes")


@pytest.mark.parametrize("case", ["empty class folder", "missing --resume file"])
def test_what_the_launcher_can_check_itself_is_refused_before_anything_spawns(tiny_data, tmp_path, case):
    flags = data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn")
    if case == "empty class folder":
        for image in (tmp_path / "data" / "val" / "square").iterdir():
            image.rename(tmp_path / f"moved_{image.name}")
        (tmp_path / "data" / "val" / "square" / "notes.txt").write_text("not an image")
        message = f"error: no image files in the class folder(s) square of {tmp_path / 'data' / 'val'} (supported"
    else:
        flags += ["--resume", str(tmp_path / "run" / "checkpoints" / "checkpoint_latest.pth")]
        message = f"error: checkpoint not found: {tmp_path / 'run' / 'checkpoints' / 'checkpoint_latest.pth'}"
    result = run_cli(LAUNCH + ["--num_gpus", "2"] + flags, check=False)
    assert result.stdout == "" and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.returncode == 2 and not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_a_killed_worker_is_not_taken_for_a_user_error_torchruns_report_stays(tiny_data, tmp_path):
    flags = data_flags(long_epochs(tmp_path), str(tmp_path), model="tiny_cnn", batch_size=1, epochs=1000)
    launcher = subprocess.Popen(LAUNCH + ["--num_gpus", "2"] + flags, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO), text=True,
                                start_new_session=True)
    wait_for_checkpoint(f"{tmp_path}/checkpoints/checkpoint_latest.pth", lambda c: c["epoch"] >= 1)
    torchrun_pid = int(subprocess.check_output(["pgrep", "-P", str(launcher.pid)]).split()[0])
    workers = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(torchrun_pid)]).split()]
    os.kill(workers[-1], signal.SIGKILL)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, out + err
    assert "Root Cause (first observed failure)" in err and "Signal 9 (SIGKILL)" in err, err


# ------------------------------------------------------------------ the relay of torchrun's stderr, fed bytes

def relayed(*chunks, torchrun_pid=4242, signum=None, end=True):
    out = io.BytesIO()
    relay = launch_ddp.Relay(out, torchrun_pid)
    relay.signal = signum
    for chunk in chunks:
        relay.feed(chunk)
    if end:
        relay.close()
    return relay, out.getvalue()


def test_the_relay_shows_a_progress_bar_at_once_and_an_error_after_it_on_a_line_of_its_own():
    relay, out = relayed(b"\rEpoch 1/3:  33%|###   | 1/3", end=False)
    assert out == b"\rEpoch 1/3:  33%|###   | 1/3"  # not held until a line end
    relay.feed(b"[rank 1] error: bad\n\rEpoch 1/3:  66%")
    relay.feed(b"[rank 0] error: bad\n")  # the same message from another rank
    assert relay.out.getvalue() == b"\rEpoch 1/3:  33%|###   | 1/3\n[rank 1] error: bad\n\rEpoch 1/3:  66%"


def test_the_relay_holds_an_error_line_written_in_two_parts_until_it_is_whole():
    relay, out = relayed(b"[rank 0] error: bad input", b"\n", b"[rank 1] error: bad input", b"\n")
    assert out == b"[rank 0] error: bad input\n"


def test_the_relay_passes_a_workers_traceback_and_holds_torchruns_signal_traceback():
    worker = (b"Traceback (most recent call last):\n  File \"train_ddp.py\", line 1, in <module>\n"
              b"ZeroDivisionError: division by zero\n")
    agent = (b"Traceback (most recent call last):\n  File \"run.py\", line 9\n"
             b"torch.distributed.elastic.multiprocessing.api.SignalException: Process 4242 got signal: 2\n\n"
             b"During handling of the above exception, another exception occurred:\n\n"
             b"Traceback (most recent call last):\n  File \"run.py\", line 9\n"
             b"torch.distributed.elastic.multiprocessing.api.SignalException: Process 4242 got signal: 2\n")
    log = b"W1206 03:41:56.374000 4242 torch/distributed/elastic/agent/server/api.py:753] Received 2 death signal\n"
    relay, out = relayed(worker, b"next line\n", log, agent, signum=signal.SIGINT)
    assert out == worker + b"next line\n"
    assert relay.exit_code(1, None) == 130 and relay.out.getvalue() == out
    relay, out = relayed(worker, torchrun_pid=1)  # a worker's traceback at the very end is not held either
    assert out == worker and relay.exit_code(1, None) == 1
