"""dataset.py: per-sample deterministic augmentation, loaders, folder checks, the demo."""
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, run_cli
from PIL import Image, ImageDraw
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, PILToTensor, Resize
from torchvision.transforms import functional as TF

from config import parse_args
from dataset import (
    BAND_ASPECT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentedImageFolder,
    DataError,
    build_datasets,
    build_loaders,
    eval_resize_size,
    load_eval,
    normalize,
    open_resized,
    open_rgb,
    planar,
    resized_crop,
)
from inputs.augment import draw_crop


def data_args(data, **overrides):
    """The real parsed flags (train_ddp.py's defaults) for the tiny dataset."""
    args = parse_args(["--train_dir", data["train_dir"], "--val_dir", data["val_dir"], "--image_size", "16",
                       "--seed", "0"])
    if "image_size" in overrides:  # the shorthand sets both crops, as on the command line
        overrides.setdefault("train_crop_size", overrides["image_size"])
    vars(args).update(overrides)
    return args


def collect(loader):
    """Every batch as (images, labels, dataset indices); no image of the test data is unreadable."""
    batches = []
    for images, labels, indices, skipped in loader:
        assert skipped == 0
        batches.append((images.clone(), labels.clone(), indices.clone()))
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second):
        for a, b in zip(batch_a, batch_b):
            assert torch.equal(a, b)


def as_multiset(images, labels, indices):
    """A batch as a sorted list of (index, label, pixel bytes): order-free, exact comparison."""
    return sorted((int(i), int(label), image.numpy().tobytes()) for image, label, i in zip(images, labels, indices))


# ------------------------------------------------------------------ training / eval items

def test_train_items_are_a_function_of_epoch_and_index(tiny_data):
    a = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=3)
    b = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=3)
    for index in (0, 5, 23):
        image, label, item_index = a[(2, index)]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        assert label == a.samples[index][1] and item_index == index
        assert torch.equal(image, b[(2, index)][0])
        assert torch.equal(image, a[(2, index)][0])  # asking twice changes nothing
    changed = sum(not torch.equal(a[(2, i)][0], a[(3, i)][0]) for i in range(24))
    assert changed >= 22  # another epoch, another augmentation


def test_train_items_are_torchvisions_resized_crop_and_flip_of_the_drawn_box(tiny_data):
    dataset = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=4, hflip_prob=0.5)
    flipped = 0
    for index in range(24):
        path = dataset.samples[index][0]
        width, height = Image.open(path).size
        (left, top, w, h), flip = draw_crop(4, 7, index, width, height, (0.08, 1.0), 0.5)
        expected = TF.resized_crop(open_rgb(path), top, left, h, w, [16, 16], InterpolationMode.BILINEAR)
        if flip:
            expected, flipped = TF.hflip(expected), flipped + 1
        assert torch.equal(dataset[(7, index)][0], TF.pil_to_tensor(expected))
    assert 0 < flipped < 24


def test_resized_crop_of_a_stored_array_equals_that_of_the_pil_image_and_torchvisions():
    # The cache's CPU readers pass stored HWC arrays, the file path PIL images: one crop either way.
    pixels = np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for left, top, w, h in [(0, 0, 50, 40), (7, 3, 20, 31), (45, 0, 5, 40)]:
        for flip in (False, True):
            from_array = resized_crop(pixels, (left, top, left + w, top + h), 16, flip)
            from_image = resized_crop(image, (left, top, left + w, top + h), 16, flip)
            expected = TF.resized_crop(image, top, left, h, w, [16, 16], InterpolationMode.BILINEAR)
            expected = TF.hflip(expected) if flip else expected
            assert from_array.tobytes() == from_image.tobytes() == expected.tobytes()


@pytest.mark.parametrize("width, height", [(224, 224), (129, 128), (37, 5), (1, 9)])  # PIL's packing, numpy's
def test_planar_is_the_images_channels_first_pixels(width, height):
    image = Image.fromarray(np.random.RandomState(width).randint(0, 256, (height, width, 3), dtype=np.uint8))
    assert np.array_equal(planar(image), TF.pil_to_tensor(image).numpy())
    out = np.zeros((2, 3, height, width), dtype=np.uint8)
    planar(image, out[1])
    assert np.array_equal(out[1], TF.pil_to_tensor(image).numpy()) and not out[0].any()


def test_hflip_probability_one_mirrors_the_same_crop(tiny_data):
    never = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=1, hflip_prob=0.0)
    always = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=1, hflip_prob=1.0)
    for index in range(0, 24, 5):
        assert torch.equal(always[(1, index)][0], never[(1, index)][0].flip(-1))


def test_eval_items_are_torchvisions_resize_and_center_crop(tiny_data):
    val_set = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    reference = Compose([Resize(18, interpolation=InterpolationMode.BILINEAR), CenterCrop(16), PILToTensor()])
    assert len(val_set) == 8
    for index in range(len(val_set)):
        image, label, item_index = val_set[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        assert label == val_set.samples[index][1] and item_index == index
        assert torch.equal(image, val_set[index][0])
        with Image.open(val_set.samples[index][0]) as raw:  # PNG: no draft decoding involved
            assert torch.equal(image, reference(raw.convert("RGB")))


def save_noise(path, width, height, seed=0):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def torchvision_eval(path, size):
    """torchvision's Resize(size / 0.875) of the whole image, and its CenterCrop(size)."""
    resized = Resize(eval_resize_size(size), interpolation=InterpolationMode.BILINEAR)(open_rgb(path))
    return resized, CenterCrop(size)(resized)


@pytest.mark.parametrize("width, height", [(200, 25), (25, 200), (47, 6), (9, 70)])
def test_eval_of_images_up_to_the_band_aspect_is_torchvisions_pixel_for_pixel(tmp_path, width, height):
    path = save_noise(tmp_path / "long.png", width, height)
    for size in (16, 32):
        assert load_eval(path, size).tobytes() == torchvision_eval(path, size)[1].tobytes()


@pytest.mark.parametrize("width, height", [(6000, 1), (1, 6000), (900, 7), (13, 2000)])
def test_eval_of_longer_images_resizes_only_the_central_band_and_crops_the_same_pixels(tmp_path, width, height):
    path = save_noise(tmp_path / "strip.png", width, height)
    for size in (16, 32):
        whole, expected = torchvision_eval(path, size)
        band = open_resized(path, eval_resize_size(size))
        assert max(band.size) < max(whole.size) / BAND_ASPECT
        # Every center crop up to the resized short side (load_eval's, the image cache's window)
        # sits where it sits on the whole resized image, within one level of its pixels.
        for crop in (size, eval_resize_size(size)):
            ours, theirs = (np.asarray(CenterCrop(crop)(image), dtype=int) for image in (band, whole))
            assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
        assert np.abs(np.asarray(load_eval(path, size), dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_a_97_byte_1_by_6000_png_is_evaluated_in_a_few_megabytes(tmp_path):
    # It took 1.5 GB (the whole resized image: 256 x 1,536,000 px), for predict.py, validation and
    # the cache build alike; a 1 x 600,000 px one would have taken ~118 GB.
    wide, tall = str(tmp_path / "wide.png"), str(tmp_path / "tall.png")
    Image.new("RGB", (6000, 1), (10, 200, 30)).save(wide)
    Image.new("RGB", (1, 6000), (10, 200, 30)).save(tall)
    code = ("import resource, sys; from dataset import load_eval, open_resized; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "sizes = [(load_eval(p, 224).size, open_resized(p, 256).size) for p in sys.argv[1:]]; "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, sizes)")
    peak_mb, sizes = run_cli([sys.executable, "-c", code, wide, tall]).stdout.split(" ", 1)
    assert sizes.strip() == "[((224, 224), (256, 256)), ((224, 224), (256, 256))]"
    assert int(peak_mb) < 20, f"peak memory grew by {peak_mb} MB"


def write_mode_zoo(root):
    """One image per PIL mode the loader must turn into RGB; (path, expected centre colour)."""
    folder = os.path.join(root, "zoo")
    os.makedirs(folder)
    red = (255, 0, 0)
    Image.new("L", (40, 30), 128).save(f"{folder}/gray.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 100)).save(f"{folder}/rgba.png")
    Image.new("RGB", (40, 30), red).convert("P").save(f"{folder}/palette.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(f"{folder}/cmyk.jpg")
    Image.new("RGB", (40, 30), (0, 200, 0)).save(f"{folder}/upper.JPG", format="JPEG")
    Image.new("L", (40, 30), 60).save(f"{folder}/gray.jpeg")
    return {"gray.png": (128,) * 3, "rgba.png": red, "palette.png": red, "cmyk.jpg": red,
            "upper.JPG": (0, 200, 0), "gray.jpeg": (60,) * 3}


@pytest.mark.parametrize("train", [True, False])
def test_grayscale_rgba_palette_cmyk_and_upper_case_jpg_load_as_rgb(tmp_path, train):
    expected = write_mode_zoo(str(tmp_path))
    dataset = AugmentedImageFolder(str(tmp_path), 16, train=train)
    names = [os.path.basename(path) for path, _ in dataset.samples]
    assert sorted(names) == sorted(expected)  # .JPG is found like .jpg
    for index, name in enumerate(names):
        image = dataset[(0, index) if train else index][0]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8, name
        centre = image[:, 8, 8].tolist()
        assert all(abs(got - want) <= 6 for got, want in zip(centre, expected[name])), (name, centre)


def test_unreadable_image_is_a_data_error_naming_the_file_unless_skipping_is_asked(tiny_data, capsys):
    bad = os.path.join(tiny_data["train_dir"], "square", "bad.png")
    open(bad, "wb").write(b"not a png at all")
    strict = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True)
    index = [path for path, _ in strict.samples].index(bad)
    with pytest.raises(DataError) as error:
        strict[(0, index)]
    assert f"cannot read image {bad}" in str(error.value) and "--skip_bad_images" in str(error.value)

    lenient = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, skip_bad_images=True)
    assert lenient[(0, index)] is None
    assert f"skipping unreadable image {bad}" in capsys.readouterr().err
    loader, _ = build_loaders(lenient, lenient, 5, 0, 0, 1, seed=0, pin_memory=False)
    loader.sampler.set_epoch(0)
    batches = list(loader)  # 25 files, batches of 5: the bad one is left out of its batch
    assert sum(skipped for *_, skipped in batches) == 1
    seen = sorted(i for _, _, indices, _ in batches for i in indices.tolist())
    assert seen == sorted(set(range(25)) - {index})


def write_large_jpeg(path):
    """640x480: smooth gradients plus two solid shapes with sharp edges."""
    x = np.linspace(0, 255, 640)[None, :]
    y = np.linspace(0, 255, 480)[:, None]
    pixels = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((100, 80, 300, 260), fill=(250, 30, 30))
    draw.rectangle((380, 200, 600, 440), fill=(20, 20, 200))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=92)


def test_jpeg_draft_decodes_at_the_smallest_libjpeg_scale_still_large_enough(tmp_path):
    path = str(tmp_path / "a" / "big.jpg")
    write_large_jpeg(path)
    assert open_rgb(path).size == (640, 480)
    assert open_rgb(path, (100, 100)).size == (160, 120)  # 1/4: 1/8 would be 80x60, too small
    assert open_rgb(path, (300, 100)).size == (320, 240)
    assert open_rgb(path, (641, 10)).size == (640, 480)
    assert open_rgb(path, (100, 100)).mode == "RGB"


@pytest.mark.parametrize("train", [True, False])
def test_fast_jpeg_decode_matches_full_decode_for_the_same_crop(tmp_path, train):
    write_large_jpeg(str(tmp_path / "a" / "big.jpg"))
    fast = AugmentedImageFolder(str(tmp_path), 64, train=train, seed=9)
    full = AugmentedImageFolder(str(tmp_path), 64, train=train, seed=9, fast_decode=False)
    keys = [(epoch, 0) for epoch in range(12)] if train else [0]
    for key in keys:
        a, b = fast[key][0].float(), full[key][0].float()
        assert a.shape == b.shape == (3, 64, 64)
        assert (a - b).abs().mean() < 3, key  # measured: about 0.3
    if train:  # the comparison can tell crops apart: another epoch's crop is far off
        assert (fast[(0, 0)][0].float() - full[(1, 0)][0].float()).abs().mean() > 10


# ------------------------------------------------------------------ sampler and loaders

def test_loader_resumed_mid_epoch_yields_the_remaining_batches(tiny_data):
    dataset = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True)
    loader, _ = build_loaders(dataset, dataset, batch_size=4, num_workers=0, rank=0, world_size=1,
                              seed=0, pin_memory=False)
    loader.sampler.set_epoch(3)
    full = collect(loader)
    loader.sampler.set_epoch(3, start=8)
    rest = collect(loader)
    assert len(full) == 6 and len(rest) == len(loader) == 4
    assert_same_batches(full[2:], rest)
    loader.sampler.set_epoch(3)
    assert torch.cat([indices for _, _, indices in full]).tolist() == [i for _, i in loader.sampler]


def test_batches_do_not_depend_on_the_number_of_workers_and_equal_the_items_fetched_one_by_one(tiny_data):
    train_set = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=4)
    val_set = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    results = {}
    for workers in (0, 2):
        train_loader, val_loader = build_loaders(train_set, val_set, batch_size=4, num_workers=workers,
                                                 rank=0, world_size=1, seed=4, pin_memory=False)
        results[workers] = []
        for epoch in (1, 2):
            train_loader.sampler.set_epoch(epoch)
            results[workers].append(collect(train_loader))
        results[workers].append(collect(val_loader))
        del train_loader, val_loader  # stop the persistent workers
    assert [len(r) for r in results[0]] == [6, 6, 2]
    for run0, run2 in zip(results[0], results[2]):
        assert_same_batches(run0, run2)
    assert not torch.equal(results[0][0][0][0], results[0][1][0][0])  # epochs differ
    # A worker fetches a whole batch at once (its crops drawn together): the same as item by item.
    for epoch, batches in ((1, results[2][0]), (2, results[2][1])):
        for images, labels, indices in batches:
            alone = [train_set[(epoch, index)] for index in indices.tolist()]
            assert torch.equal(images, torch.stack([image for image, _, _ in alone]))
            assert labels.tolist() == [label for _, label, _ in alone]


@pytest.mark.parametrize("epoch", [1, 4])
def test_two_ranks_of_batch_b_see_exactly_one_rank_of_batch_2b(tiny_data, epoch):
    train_set = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True, seed=11)

    def batches(batch_size, rank, world_size):
        loader, _ = build_loaders(train_set, train_set, batch_size, 0, rank, world_size, seed=11,
                                  pin_memory=False)
        loader.sampler.set_epoch(epoch)
        return collect(loader)

    one = batches(8, 0, 1)
    rank0, rank1 = batches(4, 0, 2), batches(4, 1, 2)
    assert len(one) == len(rank0) == len(rank1) == 3
    for big, a, b in zip(one, rank0, rank1):
        union = as_multiset(*(torch.cat([x, y]) for x, y in zip(a, b)))
        assert union == as_multiset(*big)


def test_val_shards_cover_every_image_exactly_once(tiny_data):
    val_set = AugmentedImageFolder(tiny_data["val_dir"], 16, train=False)
    everything = []
    for rank in range(3):
        _, val_loader = build_loaders(val_set, val_set, 2, 0, rank, 3, seed=0, pin_memory=False)
        everything += [x for batch in collect(val_loader) for x in as_multiset(*batch)]
    _, single = build_loaders(val_set, val_set, 2, 0, 0, 1, seed=0, pin_memory=False)
    assert sorted(everything) == sorted(x for batch in collect(single) for x in as_multiset(*batch))
    assert [index for index, _, _ in sorted(everything)] == list(range(8))


def test_loader_refuses_a_batch_larger_than_a_ranks_shard(tiny_data):
    dataset = AugmentedImageFolder(tiny_data["train_dir"], 16, train=True)
    with pytest.raises(DataError, match="24 images, 12 per process: fewer than --batch_size 13"):
        build_loaders(dataset, dataset, 13, 0, 0, 2, seed=0, pin_memory=False)


# ------------------------------------------------------------------ folder checks

@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_class_folder_without_images_is_a_data_error_from_build_datasets(tiny_data, content):
    empty = os.path.join(tiny_data["train_dir"], "zebra")
    os.makedirs(empty)
    os.makedirs(os.path.join(tiny_data["val_dir"], "zebra"))
    shutil.copy(f"{tiny_data['val_dir']}/circle/000.png", f"{tiny_data['val_dir']}/zebra/000.png")
    if content:
        open(os.path.join(empty, content), "w").write("no image here")
    with pytest.raises(DataError) as error:
        build_datasets(data_args(tiny_data))
    message = str(error.value)
    assert "zebra" in message and ".jpg" in message and ".png" in message


def test_build_datasets_labels_match_the_class_names(tiny_data):
    train_set, val_set, class_names = build_datasets(data_args(tiny_data, image_size=20, seed=5))
    assert class_names == list(CLASSES) == train_set.classes == val_set.classes
    assert train_set.train and not val_set.train
    assert (train_set.image_size, train_set.seed, train_set.crop_scale) == (20, 5, (0.08, 1.0))
    for path, label in train_set.samples + val_set.samples:
        assert class_names[label] == os.path.basename(os.path.dirname(path))


@pytest.mark.parametrize("with_image", [False, True])
def test_hidden_folders_are_ignored_by_the_dataset_as_by_the_class_check(tiny_data, with_image):
    # check_data_folders skips hidden folders (.ipynb_checkpoints, .cache, ...); the datasets
    # must use the same classes: an empty hidden folder must not be an error, and one with an
    # image must not become class 0 and shift every label against class_names.
    for root in (tiny_data["train_dir"], tiny_data["val_dir"]):
        os.makedirs(f"{root}/.ipynb_checkpoints")
        if with_image:
            shutil.copy(f"{root}/circle/000.png", f"{root}/.ipynb_checkpoints/000-checkpoint.png")
    train_set, val_set, class_names = build_datasets(data_args(tiny_data))
    assert class_names == list(CLASSES)
    assert train_set.classes == class_names and val_set.classes == class_names
    assert {label for _, label in train_set.samples} == {0, 1, 2}


# ------------------------------------------------------------------ normalize

def test_normalize_gives_imagenet_normalised_floats():
    values = (0, 128, 255)
    images = torch.empty(2, 3, 4, 5, dtype=torch.uint8)
    images[0] = torch.tensor(values, dtype=torch.uint8).view(3, 1, 1)
    images[1] = 255
    before = images.clone()
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(images, before)
    for c in range(3):
        expected0 = (values[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        expected1 = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((4, 5), expected0), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1, c], torch.full((4, 5), expected1), rtol=0, atol=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, abs=1e-5)  # -2.1179
    assert normalize(images, dtype=torch.float64).dtype == torch.float64
