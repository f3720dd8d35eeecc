"""Images of more than 8 bits per pixel (16-bit grayscale PNGs, TIFFs and PGMs, 32-bit integer and
float TIFFs) on the file path: scaled to 8 bits as torchvision's decoder and its to_dtype(uint8,
scale=True) scale them (what --decode_on_device trains on), never clipped to white, in opening,
training, evaluation and the image cache's build."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

from dataset import AugmentedImageFolder, DataError, open_rgb
from fastload.cache_file import DecodeForCache
from fastload.device_decode import DeviceDecodedFiles

LEVEL = 126  # the images' mean level of 255


def gray_16_bit(height=48, width=64, seed=0):
    """A 16-bit grayscale image of mean level LEVEL, noisy so that its low bytes differ from its high
    bytes (in an 8-bit image times 257 they agree, and taking the wrong byte would pass)."""
    noise = np.random.default_rng(seed).normal(0, 2500, (height, width))
    return np.clip(LEVEL * 257 + noise, 0, 65535).astype(np.uint16)


def torchvision_8_bit(values):
    """torchvision's 8-bit scaling of a 2-D uint16 or float32 array, as an HWC RGB array."""
    return np.repeat(to_dtype(torch.from_numpy(values), torch.uint8, scale=True).numpy()[:, :, None], 3, axis=2)


def assert_level(pixels, level=LEVEL):
    pixels = np.asarray(pixels)
    assert abs(pixels.mean() - level) < 1.5, f"mean level {pixels.mean():.1f}, expected {level}"
    assert (pixels == 255).mean() < 0.01  # PIL's convert("RGB") clips ~98% of such an image to 255


def test_a_16_bit_grayscale_png_opens_as_torchvision_decodes_it_not_white(tmp_path):
    path = str(tmp_path / "gray16.png")
    Image.fromarray(gray_16_bit()).save(path)
    assert Image.open(path).mode == "I;16"
    decoded = decode_image(read_file(path), mode=ImageReadMode.RGB)
    assert decoded.dtype == torch.uint16
    expected = to_dtype(decoded, torch.uint8, scale=True).permute(1, 2, 0).numpy()
    opened = np.asarray(open_rgb(path))
    assert_level(opened)
    np.testing.assert_array_equal(opened, expected)


def wide_sources(folder):
    """{name: (path, the PIL mode it opens in, its values as uint16 or float32)}: each wide mode PIL gives."""
    values = gray_16_bit(seed=1)
    big_endian = Image.frombytes("I;16B", (values.shape[1], values.shape[0]), values.astype(">u2").tobytes())
    sources = {"16-bit TIFF": (Image.fromarray(values), "gray16.tif", "I;16", values),
               "16-bit big-endian TIFF": (big_endian, "gray16b.tif", "I;16B", values),
               "16-bit PGM": (Image.fromarray(values), "gray16.pgm", "I", values),
               "32-bit integer TIFF": (Image.fromarray(values.astype(np.int32)), "gray32.tif", "I", values),
               "float TIFF": (Image.fromarray(values.astype(np.float32) / 65535), "float.tif", "F",
                              values.astype(np.float32) / 65535)}
    for name, (image, file_name, mode, pixels) in sources.items():
        image.save(os.path.join(folder, file_name))
        sources[name] = (os.path.join(folder, file_name), mode, pixels)
    return sources


@pytest.mark.parametrize("source", ["16-bit TIFF", "16-bit big-endian TIFF", "16-bit PGM", "32-bit integer TIFF",
                                    "float TIFF"])
def test_every_wide_pil_mode_is_scaled_as_torchvision_scales_its_values(tmp_path, source):
    path, mode, values = wide_sources(str(tmp_path))[source]
    assert Image.open(path).mode == mode
    opened = np.asarray(open_rgb(path))
    assert_level(opened)
    np.testing.assert_array_equal(opened, torchvision_8_bit(values))


def twin_folders(root):
    """The same 16-bit PNG in root/wide/a/ and its high bytes as an 8-bit PNG in root/narrow/a/."""
    values = gray_16_bit(height=90, width=120, seed=2)
    for name, image in (("wide", Image.fromarray(values)), ("narrow", Image.fromarray((values >> 8).astype(np.uint8)))):
        os.makedirs(os.path.join(root, name, "a"))
        image.save(os.path.join(root, name, "a", "image.png"))
    return os.path.join(root, "wide"), os.path.join(root, "narrow")


def test_a_16_bit_image_trains_evaluates_and_is_cached_as_its_8_bit_high_bytes(tmp_path):
    wide, narrow = twin_folders(str(tmp_path))
    for train, key in ((True, (3, 0)), (False, 0)):
        wide_item = AugmentedImageFolder(wide, 32, train=train, seed=1)[key][0]
        assert_level(wide_item.numpy())
        assert torch.equal(wide_item, AugmentedImageFolder(narrow, 32, train=train, seed=1)[key][0])
    for fast_decode in (True, False):  # load_eval's two paths (the draft decode is for JPEGs)
        item = AugmentedImageFolder(wide, 32, train=False, fast_decode=fast_decode)[0][0]
        assert torch.equal(item, AugmentedImageFolder(narrow, 32, train=False)[0][0])
    cached = DecodeForCache([(os.path.join(wide, "a", "image.png"), 0)], 32)[0][1]
    assert_level(cached)
    np.testing.assert_array_equal(cached, DecodeForCache([(os.path.join(narrow, "a", "image.png"), 0)], 32)[0][1])


@pytest.mark.parametrize("train", [True, False])
def test_decode_on_device_gives_the_file_paths_pixels_for_a_16_bit_png(tmp_path, train):
    wide, _ = twin_folders(str(tmp_path))
    dataset = AugmentedImageFolder(wide, 32, train=train, seed=1)
    keys = [(3, 0)] if train else [0]
    (images, _, _, _), = list(DeviceDecodedFiles(dataset, keys, 1, train, torch.device("cpu")))
    from_file = dataset[keys[0]][0]
    assert_level(images[0].numpy())
    assert (images[0].int() - from_file.int()).abs().max() <= 1  # tensor vs PIL resampling


@pytest.mark.parametrize("values, words", [
    (np.linspace(0, 255, 64 * 48, dtype=np.float32), "float image (PIL mode F) with values 0 to 255"),
    (np.full(64 * 48, np.nan, dtype=np.float32), "float image (PIL mode F) with values nan to nan"),
    (np.linspace(0, 70000, 64 * 48).astype(np.int32), "32-bit integer image (PIL mode I) with values 0 to 70000"),
])
def test_wide_values_without_a_known_scale_are_refused_naming_the_file(tmp_path, values, words):
    os.makedirs(tmp_path / "a")
    Image.fromarray(values.reshape(48, 64)).save(tmp_path / "a" / "wide.tif")
    dataset = AugmentedImageFolder(str(tmp_path), 16, train=False)
    with pytest.raises(DataError, match=re.escape(f"cannot read image {tmp_path}/a/wide.tif (a {words}; ")):
        dataset[0]
