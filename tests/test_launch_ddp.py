"""launch_ddp.py: spawns train_ddp.py through real torchrun, single- and multi-node."""
import os
import signal
import socket
import subprocess
import sys
import time

import torch

import launch_ddp
from conftest import REPO, data_flags, run_cli

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


def test_sigterm_to_the_launcher_reaches_the_workers_and_everything_exits(tiny_data, tmp_path):
    launcher = subprocess.Popen(
        LAUNCH + ["--num_gpus", "2"] + data_flags(tiny_data, str(tmp_path), epochs=1000, model="tiny_cnn"),
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(f"{tmp_path}/checkpoints/checkpoint_latest.pth") and time.time() < deadline:
        time.sleep(0.5)
    assert launcher.poll() is None, "training ended before the signal"
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    survivors = subprocess.run(["pgrep", "-s", str(launcher.pid)], capture_output=True, text=True).stdout
    assert survivors.strip() == "", f"processes left behind: {survivors}"


def test_help_lists_launcher_and_training_flags():
    result = run_cli(LAUNCH + ["--help"])
    for flag in ("--num_gpus", "--num_nodes", "--node_rank", "--master_addr", "--master_port",
                 "--max_restarts", "--use_amp", "--train_dir", "--gradient_accumulation_steps"):
        assert flag in result.stdout
