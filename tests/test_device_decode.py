"""device_decode.py (--decode_on_device): the image files decoded in batches on the training
device, against the plain file path: the same samples, boxes and flips, pixels within the
resampling difference, the same order for an exact resume, broken files named."""
import os
import sys

import pytest
import torch

from conftest import REPO, data_flags, run_cli, train_cmd
from dataset import AugmentedImageFolder, train_sampler
from device_decode import DeviceDecodedFiles
from errors import DataError

sys.path.insert(0, os.path.join(REPO, "bench"))
from input_pipeline import make_dataset  # noqa: E402  (the benchmark's photo-like JPEGs)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 photo-like JPEGs of 320 x 240 in 3 classes, 6 for validation, and a PNG among them."""
    root = make_dataset(str(tmp_path_factory.mktemp("photos")), 24, 6, classes=3, size=(320, 240))
    from PIL import Image
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
