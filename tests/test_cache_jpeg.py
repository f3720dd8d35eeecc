"""cache_jpeg.py: the compressed image cache against the raw one: the same images within the JPEG
error at a fraction of the bytes, the same training without augmentation, the same build by one
or two processes, damaged files refused in one line. (Exact mid-epoch starts, what a resume
needs, are tested for both formats in test_image_cache.py.)"""
import os
import re
import resource
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, data_flags, run_cli, torchrun, train_cmd

from config import parse_args
from core.errors import DataError
from dataset import AugmentedImageFolder
from fastload.cache_file import describe_cache, size_text, storage_size
from fastload.cache_jpeg import JpegImages, JpegSpec, assemble, describe_jpeg_cache, part_name
from fastload.image_cache import CachedBatches, build_cached_loaders, build_or_open

sys.path.insert(0, os.path.join(REPO, "bench"))
from input_pipeline import make_dataset  # noqa: E402  (the benchmark's photo-like JPEGs)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """24 photo-like JPEGs of 320 x 240 in 3 classes, and 6 for validation."""
    return make_dataset(str(tmp_path_factory.mktemp("photos")), 24, 6, classes=3, size=(320, 240))


def open_both(folder, image_size, cache_dir):
    dataset = AugmentedImageFolder(folder, image_size, train=False)
    raw = build_or_open(dataset, image_size, str(cache_dir), num_workers=0)[0]
    compressed, path, _ = build_or_open(dataset, image_size, str(cache_dir), num_workers=0, quality=90)
    return dataset, raw, compressed, path


def test_the_compressed_cache_holds_the_raw_caches_images_within_the_jpeg_error_in_a_tenth_of_the_bytes(
        photo_folder, tmp_path):
    dataset, raw, compressed, path = open_both(f"{photo_folder}/train", 224, tmp_path / "cache")
    assert isinstance(compressed, JpegImages) and path.endswith(".jpegs")
    assert compressed.shape == raw.shape == (24, storage_size(224), storage_size(224), 3)
    decoded = torch.from_numpy(np.stack([compressed.decode(index) for index in range(24)]))
    error = (decoded.float() - torch.from_numpy(np.array(raw)).float()).abs()
    assert error.mean() < 3 and error.mean() > 0  # a JPEG at quality 90: close, not the same bytes
    assert os.path.getsize(path) <= 0.15 * raw.nbytes


def test_compressed_batches_equal_raw_batches_made_from_the_same_decoded_pixels(photo_folder, tmp_path):
    dataset, raw, compressed, _ = open_both(f"{photo_folder}/train", 32, tmp_path / "cache")
    decoded = torch.from_numpy(np.stack([compressed.decode(index) for index in range(len(dataset))]))
    order = [(2, index) for index in (5, 0, 17, 3, 9, 12)]
    batches = [list(CachedBatches(images, dataset.targets, order, 3, True, 32, torch.device("cpu"),
                                  drop_last=False, seed=7))
               for images in (compressed, decoded.numpy())]
    for (crops, labels, indices, _), (same_crops, same_labels, same_indices, _) in zip(*batches):
        assert torch.equal(crops, same_crops) and torch.equal(labels, same_labels)
        assert torch.equal(indices, same_indices)


def test_training_on_the_compressed_cache_matches_the_raw_cache_without_augmentation(photo_folder, tmp_path):
    data = dict(train_dir=f"{photo_folder}/train", val_dir=f"{photo_folder}/val")
    common = dict(model="tiny_cnn", epochs=2, no_augmentation=True, image_size=32, cache_images=f"{tmp_path}/cache")
    run_cli(train_cmd(*data_flags(data, f"{tmp_path}/raw", cache_format="raw", **common)))
    result = run_cli(train_cmd(*data_flags(data, f"{tmp_path}/jpeg", cache_format="jpeg", **common)))
    assert ".jpegs: " in result.stdout and "built in" in result.stdout
    raw = torch.load(f"{tmp_path}/raw/checkpoints/checkpoint_latest.pth")
    jpeg = torch.load(f"{tmp_path}/jpeg/checkpoints/checkpoint_latest.pth")
    for key, value in raw["model_state_dict"].items():  # the same steps on images within the JPEG error
        assert torch.allclose(value.float(), jpeg["model_state_dict"][key].float(), atol=0.02, rtol=0.05), key
    for metric in ("train_loss", "val_loss"):
        assert jpeg["history"][metric] == pytest.approx(raw["history"][metric], rel=0.05)


def test_two_ranks_build_the_compressed_cache_with_the_same_images_as_one_process(photo_folder, tmp_path):
    data = dict(train_dir=f"{photo_folder}/train", val_dir=f"{photo_folder}/val")
    common = dict(model="tiny_cnn", image_size=32, cache_format="jpeg", limit_train_batches=1)
    run_cli(torchrun(2, *data_flags(data, f"{tmp_path}/two", cache_images=f"{tmp_path}/cache2", **common)))
    run_cli(train_cmd(*data_flags(data, f"{tmp_path}/one", cache_images=f"{tmp_path}/cache1", **common)))
    names = sorted(os.listdir(f"{tmp_path}/cache1"))  # the training images compressed, the evaluation split raw
    assert names == sorted(os.listdir(f"{tmp_path}/cache2"))
    assert [name.rsplit(".", 1)[1] for name in names] == ["jpegs", "u8"]
    dataset = AugmentedImageFolder(data["train_dir"], 32, train=False)  # other part layouts, the same JPEGs
    one, two = (build_or_open(dataset, 32, f"{tmp_path}/cache{n}", 0, quality=90)[0] for n in (1, 2))
    rows = np.arange(len(dataset))
    assert [bytes(b.numpy()) for b in one.blobs(rows)] == [bytes(b.numpy()) for b in two.blobs(rows)]
    assert np.array_equal(one.index[:, 1:], two.index[:, 1:])  # lengths and checksums (the offsets follow the layout)


@pytest.mark.parametrize("damage", ["truncated", "appended", "zeroed index"])
def test_a_damaged_compressed_cache_is_one_line_naming_the_file_and_is_left_alone(tiny_data, tmp_path, damage):
    dataset = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    path = build_or_open(dataset, 16, str(tmp_path), 0, quality=90)[1]
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) - 1)
    else:
        with open(path, "ab" if damage == "appended" else "r+b") as file:
            file.seek(0 if damage == "appended" else 4096)
            file.write(bytes(64))
    damaged = open(path, "rb").read()
    with pytest.raises(DataError) as raised:
        build_or_open(dataset, 16, str(tmp_path), 0, quality=90)
    message = str(raised.value)
    assert path in message and "delete it" in message and "\n" not in message
    assert open(path, "rb").read() == damaged


def test_auto_keeps_a_small_cache_raw_and_the_formats_have_their_own_files(tiny_data, tmp_path):
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="tiny_cnn", limit_train_batches=1,
                                           cache_images=f"{tmp_path}/cache")))
    assert "compressed" not in result.stdout
    assert sorted(name.rsplit(".", 1)[1] for name in os.listdir(f"{tmp_path}/cache")) == ["u8", "u8"]
    dataset = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    raw, jpeg = describe_cache(dataset, 16, 18, str(tmp_path)).path, describe_jpeg_cache(dataset, 16, 18,
                                                                                         str(tmp_path), 90).path
    assert raw != jpeg and describe_jpeg_cache(dataset, 16, 18, str(tmp_path), 80).path != jpeg


def test_cache_quality_out_of_range_is_refused_in_one_line(tiny_data, tmp_path):
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), cache_images=f"{tmp_path}/c",
                                           cache_quality=0)), check=False)
    assert result.returncode == 2 and "--cache_quality must be in [1, 100], got 0" in result.stderr
    assert not os.path.exists(f"{tmp_path}/c")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU: bench/gpu.sh)")
def test_gpu_batches_decode_the_compressed_cache_with_nvjpeg_like_the_cpu_readers(photo_folder, tmp_path):
    dataset = AugmentedImageFolder(f"{photo_folder}/val", 32, train=False)
    images = build_or_open(dataset, 32, str(tmp_path), num_workers=0, quality=90)[0]
    rows = torch.arange(len(dataset))
    on_cpu = torch.from_numpy(np.stack([images.decode(index) for index in range(len(dataset))]))
    on_gpu = images.decode_on(rows, torch.device("cuda"))
    assert on_gpu.shape == on_cpu.shape and on_gpu.is_contiguous()
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().float().mean() < 1  # two IDCTs: within rounding
    batches = [list(CachedBatches(images, dataset.targets, list(range(len(dataset))), 3, False, 32, torch.device(d),
                                  False)) for d in ("cuda", "cpu")]
    for (gpu_images, gpu_labels, _, _), (cpu_images, cpu_labels, _, _) in zip(*batches, strict=True):
        assert gpu_images.device.type == "cuda" and torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (gpu_images.cpu().int() - cpu_images.int()).abs().float().mean() < 1


# A failing disk, a damaged file, the evaluation split.

def file_size_limit(nbytes):
    def limit():  # a real write failure: no file may grow past nbytes (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_a_write_failure_while_encoding_is_one_error_line_and_leaves_no_file(photo_folder, tmp_path):
    data = dict(train_dir=f"{photo_folder}/train", val_dir=f"{photo_folder}/val")
    cache_dir = tmp_path / "cache"
    flags = data_flags(data, str(tmp_path), model="tiny_cnn", image_size=64, cache_images=str(cache_dir),
                       cache_format="jpeg")
    result = subprocess.run(train_cmd(*flags), cwd=REPO, capture_output=True, text=True, timeout=120,
                            preexec_fn=file_size_limit(40 * 1024), env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the image cache"), result.stderr
    assert "File too large" in lines[0] and "--cache_images" in lines[0]
    assert os.listdir(cache_dir) == []


def stored_jpeg(images, row):
    """(offset, length) of image `row`'s JPEG in the cache file."""
    return (int(value) for value in images.index[row][:2])


@pytest.mark.parametrize("where", ["marker", "middle"])  # "Not a JPEG file"; a block decoded silently wrong
def test_a_damaged_jpeg_in_a_built_cache_stops_training_in_one_line_naming_the_cache(photo_folder, tmp_path, where):
    data = dict(train_dir=f"{photo_folder}/train", val_dir=f"{photo_folder}/val")
    common = dict(model="tiny_cnn", image_size=32, cache_images=f"{tmp_path}/cache", cache_format="jpeg")
    run_cli(train_cmd(*data_flags(data, f"{tmp_path}/first", **common)))
    dataset = AugmentedImageFolder(data["train_dir"], 32, train=False)
    images, path, built = build_or_open(dataset, 32, f"{tmp_path}/cache", 0, quality=90)
    assert not built
    offset, length = stored_jpeg(images, 5)
    with open(path, "r+b") as file:  # 4 zero bytes inside one stored JPEG: the file's size and index still fit
        file.seek(offset + (0 if where == "marker" else length // 2))
        file.write(bytes(4))
    result = run_cli(train_cmd(*data_flags(data, f"{tmp_path}/second", **common)), check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error") == 1
    assert (f"error: the image cache {path} is damaged (image 5 fails its checksum); delete it and run again\n"
            in result.stderr)  # beside the epoch's progress bar, also on stderr


def test_evaluation_from_a_compressed_cache_equals_evaluation_from_the_files_pixel_for_pixel(photo_folder, tmp_path):
    # Training images are stored as JPEGs; the evaluation split keeps its decoded pixels, so the
    # validation score (and the checkpoint it selects) is the file path's.
    args = parse_args(["--cache_images", str(tmp_path / "cache"), "--cache_format", "jpeg", "--image_size", "32",
                       "--num_workers", "0", "--batch_size", "4", "--seed", "0", "--checkpoint_dir", str(tmp_path),
                       "--log_dir", str(tmp_path)])
    args.resize_size = None  # the cache's default storage size
    ctx = SimpleNamespace(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    train_set = AugmentedImageFolder(f"{photo_folder}/train", 32, train=True)
    val_set = AugmentedImageFolder(f"{photo_folder}/val", 32, train=False)
    train_loader, val_loader = build_cached_loaders(train_set, val_set, args, ctx)
    assert isinstance(train_loader.images, JpegImages)
    evaluated = torch.cat([images for images, _, _, _ in val_loader])
    assert len(evaluated) == len(val_set)
    for index in range(len(val_set)):
        assert torch.equal(evaluated[index], val_set[index][0]), f"validation image {index} differs from its file"


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory):
    """90 noisy images (JPEGs of noise stay large): a compressed cache of several hundred KiB at 64 px."""
    from conftest import write_image_folder
    return write_image_folder(str(tmp_path_factory.mktemp("noisy") / "train"), per_class=30, size=(96, 80))


def small_tmpfs(path, nbytes):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    return path


def test_a_compressed_cache_that_fits_once_but_not_twice_is_built(noisy_folder, tmp_path):
    dataset = AugmentedImageFolder(noisy_folder, 64, train=False)
    size = os.path.getsize(build_or_open(dataset, 64, str(tmp_path / "elsewhere"), 0, quality=90)[1])
    small = small_tmpfs(tmp_path / "small", (int(1.4 * size) // 4096 + 1) * 4096)
    try:
        images, path, built = build_or_open(dataset, 64, str(small), 0, quality=90)
        assert built and os.path.getsize(path) == size and os.listdir(small) == [os.path.basename(path)]
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # an open memmap would keep it busy


def test_a_compressed_cache_too_large_for_its_disk_is_refused_with_its_real_size_and_leaves_nothing(
        noisy_folder, tmp_path):
    dataset = AugmentedImageFolder(noisy_folder, 64, train=False)
    size = os.path.getsize(build_or_open(dataset, 64, str(tmp_path / "elsewhere"), 0, quality=90)[1])
    small = small_tmpfs(tmp_path / "small", (size // 2 // 4096) * 4096)
    try:
        with pytest.raises(DataError) as raised:
            build_or_open(dataset, 64, str(small), 0, quality=90)
        message = str(raised.value)
        figure = re.search(r"needs (?:about )?([\d.]+) KiB", message)
        assert figure and 0.7 * size <= float(figure[1]) * 1024 <= 1.5 * size, message
        assert f"{small} has" in message and "--cache_images" in message and "\n" not in message
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # an open memmap would keep it busy


def test_an_assembly_that_runs_out_of_space_says_the_caches_real_size_and_removes_what_it_wrote(tmp_path):
    # A node of two processes whose space estimate was short: local rank 0's images are in the
    # temporary file, local rank 1's part does not fit beside them once copied.
    small = small_tmpfs(tmp_path / "small", 256 * 1024)
    try:
        spec = JpegSpec(str(small / "images.jpegs"), bytes(32), count=4, side=8, quality=90)
        temp, lengths = spec.path + ".tmp", [np.array([40_000, 40_000], dtype=np.uint64),
                                             np.array([60_000, 60_000], dtype=np.uint64)]
        with open(temp, "wb") as file:
            file.write(bytes(spec.nbytes + 80_000))
        with open(part_name(temp, 1), "wb") as file:
            file.write(bytes(120_000))
        fd = os.open(temp, os.O_RDWR)
        with pytest.raises(DataError) as raised:
            assemble(fd, spec, [(temp, lengths[0], lengths[0]), (part_name(temp, 1), lengths[1], lengths[1])])
        assert str(raised.value).startswith(f"the image cache needs {size_text(spec.nbytes + 200_000)} but {small} "
                                            "has 25")  # the 256 KiB, less what the tmpfs keeps for itself
        assert os.listdir(small) == ["images.jpegs.tmp"] and os.fstat(fd).st_size == 0  # NodeLeader removes it
        os.close(fd)
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # an open memmap would keep it busy
