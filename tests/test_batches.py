"""engine/batches.py and fastload/readahead.py: normalisation and the device-side crop are written
once. Every input path's batches reach the model through the one BatchStage, and the cache and
device-decode loaders crop through the one crop_on_device."""
import os

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from dataset import IMAGENET_MEAN, IMAGENET_STD, AugmentedImageFolder, build_loaders
from engine.batches import BatchStage
from fastload.device_decode import DeviceDecodedFiles
from fastload.image_cache import CachedBatches, build_or_open
from fastload.readahead import crop_on_device
from inputs.augment import draw_crops

CPU = torch.device("cpu")


@pytest.fixture
def exact_sizes(tmp_path):
    """PNGs (lossless) whose shorter side is already --resize_size 20, landscape and portrait: every
    path then evaluates the same pixels (no resampler of its own), so only the stage could differ."""
    rng = np.random.RandomState(0)
    for label in ("a", "b", "c"):
        os.makedirs(tmp_path / "val" / label)
        for name, (height, width) in (("wide", (20, 27)), ("tall", (25, 20))):
            pixels = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / label / f"{name}.png")
    return str(tmp_path / "val")


def evaluation_batches(val_set, cache_dir):
    """The same evaluation batches by the three input paths: files (DataLoader), the raw image
    cache (--cache_images), the files decoded by the device's loader (--decode_on_device)."""
    everything = list(range(len(val_set)))
    _, files = build_loaders(val_set, val_set, batch_size=4, num_workers=0, rank=0, world_size=1, seed=0,
                             pin_memory=False)
    images, _, _ = build_or_open(val_set, 16, cache_dir, num_workers=0, resize_size=20)
    cached = CachedBatches(images, val_set.targets, everything, 4, False, 16, CPU, drop_last=False)
    decoded = DeviceDecodedFiles(val_set, everything, 4, False, CPU)
    return {"files": list(files), "cache": list(cached), "decode_on_device": list(decoded)}


def test_every_input_path_gives_the_same_model_input_through_the_one_stage(exact_sizes, tmp_path):
    val_set = AugmentedImageFolder(exact_sizes, 16, train=False, resize_size=20)
    stage = BatchStage(CPU, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.channels_last)
    model_inputs = {}
    for path, batches in evaluation_batches(val_set, str(tmp_path / "cache")).items():
        assert all(images.dtype == torch.uint8 for images, _, _, _ in batches), path  # normalised by the stage only
        staged = [stage.eval_batch(images, labels) for images, labels, _, _ in batches]
        model_inputs[path] = (torch.cat([images for images, _ in staged]), torch.cat([labels for _, labels in staged]))
    files_images, files_labels = model_inputs.pop("files")
    assert files_images.shape == (6, 3, 16, 16) and files_images.dtype == torch.float32
    assert files_images.is_contiguous(memory_format=torch.channels_last)
    for path, (images, labels) in model_inputs.items():
        assert torch.equal(images, files_images), path
        assert torch.equal(labels, files_labels), path


def test_the_stage_normalises_with_the_runs_mean_and_std_in_the_models_memory_format():
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    labels = torch.tensor([1, 0])
    stage = BatchStage(CPU, IMAGENET_MEAN, IMAGENET_STD, torch.channels_last)
    for prepare in (stage.eval_batch, stage.train_batch):
        model_input, staged_labels = prepare(images, labels)[:2]
        expected = (images / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
            1, 3, 1, 1)
        torch.testing.assert_close(model_input, expected, rtol=0, atol=1e-5)
        assert model_input.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(staged_labels, labels)


def test_the_cache_and_decoded_files_forms_of_the_device_crop_agree():
    # The cache's stored frames (one NHWC tensor, cropped as a batch) and the same frames as decoded
    # files (a list of CHW images, cropped one by one): the same center crops, and the same boxes and
    # flips within the two antialiased bilinear resamplers' rounding.
    frames = torch.from_numpy(np.random.RandomState(1).randint(0, 256, (6, 24, 24, 3), dtype=np.uint8))
    decoded = list(frames.permute(0, 3, 1, 2))
    assert torch.equal(crop_on_device(frames, None, None, 16), crop_on_device(decoded, None, None, 16))
    boxes, flips = draw_crops(0, [1] * 6, np.arange(6), 24, 24, (0.08, 1.0), 0.5)
    batched = crop_on_device(frames, torch.from_numpy(boxes), torch.from_numpy(flips), 16)
    one_by_one = crop_on_device(decoded, boxes, flips, 16)
    assert batched.shape == one_by_one.shape == (6, 3, 16, 16) and flips.any() and not flips.all()
    assert (batched.int() - one_by_one.int()).abs().max() <= 1


def test_normalisation_and_the_device_crop_are_written_in_one_place():
    def source(name):
        with open(os.path.join(REPO, name)) as file:
            return file.read()
    for name in ("train_ddp.py", "engine/metrics.py", "engine/training.py", "fastload/image_cache.py",
                 "fastload/device_decode.py"):
        assert "normalize(" not in source(name), name
    for name in ("fastload/image_cache.py", "fastload/device_decode.py"):
        for crop in ("center_crop(", "crop_and_flip(", "TF.resized_crop("):
            assert crop not in source(name), (name, crop)
    assert not issubclass(DeviceDecodedFiles, CachedBatches)
