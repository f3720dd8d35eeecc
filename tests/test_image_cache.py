"""image_cache.py and cache_file.py: the decoded-image cache against the plain file path, and the
cache file shared by concurrent jobs, ranks and nodes."""
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
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
    write_image_folder,
)
from PIL import Image

from core.errors import DataError
from dataset import AugmentedImageFolder, train_sampler
from fastload.cache_file import DecodeForCache, describe_cache, storage_size
from fastload.image_cache import CachedBatches, build_or_open
from inputs.augment import crop_and_flip


def open_cache(folder, image_size, cache_dir, train=False):
    dataset = AugmentedImageFolder(folder, image_size, train=train)
    images, path, _ = build_or_open(dataset, image_size, str(cache_dir), num_workers=0)
    return dataset, images, path


def test_evaluation_from_the_cache_equals_evaluation_from_the_files_pixel_for_pixel(tiny_data, tmp_path):
    dataset, images, _ = open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    loader = CachedBatches(images, dataset.targets, list(range(len(dataset))), batch_size=3, train=False,
                           image_size=16, device=torch.device("cpu"), drop_last=False)
    batches = list(loader)
    cached = torch.cat([b[0] for b in batches])
    assert torch.cat([b[1] for b in batches]).tolist() == dataset.targets
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(len(dataset)))
    for i in range(len(dataset)):
        assert torch.equal(cached[i], dataset[i][0])


def test_training_crops_follow_the_file_paths_per_sample_boxes_and_flips(tmp_path):
    # Square sources of exactly the stored size S: both paths then crop the same box of the same pixels.
    size = 32
    stored = storage_size(size)
    folder = write_image_folder(str(tmp_path / "square"), per_class=4, size=(stored, stored))
    dataset, images, _ = open_cache(folder, size, tmp_path / "cache", train=True)
    sampler = train_sampler(dataset, 4, rank=0, world_size=1, seed=dataset.seed)
    sampler.set_epoch(3)
    loader = CachedBatches(images, dataset.targets, sampler, batch_size=4, train=True, image_size=size,
                           device=torch.device("cpu"), drop_last=True, seed=dataset.seed)
    for crops, labels, indices, _ in loader:
        for crop, label, index in zip(crops, labels.tolist(), indices.tolist()):
            from_file, file_label, _ = dataset[(3, index)]
            assert label == file_label
            difference = (crop.float() - from_file.float()).abs().mean().item()
            assert difference < 6, f"sample {index}: mean difference {difference:.1f} of 255"


def test_the_cpu_readers_crops_equal_the_batched_crop_a_gpu_makes(tiny_data, tmp_path):
    dataset, images, _ = open_cache(tiny_data["train_dir"], 16, tmp_path / "cache", train=True)
    sampler = train_sampler(dataset, 4, rank=0, world_size=1, seed=0)
    sampler.set_epoch(5)
    loader = CachedBatches(images, dataset.targets, sampler, 4, True, 16, torch.device("cpu"), True, seed=0)
    keys = list(iter(sampler))
    for batch, (crops, _, indices, _) in enumerate(loader):
        boxes, flips = loader.draw_crops([key[0] for key in keys[4 * batch:4 * batch + 4]], indices)
        expected = crop_and_flip(torch.from_numpy(np.array(images[indices.numpy()])), torch.from_numpy(boxes),
                                 torch.from_numpy(flips), 16)
        assert (crops.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("quality", [None, 90], ids=["raw", "compressed"])
def test_mid_epoch_start_yields_exactly_the_rest_of_the_epoch(tiny_data, tmp_path, quality):
    dataset = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True)
    images = build_or_open(dataset, 16, str(tmp_path / "cache"), num_workers=0, quality=quality)[0]
    sampler = train_sampler(dataset, 4, rank=0, world_size=1, seed=0)
    loader = CachedBatches(images, dataset.targets, sampler, 4, True, 16, torch.device("cpu"), True, seed=0)
    sampler.set_epoch(2)
    whole = list(loader)
    sampler.set_epoch(2, start=8)
    rest = list(loader)
    assert len(whole) == 6 and len(rest) == 4
    for full, resumed in zip(whole[2:], rest):
        assert torch.equal(full[0], resumed[0]) and torch.equal(full[2], resumed[2])


def test_a_changed_file_rebuilds_the_cache(tiny_data, tmp_path):
    dataset, images, first = open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    assert open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")[2] == first  # unchanged: reused
    changed = f"{tiny_data['val_dir']}/circle/000.png"
    write_image_folder(str(tmp_path / "other"), per_class=1, seed=9)
    os.replace(str(tmp_path / "other" / "circle" / "000.png"), changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    dataset, images, second = open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    assert second != first
    index = dataset.samples.index((changed, 0))
    assert torch.equal(torch.from_numpy(np.array(images[index])).permute(2, 0, 1)[:, 1:17, 1:17],
                       dataset[index][0])


def test_training_with_and_without_the_cache_is_identical_without_augmentation(tiny_data, tmp_path):
    common = dict(model="tiny_cnn", epochs=2, no_augmentation=True)
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/files", **common)))
    result = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/cached", cache_images=f"{tmp_path}/cache",
                                           **common)))
    assert "built in" in result.stdout
    assert_same_weights(load_weights(f"{tmp_path}/files/checkpoints/checkpoint_latest.pth"),
                        load_weights(f"{tmp_path}/cached/checkpoints/checkpoint_latest.pth"), exact=True)
    again = run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/again", cache_images=f"{tmp_path}/cache",
                                          **common)))
    assert again.stdout.count("reused") == 2


def test_two_ranks_build_one_cache_together_equal_to_a_one_process_build(tiny_data, tmp_path):
    run_cli(torchrun(2, *data_flags(tiny_data, f"{tmp_path}/two", model="tiny_cnn",
                                    cache_images=f"{tmp_path}/cache2")))
    run_cli(train_cmd(*data_flags(tiny_data, f"{tmp_path}/one", model="tiny_cnn",
                                  cache_images=f"{tmp_path}/cache1")))
    for name in sorted(os.listdir(f"{tmp_path}/cache1")):
        assert open(f"{tmp_path}/cache1/{name}", "rb").read() == open(f"{tmp_path}/cache2/{name}", "rb").read()
    assert sorted(os.listdir(f"{tmp_path}/cache2")) == sorted(os.listdir(f"{tmp_path}/cache1"))  # no temp or lock files


def test_a_cache_that_does_not_fit_on_disk_is_refused_clearly(tiny_data, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    try:
        result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), image_size=128,
                                               cache_images=str(small))), check=False)
        assert result.returncode == 2
        assert f"error: the image cache needs 1.5 MiB but {small} has 1.0 MiB free" in result.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # an open memmap would keep it busy


# The shared cache under concurrency: jobs, signals, planted links, full disks, damaged files, nodes.

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """60 images of 480 x 360: a build of a few tenths of a second, long enough to be caught midway."""
    return write_image_folder(str(tmp_path_factory.mktemp("photos") / "train"), per_class=20, size=(480, 360))


def assert_complete_cache(folder, image_size, cache_dir):
    """The cache in cache_dir, reopened (so verified), holds each file's decoded pixels (no zeroed
    or foreign image), and cache_dir holds nothing else: no temporary file, lock or second copy."""
    dataset, images, path = open_cache(folder, image_size, cache_dir)
    decoder = DecodeForCache(dataset.samples, image_size)
    for index in range(len(dataset)):
        assert np.array_equal(images[index], decoder[index][1]), f"image {index} differs from its file"
    assert os.listdir(cache_dir) == [os.path.basename(path)]
    return path


def build_as_another_job(folder, image_size, cache_dir, start, results):
    """A job of its own (a spawned process, no process group) asking for the cache."""
    dataset = AugmentedImageFolder(folder, image_size, train=False)
    start.wait()  # the jobs ask at the same moment
    _, path, built = build_or_open(dataset, image_size, cache_dir, num_workers=0)
    results.put((path, built))


class Jobs:
    """`count` jobs started at once, each asking for the cache of `folder` in cache_dir."""

    def __init__(self, count, folder, image_size, cache_dir):
        spawn = multiprocessing.get_context("spawn")
        self.start, self.results = spawn.Barrier(count), spawn.Queue()  # kept: the jobs use them
        self.processes = [spawn.Process(target=build_as_another_job,
                                        args=(folder, image_size, str(cache_dir), self.start, self.results))
                          for _ in range(count)]
        for process in self.processes:
            process.start()

    def outcomes(self, timeout=120):
        """Each job's (path, built) once all have ended; their exit codes must be 0."""
        for process in self.processes:
            process.join(timeout)
        assert [process.exitcode for process in self.processes] == [0] * len(self.processes)
        return [self.results.get(timeout=10) for _ in self.processes]


def wait_for_temp_file(cache_dir, running):
    """The first temporary cache file to appear in cache_dir: a build is under way."""
    while running():
        temps = [name for name in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else []) if ".tmp." in name]
        if temps:
            return os.path.join(cache_dir, temps[0])
        time.sleep(0.005)
    raise AssertionError(f"the build in {cache_dir} ended before it was seen")


def test_two_jobs_asking_for_the_same_cache_at_once_build_it_once_and_both_get_it_complete(photos, tmp_path):
    outcomes = Jobs(2, photos, 64, tmp_path / "cache").outcomes()
    assert sorted(built for _, built in outcomes) == [False, True]  # one built; the other waited, then reused it
    assert outcomes[0][0] == outcomes[1][0] == assert_complete_cache(photos, 64, tmp_path / "cache")


def test_a_build_killed_midway_leaves_nothing_the_next_build_trips_on(photos, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    job = Jobs(1, photos, 64, cache_dir)
    temp = wait_for_temp_file(cache_dir, job.processes[0].is_alive)
    job.processes[0].kill()  # SIGKILL: no cleanup code runs
    job.processes[0].join()
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".u8")]  # killed before publishing
    assert os.stat(temp).st_blocks * 512 >= os.stat(temp).st_size  # reserved up front, not sparse
    assert_complete_cache(photos, 64, cache_dir)  # and the dead build's temporary file and lock are gone
    assert "left by an image cache build whose process is gone" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("cache_format", ["raw", "jpeg"])
def test_a_stop_signal_during_the_build_ends_the_run_at_once_leaving_no_file(photos, tiny_data, tmp_path, signum,
                                                                             cache_format):
    # To the whole process group, as Ctrl-C, torchrun and Slurm send it: the decode workers get it too.
    # The compressed cache's build leaves no part file either.
    cache_dir = tmp_path / "cache"
    flags = data_flags(tiny_data, str(tmp_path), train_dir=photos, image_size=64, num_workers=2,
                       cache_images=str(cache_dir), cache_format=cache_format)
    run = subprocess.Popen(train_cmd(*flags), cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_temp_file(cache_dir, lambda: run.poll() is None)
    signalled = time.monotonic()
    os.killpg(run.pid, signum)
    out, err = run.communicate(timeout=60)
    took = time.monotonic() - signalled
    assert run.returncode == 128 + signum, err
    assert took < 5, f"took {took:.1f} s to stop"  # about 1.5 s on an idle 2-core machine, 1 s of it the exit
    assert f"Stopped by signal {signum} while setting up" in out and "built in" not in out
    assert "Traceback" not in err and "error" not in err.lower()
    assert os.listdir(cache_dir) == []


@pytest.mark.parametrize("planted, target_exists", [("cache", True), ("lock", True), ("lock", False)])
def test_a_symbolic_link_planted_at_the_cache_or_its_lock_is_refused_and_its_target_untouched(
        tiny_data, tmp_path, planted, target_exists):
    dataset = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    link = describe_cache(dataset, 16, storage_size(16), str(cache_dir)).path + (".lock" if planted == "lock" else "")
    target = tmp_path / "precious"
    if target_exists:
        target.write_bytes(b"precious")
    os.symlink(target, link)
    with pytest.raises(DataError, match="is a symbolic link") as raised:
        build_or_open(dataset, 16, str(cache_dir), num_workers=0)
    assert link in str(raised.value) and "\n" not in str(raised.value)
    assert (target.read_bytes() == b"precious") if target_exists else not target.exists()
    assert os.listdir(cache_dir) == [os.path.basename(link)]


def test_a_file_rewritten_with_its_size_and_mtime_restored_gets_a_new_cache(tmp_path):
    # BMP files of one image size have one file size; an in-place rewrite keeps the inode, and
    # the restored mtime keeps the old key's every field but the inode change time.
    folder = write_image_folder(str(tmp_path / "bmp"), per_class=2)
    for png in sorted(str(path) for path in (tmp_path / "bmp").rglob("*.png")):
        Image.open(png).save(png[:-4] + ".bmp")
        os.remove(png)
    first = open_cache(folder, 16, tmp_path / "cache")[2]
    victim, other = f"{folder}/circle/000.bmp", f"{folder}/circle/001.bmp"
    before = os.stat(victim)
    with open(victim, "r+b") as file:
        file.write(open(other, "rb").read())
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(victim)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    dataset, images, second = open_cache(folder, 16, tmp_path / "cache")
    assert second != first
    index = dataset.samples.index((victim, 0))
    assert np.array_equal(images[index], images[dataset.samples.index((other, 0))])


@pytest.mark.parametrize("damage", ["truncated", "oversized", "zeroed header"])
def test_a_damaged_cache_is_one_line_naming_the_file_and_is_left_alone(tiny_data, tmp_path, damage):
    path = open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")[2]
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) - 1)
    else:
        with open(path, "ab" if damage == "oversized" else "r+b") as file:
            file.write(bytes(64))
    damaged = open(path, "rb").read()
    with pytest.raises(DataError) as raised:
        open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    message = str(raised.value)
    assert path in message and "delete it" in message and "\n" not in message
    assert open(path, "rb").read() == damaged


def test_a_cache_directory_under_a_file_is_one_error_line_through_the_cli(tiny_data, tmp_path):
    (tmp_path / "somefile").write_text("keep")
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), cache_images=f"{tmp_path}/somefile/sub")),
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"error: --cache_images {tmp_path}/somefile/sub: cannot make the image cache directory (a file is in the "
        "way); pass a directory you can write to"]
    assert (tmp_path / "somefile").read_text() == "keep"


def test_a_read_only_cache_directory_serves_a_built_cache_and_refuses_a_new_one_in_one_line(tiny_data, tmp_path):
    with pytest.raises(DataError, match="a file is in the way"):
        open_cache(tiny_data["val_dir"], 16, tmp_path / "data" / "val" / "circle" / "000.png")
    open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "cache"), str(read_only)]).returncode != 0:
        pytest.skip("a read-only bind mount needs root")
    try:
        assert open_cache(tiny_data["val_dir"], 16, read_only)[1] is not None  # reused: no lock needed
        with pytest.raises(DataError, match="Read-only file system") as raised:
            open_cache(tiny_data["val_dir"], 24, read_only)
        assert "\n" not in str(raised.value)
    finally:
        subprocess.run(["umount", str(read_only)])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_on_nodes(tiny_data, tmp_path, cache_dir, wrappers):
    """Simulated nodes on this machine (a torchrun agent each, one process per node, c10d
    rendezvous), node n started under the command prefix wrappers[n], all training with one
    --cache_images path; returns each node's output."""
    port = free_port()
    nodes = [subprocess.Popen(
        [*wrapper, sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(wrappers)}", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--node_rank={node}", "--max_restarts=0",
         os.path.join(REPO, "train_ddp.py"),
         *data_flags(tiny_data, f"{tmp_path}/node{node}", model="tiny_cnn", cache_images=cache_dir)],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node, wrapper in enumerate(wrappers)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0] * len(nodes), "\n---\n".join(outputs)
    assert "Done in" in "".join(outputs)
    return outputs


def decoding_lines(output):
    return [line for line in output.splitlines() if ": decoding " in line]


def test_nodes_sharing_a_cache_directory_decode_the_dataset_once_and_a_node_without_it_builds_its_own(
        tiny_data, tmp_path):
    # Nodes 0 and 1 share the cache directory; node 2 runs in its own mount namespace with a tmpfs
    # over it: a node-local directory. Whichever node gets rank 0, the two sharing nodes decode
    # each dataset (train and val) once between them, and node 2 once for its own copy.
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    node_local = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(cache_dir)]
    if subprocess.run([*node_local, "true"]).returncode != 0:
        pytest.skip("a private mount namespace needs root")
    outputs = train_on_nodes(tiny_data, tmp_path, str(cache_dir), [(), (), node_local])
    decoded = [len(decoding_lines(output)) for output in outputs]
    assert sum(decoded[:2]) == 2 and decoded[2] == 2, outputs
    assert "cannot see the copy" in "".join(outputs)
    assert len(os.listdir(cache_dir)) == 2  # the two caches; no temporary or lock file


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU: bench/gpu.sh)")
def test_gpu_batches_staged_on_a_side_stream_equal_crops_made_on_the_compute_stream(tiny_data, tmp_path):
    cuda = torch.device("cuda")
    dataset, images, _ = open_cache(tiny_data["train_dir"], 16, tmp_path / "cache", train=True)
    sampler = train_sampler(dataset, 4, rank=0, world_size=1, seed=0)
    sampler.set_epoch(3)
    loader = CachedBatches(images, dataset.targets, sampler, 4, True, 16, cuda, True, seed=0)
    on_cpu = CachedBatches(images, dataset.targets, sampler, 4, True, 16, torch.device("cpu"), True, seed=0)
    keys = list(iter(sampler))
    for batch, ((crops, labels, indices, _), cpu_batch) in enumerate(zip(loader, on_cpu, strict=True)):
        (pixels, boxes, flips), expected_labels, expected_indices = loader.read_batch(keys[4 * batch:4 * batch + 4])
        expected = crop_and_flip(pixels.to(cuda), boxes.to(cuda), flips.to(cuda), 16)
        assert crops.device.type == "cuda" and torch.equal(crops, expected)
        assert torch.equal(labels.cpu(), expected_labels) and torch.equal(indices, expected_indices)
        # float16 matrix products on the GPU against the CPU path's torchvision resize: within 2 of 255.
        assert (crops.cpu().int() - cpu_batch[0].int()).abs().max() <= 2
    val_set, val_images, _ = open_cache(tiny_data["val_dir"], 16, tmp_path / "cache")
    on_gpu, on_cpu = (CachedBatches(val_images, val_set.targets, list(range(len(val_set))), 3, False, 16, device,
                                    False) for device in (cuda, torch.device("cpu")))
    for (gpu_images, gpu_labels, _, _), (cpu_images, cpu_labels, _, _) in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(gpu_images.cpu(), cpu_images) and torch.equal(gpu_labels.cpu(), cpu_labels)


def test_a_cache_built_for_another_image_size_with_the_same_resize_size_is_not_reused(tmp_path):
    # 30 x 20 images at --resize_size 20: the stored 20 x 20 window starts at column 5 for crops of
    # 16 and at column 6 for crops of 15 (the offsets round separately), so each needs its own cache.
    folder = write_image_folder(str(tmp_path / "wide"), per_class=2, size=(30, 20))
    for image_size in (16, 15):
        dataset = AugmentedImageFolder(folder, image_size, train=False, resize_size=20)
        images, _, built = build_or_open(dataset, image_size, str(tmp_path / "cache"), 0, resize_size=20)
        assert built, f"the cache for --image_size {image_size} was not built"
        loader = CachedBatches(images, dataset.targets, list(range(len(dataset))), 3, False, image_size,
                               torch.device("cpu"), False)
        evaluated = torch.cat([batch[0] for batch in loader])
        for index in range(len(dataset)):
            assert torch.equal(evaluated[index], dataset[index][0]), f"image {index} at --image_size {image_size}"
    assert len(os.listdir(tmp_path / "cache")) == 2


@pytest.mark.slow
def test_a_stop_signal_reaching_the_main_process_twice_during_the_build_stops_it_cleanly(photos, tiny_data, tmp_path):
    # GNU timeout forwarding its signal, or Ctrl-C plus a forwarded SIGINT: the second one arrives
    # while the first is ending the run (its decode workers, its files, the interpreter's exit),
    # at a moment that depends on the gap between them.
    cache_dir = tmp_path / "cache"
    flags = data_flags(tiny_data, str(tmp_path), train_dir=photos, image_size=64, num_workers=2,
                       cache_images=str(cache_dir))
    for gap in (0, 0.01, 0.05, 0.1, 0.2, 0.4):
        run = subprocess.Popen(train_cmd(*flags), cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1",
                                                                      PYTHONPATH=REPO),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_for_temp_file(cache_dir, lambda: run.poll() is None)
        os.kill(run.pid, signal.SIGINT)
        time.sleep(gap)
        os.kill(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 128 + signal.SIGINT, f"gap {gap} s: exit {run.returncode}\n{err}"
        assert "Stopped by signal 2 while setting up" in out
        assert err == "", f"gap {gap} s:\n{err}"  # e.g. "Exception ignored in: ..._MultiProcessingDataLoaderIter"
        assert os.listdir(cache_dir) == [], f"gap {gap} s"
