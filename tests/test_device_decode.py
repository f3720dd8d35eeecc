"""device_decode.py (--decode_on_device): the image files decoded in batches on the training
device, against the plain file path: the same samples, boxes and flips, pixels within the
resampling difference, the same order for an exact resume, broken files named."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, data_flags, run_cli, train_cmd, write_image_folder
from PIL import Image

from core.errors import DataError
from dataset import AugmentedImageFolder, train_sampler
from fastload.device_decode import DeviceDecodedFiles

sys.path.insert(0, os.path.join(REPO, "bench"))
from input_pipeline import make_dataset  # noqa: E402  (the benchmark's photo-like JPEGs)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 photo-like JPEGs of 320 x 240 in 3 classes, 6 for validation, and a PNG among them."""
    root = make_dataset(str(tmp_path_factory.mktemp("photos")), 24, 6, classes=3, size=(320, 240))
    Image.open(f"{root}/train/class_00/000000.jpg").save(f"{root}/train/class_00/000000b.png")
    return root


def test_training_batches_are_the_file_paths_crops_and_flips_within_the_resampling_difference(photos):
    dataset = AugmentedImageFolder(f"{photos}/train", 32, train=True, seed=5)
    sampler = train_sampler(dataset, 5, rank=0, world_size=1, seed=5)
    sampler.set_epoch(2)
    loader = DeviceDecodedFiles(dataset, sampler, 5, True, torch.device("cpu"))
    seen = []
    for images, labels, indices, skipped in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and skipped == 0
        for image, label, index in zip(images, labels.tolist(), indices.tolist()):
            from_file, file_label, _ = dataset[(2, index)]  # PIL: reduced-scale JPEG decode, then resize
            assert label == file_label
            difference = (image.float() - from_file.float()).abs().mean().item()
            assert difference < 8, f"sample {index}: mean difference {difference:.1f} of 255"
        seen += indices.tolist()
    assert sorted(seen) == list(range(len(dataset)))  # the PNG too, decoded on the CPU


def test_evaluation_equals_the_file_paths_resize_and_center_crop(photos):
    dataset = AugmentedImageFolder(f"{photos}/val", 32, train=False, resize_size=40)
    loader = DeviceDecodedFiles(dataset, list(range(len(dataset))), 4, False, torch.device("cpu"))
    images = torch.cat([batch[0] for batch in loader])
    for index in range(len(dataset)):
        difference = (images[index].float() - dataset[index][0].float()).abs().mean().item()
        assert difference < 3, f"image {index}: mean difference {difference:.1f} of 255"


def test_a_mid_epoch_start_yields_exactly_the_rest_of_the_epoch(photos):
    dataset = AugmentedImageFolder(f"{photos}/train", 32, train=True)
    sampler = train_sampler(dataset, 5, rank=0, world_size=1, seed=0)
    loader = DeviceDecodedFiles(dataset, sampler, 5, True, torch.device("cpu"))
    sampler.set_epoch(3)
    whole = list(loader)
    sampler.set_epoch(3, start=10)
    rest = list(loader)
    for full, resumed in zip(whole[2:], rest, strict=True):
        assert torch.equal(full[0], resumed[0]) and torch.equal(full[2], resumed[2])


def test_training_through_the_cli_learns_and_a_broken_jpeg_is_named(photos, tmp_path):
    data = dict(train_dir=f"{photos}/train", val_dir=f"{photos}/val")
    result = run_cli(train_cmd(*data_flags(data, str(tmp_path), model="tiny_cnn", image_size=32, epochs=2,
                                           decode_on_device=True)))
    history = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")["history"]
    assert len(history["train_loss"]) == 2 and "Epoch 2/2" in result.stdout
    broken = f"{tmp_path}/broken"
    os.makedirs(f"{broken}/class_00")
    with open(f"{photos}/train/class_00/000000.jpg", "rb") as source, \
            open(f"{broken}/class_00/bad.jpg", "wb") as target:
        target.write(source.read()[:300])  # a JPEG cut short
    dataset = AugmentedImageFolder(broken, 32, train=False)
    with pytest.raises(DataError, match=f"cannot read image {broken}/class_00/bad.jpg"):
        list(DeviceDecodedFiles(dataset, [0], 1, False, torch.device("cpu")))


def test_decode_on_device_with_a_cache_is_refused_in_one_line(tiny_data, tmp_path):
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), decode_on_device=True,
                                           cache_images=f"{tmp_path}/cache")), check=False)
    assert result.returncode == 2 and "cannot be combined with --cache_images" in result.stderr
    assert not os.path.exists(f"{tmp_path}/cache")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU: bench/gpu.sh)")
def test_gpu_batches_decoded_by_nvjpeg_equal_the_cpu_readers_within_rounding(photos):
    dataset = AugmentedImageFolder(f"{photos}/train", 32, train=True)
    sampler = train_sampler(dataset, 5, rank=0, world_size=1, seed=0)
    sampler.set_epoch(1)
    batches = [list(DeviceDecodedFiles(dataset, sampler, 5, True, torch.device(d))) for d in ("cuda", "cpu")]
    for (gpu_images, gpu_labels, gpu_indices, _), (cpu_images, cpu_labels, cpu_indices, _) in zip(*batches,
                                                                                                   strict=True):
        assert gpu_images.device.type == "cuda" and torch.equal(gpu_indices, cpu_indices)
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (gpu_images.cpu().float() - cpu_images.float()).abs().mean() < 2  # two IDCTs and resamplers


def test_png_only_data_trains_and_evaluates(tiny_data, tmp_path):
    # No batch holds a JPEG: the device's JPEG decoder is not called with an empty list.
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="tiny_cnn", decode_on_device=True)))
    history = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")["history"]
    assert len(history["train_loss"]) == 1 and len(history["val_acc"]) == 1 and "Epoch 1/1" in result.stdout


def save_noise(path, width, height, seed):
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


# In a subprocess: the growth of peak memory while the device loader evaluates the folder argv[1] at
# 224 px, the batches' shape, and each image's largest difference from the file path's evaluation.
# The address space is capped 2 GB above what the imports took, so that a whole-image resize fails
# here instead of taking 10 GB of the machine running the tests.
EVALUATE_IN_BOUNDED_MEMORY = """
import json, os, resource, sys, torch
from dataset import AugmentedImageFolder
from fastload.device_decode import DeviceDecodedFiles
dataset = AugmentedImageFolder(sys.argv[1], 224, train=False)
size_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1])
limit = (size_kb + 2 * 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loader = DeviceDecodedFiles(dataset, list(range(len(dataset))), 2, False, torch.device("cpu"))
images = torch.cat([batch[0] for batch in loader])
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
differences = {os.path.basename(path): (image.int() - dataset[index][0].int()).abs().max().item()
               for index, (image, (path, _)) in enumerate(zip(images, dataset.samples))}
print(json.dumps(dict(grown_mb=grown_mb, shape=list(images.shape), differences=differences)))
"""


def test_a_thin_image_is_evaluated_from_its_centre_in_bounded_memory_with_the_file_paths_pixels(tmp_path):
    # A 1 x 6000 px PNG resized whole to a shorter side of 256 is 256 x 1,536,000 px (+10 GB while
    # resizing); the file path resizes only the central band that the center crop keeps.
    folder = tmp_path / "val" / "class_00"
    folder.mkdir(parents=True)
    save_noise(folder / "tall.png", 1, 6000, seed=0)
    save_noise(folder / "wide.png", 6000, 1, seed=1)
    save_noise(folder / "strip.png", 900, 7, seed=2)
    save_noise(folder / "photo.png", 300, 200, seed=3)  # below the band aspect: resized whole, by torch
    result = run_cli([sys.executable, "-c", EVALUATE_IN_BOUNDED_MEMORY, str(tmp_path / "val")], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout)
    assert measured["shape"] == [4, 3, 224, 224]
    # The thin ones: the same decoded pixels, band and resize as the file path; the photo: torch's
    # resize against PIL's, which round differently.
    differences = measured["differences"]
    assert [differences.pop(name) for name in ("tall.png", "wide.png", "strip.png")] == [0, 0, 0]
    assert differences["photo.png"] <= 1
    assert measured["grown_mb"] < 200, f"peak memory grew by {measured['grown_mb']} MB"


@pytest.fixture
def other_formats(tmp_path):
    """BMP, TIFF (RGB and grayscale), PPM and PGM images in each of 3 classes, for train and val:
    formats the file path reads through PIL and torchvision's decode_image does not."""
    root = tmp_path / "formats"
    for split, seed in (("train", 0), ("val", 1)):
        write_image_folder(str(root / split), per_class=1, size=(40, 30), seed=seed)
        for png in sorted((root / split).glob("*/*.png")):
            image = Image.open(png)
            image.save(png.with_suffix(".bmp"))
            image.save(png.with_suffix(".tif"))
            image.convert("L").save(png.with_name("gray.tiff"))
            image.save(png.with_suffix(".ppm"))
            image.convert("L").save(png.with_suffix(".pgm"))
            png.unlink()
    return root


def test_bmp_tiff_and_ppm_images_decode_as_on_the_file_path(other_formats):
    train = AugmentedImageFolder(f"{other_formats}/train", 16, train=True, seed=3)
    assert {os.path.splitext(path)[1] for path, _ in train.samples} == {".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
    sampler = train_sampler(train, 4, rank=0, world_size=1, seed=3)
    sampler.set_epoch(1)
    for images, labels, indices, _ in DeviceDecodedFiles(train, sampler, 4, True, torch.device("cpu")):
        for image, index in zip(images, indices.tolist()):
            from_file = train[(1, index)][0]  # the same box and flip, resized by PIL
            assert (image.float() - from_file.float()).abs().mean() < 1, train.samples[index][0]
    val = AugmentedImageFolder(f"{other_formats}/val", 16, train=False)
    images = torch.cat([batch[0] for batch in DeviceDecodedFiles(val, list(range(len(val))), 4, False,
                                                                 torch.device("cpu"))])
    for index, image in enumerate(images):
        assert (image.float() - val[index][0].float()).abs().mean() < 1, val.samples[index][0]


def test_bmp_tiff_and_ppm_images_train_and_evaluate_through_the_cli(other_formats, tmp_path):
    data = dict(train_dir=f"{other_formats}/train", val_dir=f"{other_formats}/val")
    run_cli(train_cmd(*data_flags(data, str(tmp_path), model="tiny_cnn", decode_on_device=True)))
    history = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")["history"]
    assert len(history["train_loss"]) == 1 and len(history["val_acc"]) == 1


def test_a_corrupt_file_of_a_format_torchvision_lacks_is_named_in_one_line(other_formats, tmp_path):
    bad = other_formats / "train" / "circle" / "bad.bmp"
    bad.write_bytes(b"BM" + bytes(100))  # a BMP header's magic, and nothing valid after it
    data = dict(train_dir=f"{other_formats}/train", val_dir=f"{other_formats}/val")
    result = run_cli(train_cmd(*data_flags(data, str(tmp_path), model="tiny_cnn", decode_on_device=True)),
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the epoch's progress bar
    assert f"error: cannot read image {bad} (" in last and last.endswith("); fix or remove it")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU: bench/gpu.sh)")
def test_gpu_evaluation_of_thin_and_host_decoded_images_equals_the_cpu_readers(other_formats):
    folder = other_formats / "val" / "circle"
    save_noise(folder / "tall.png", 1, 6000, seed=0)
    save_noise(folder / "strip.png", 900, 7, seed=2)
    dataset = AugmentedImageFolder(f"{other_formats}/val", 32, train=False)
    gpu, cpu = (torch.cat([batch[0].cpu() for batch in DeviceDecodedFiles(dataset, list(range(len(dataset))), 4,
                                                                          False, torch.device(device))])
                for device in ("cuda", "cpu"))
    assert (gpu.int() - cpu.int()).abs().max() <= 1  # the same pixels; torch's resize on two devices
