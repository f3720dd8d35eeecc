"""cache_jpeg.py: the compressed image cache against the raw one: the same images within the JPEG
error at a fraction of the bytes, the same training without augmentation, the same build by one
or two processes, damaged files refused in one line. (Exact mid-epoch starts, what a resume
needs, are tested for both formats in test_image_cache.py.)"""
import os
import sys

import numpy as np
import pytest
import torch

from cache_file import describe_cache, storage_size
from cache_jpeg import JpegImages
from conftest import REPO, data_flags, run_cli, torchrun, train_cmd
from dataset import AugmentedImageFolder
from errors import DataError
from image_cache import CachedBatches, build_or_open

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
    names = sorted(os.listdir(f"{tmp_path}/cache1"))
    assert names == sorted(os.listdir(f"{tmp_path}/cache2")) and all(n.endswith(".jpegs") for n in names)
    for folder in ("train", "val"):  # other part layouts, the same JPEG of every image
        dataset = AugmentedImageFolder(data[f"{folder}_dir"], 32, train=False)
        one, two = (build_or_open(dataset, 32, f"{tmp_path}/cache{n}", 0, quality=90)[0] for n in (1, 2))
        rows = np.arange(len(dataset))
        assert [bytes(b.numpy()) for b in one.blobs(rows)] == [bytes(b.numpy()) for b in two.blobs(rows)]


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
    raw, jpeg = (describe_cache(dataset, 18, str(tmp_path), quality).path for quality in (None, 90))
    assert raw != jpeg and describe_cache(dataset, 18, str(tmp_path), 80).path != jpeg


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
