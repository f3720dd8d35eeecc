"""Where the cache path's time goes on a GPU: train ResNet-18 (224 px, AMP fp16, channels_last,
batch 256) from the image cache for a few epochs, to be run under a sampling profiler:

    py-spy record --threads --idle --format raw -o profile.txt -- python3 bench/profile_cache_gpu.py
"""
import os
import sys
import tempfile

import torch

from harness import make_photo_folder, project_loop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import AugmentedImageFolder, EpochTaggedSampler  # noqa: E402
from image_cache import CachedBatches, build_or_open  # noqa: E402

data = os.path.join(tempfile.gettempdir(), "gpu_bench_photos")
folder = make_photo_folder(data, 8000)
dataset = AugmentedImageFolder(folder, 224, train=True)
images, _ = build_or_open(dataset, 224, data + "_cache", 16, lambda: None)
loader = CachedBatches(images, dataset.targets, EpochTaggedSampler(dataset, 1, 0, seed=0), 256, True, 224,
                       torch.device("cuda"), drop_last=True)
run = project_loop("resnet18", None, None, 256, torch.device("cuda"), image_size=224, loader=loader,
                   flags=["--use_amp", "--amp_dtype", "float16", "--channels_last"])
for epoch in range(4):
    print(f"epoch {epoch}: {run():,.0f} images/s", flush=True)
