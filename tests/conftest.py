"""Shared fixtures: a tiny real ImageFolder on disk and helpers that run the real CLIs."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CLASSES = ("circle", "square", "triangle")


def write_image_folder(root, per_class, size=(24, 20), seed=0):
    """Class k images are noisy pictures dominated by colour channel k: learnable in a few steps."""
    rng = np.random.RandomState(seed)
    for k, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.randint(0, 90, size=(size[1], size[0], 3)).astype(np.uint8)
            pixels[..., k] = rng.randint(160, 256, size=(size[1], size[0]))
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:03d}.png"))
    return root


def make_tiny_data(root):
    """train: 3 classes x 8 images (24 in all); val: 3 x 3 minus one = 8 images, under root/data."""
    train = write_image_folder(os.path.join(root, "data", "train"), per_class=8)
    val = write_image_folder(os.path.join(root, "data", "val"), per_class=3, seed=1)
    os.remove(os.path.join(val, "square", "002.png"))
    return dict(train_dir=train, val_dir=val, root=str(root))


@pytest.fixture(autouse=True)
def restore_stop_signal_handlers():
    """A cache build stopped in this process ignores further stop signals from then on
    (cache_file.stay_stopped), as a process that is ending should; the tests after it, and the
    processes they start, must not inherit that."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def tiny_data(tmp_path):
    return make_tiny_data(str(tmp_path))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline wandb whose settings, cache and runs all live under tmp_path (run_cli passes this
    process's environment on to the CLIs it runs)."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID",
                 "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:  # wandb reads the environment once per process: let the next test start afresh
        wandb.teardown()


def read_wandb_records(run_file):
    """The records of a .wandb transaction log, decoded by wandb's own reader.

    wandb 0.31 has no Python reader any more (sdk/internal/datastore.py is gone); its reader is the
    wandb-core binary behind `wandb leet inspect --json`, one JSON record per line."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def data_flags(data, out, **overrides):
    """Small, fast training flags for the tiny dataset, writing under `out`."""
    flags = dict(train_dir=data["train_dir"], val_dir=data["val_dir"], checkpoint_dir=f"{out}/checkpoints",
                 log_dir=f"{out}/logs", image_size=16, batch_size=4, epochs=1, num_workers=0)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def run_cli(args, cwd=REPO, timeout=240, env=None, check=True):
    """Run a command for real and return the CompletedProcess; fail with its output on error."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO, **(env or {}))
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-4000:]}")
    return result


def torchrun(nproc, *script_args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(REPO, "train_ddp.py"), *script_args]


def train_cmd(*script_args):
    return [sys.executable, os.path.join(REPO, "train_ddp.py"), *script_args]


def load_weights(checkpoint_path):
    return torch.load(checkpoint_path)["model_state_dict"]


def assert_same_weights(a, b, exact=True, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def wait_for_checkpoint(path, done, timeout=120):
    """Poll a checkpoint (atomic writes make every read safe) until done(checkpoint) holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            checkpoint = torch.load(path)
            if done(checkpoint):
                return checkpoint
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached the expected state")
