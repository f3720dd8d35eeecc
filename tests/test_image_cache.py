"""image_cache.py: the decoded-image cache against the plain file path."""
import os
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import assert_same_weights, data_flags, load_weights, run_cli, torchrun, train_cmd, write_image_folder
from dataset import AugmentedImageFolder, EpochTaggedSampler, random_resized_crop_box
from image_cache import CachedBatches, build_or_open, crop_and_flip, storage_size

NO_BARRIER = lambda: None  # noqa: E731  one process


def open_cache(folder, image_size, cache_dir, train=False):
    dataset = AugmentedImageFolder(folder, image_size, train=train)
    images, path, _ = build_or_open(dataset, image_size, str(cache_dir), num_workers=0, barrier=NO_BARRIER)
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
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, seed=dataset.seed)
    sampler.set_epoch(3)
    loader = CachedBatches(images, dataset.targets, sampler, batch_size=4, train=True, image_size=size,
                           device=torch.device("cpu"), drop_last=True, seed=dataset.seed)
    for crops, labels, indices, _ in loader:
        for crop, label, index in zip(crops, labels.tolist(), indices.tolist()):
            from_file, file_label, _ = dataset[(3, index)]
            assert label == file_label
            difference = (crop.float() - from_file.float()).abs().mean().item()
            assert difference < 6, f"sample {index}: mean difference {difference:.1f} of 255"


def test_the_batched_crop_equals_torchvisions_antialiased_resized_crop_per_sample():
    # The GPU path's crop (two matrix products, here in float32 on the CPU) against the CPU path's
    # per-sample TF.resized_crop: shrinking, enlarging, extreme aspect ratios, the whole image, flips.
    import random
    from torchvision.transforms import functional as TF
    stored, size = 64, 48
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, stored, stored, 3), dtype=torch.uint8, generator=generator)
    pixels[4:] = torch.linspace(0, 255, stored).to(torch.uint8).view(1, stored, 1, 1)  # smooth gradients
    rng = random.Random(0)
    boxes = [random_resized_crop_box(stored, stored, (0.08, 1.0), rng) for _ in range(5)]
    boxes += [(0, 0, stored, stored), (3, 0, 10, stored), (0, 40, stored, 9)]
    flips = torch.tensor([True, False] * 4)
    crops = crop_and_flip(pixels, torch.tensor(boxes), flips, size)
    assert crops.shape == (8, 3, size, size) and crops.dtype == torch.uint8
    for image, (left, top, width, height), flip, crop in zip(pixels, boxes, flips, crops):
        expected = TF.resized_crop(image.permute(2, 0, 1), top, left, height, width, [size, size], antialias=True)
        expected = expected.flip(-1) if flip else expected
        assert (crop.int() - expected.int()).abs().max() <= 1  # rounding of exact halves


def test_the_cpu_readers_crops_equal_the_batched_crop_a_gpu_makes(tiny_data, tmp_path):
    dataset, images, _ = open_cache(tiny_data["train_dir"], 16, tmp_path / "cache", train=True)
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(5)
    loader = CachedBatches(images, dataset.targets, sampler, 4, True, 16, torch.device("cpu"), True, seed=0)
    keys = list(iter(sampler))
    for batch, (crops, _, indices, _) in enumerate(loader):
        boxes, flips = loader.draw_crops([key[0] for key in keys[4 * batch:4 * batch + 4]], indices)
        expected = crop_and_flip(torch.from_numpy(np.array(images[indices.numpy()])), boxes, flips, 16)
        assert (crops.int() - expected.int()).abs().max() <= 1


def test_crop_boxes_are_drawn_exactly_as_on_the_file_path():
    import random
    from dataset import sample_seed
    for index in range(50):
        a = random_resized_crop_box(73, 73, (0.08, 1.0), random.Random(sample_seed(1, 2, index)))
        b = random_resized_crop_box(73, 73, (0.08, 1.0), random.Random(sample_seed(1, 2, index)))
        assert a == b and 0 <= a[0] and a[0] + a[2] <= 73 and 0 <= a[1] and a[1] + a[3] <= 73


def test_mid_epoch_start_yields_exactly_the_rest_of_the_epoch(tiny_data, tmp_path):
    dataset, images, _ = open_cache(tiny_data["train_dir"], 16, tmp_path / "cache", train=True)
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, seed=0)
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
    assert not [n for n in os.listdir(f"{tmp_path}/cache2") if "building" in n]


def test_a_cache_that_does_not_fit_on_disk_is_refused_clearly(tiny_data, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    try:
        result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), image_size=128,
                                               cache_images=str(small))), check=False)
        assert result.returncode == 2
        assert "error: the image cache needs" in result.stderr and f"{small} has 0.00 GiB free" in result.stderr
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU: bench/gpu.sh)")
def test_gpu_batches_staged_on_a_side_stream_equal_crops_made_on_the_compute_stream(tiny_data, tmp_path):
    cuda = torch.device("cuda")
    dataset, images, _ = open_cache(tiny_data["train_dir"], 16, tmp_path / "cache", train=True)
    sampler = EpochTaggedSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(3)
    loader = CachedBatches(images, dataset.targets, sampler, 4, True, 16, cuda, True, seed=0)
    on_cpu = CachedBatches(images, dataset.targets, sampler, 4, True, 16, torch.device("cpu"), True, seed=0)
    keys = list(iter(sampler))
    for batch, ((crops, labels, indices, _), cpu_batch) in enumerate(zip(loader, on_cpu, strict=True)):
        pixels, expected_labels, expected_indices, boxes, flips = loader.read_batch(keys[4 * batch:4 * batch + 4])
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
