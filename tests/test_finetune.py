"""Fine-tuning as users do it, without internet: pretrained weights by name from torch.hub's cache
(--pretrained), the offline error, a frozen backbone (--freeze_backbone_epochs), a slower backbone
(--backbone_lr_scale), proven on real runs."""
import glob
import json
import os
import sys

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
from torchvision.models import get_model
from torchvision.transforms import functional as TF

import export
from dataset import load_eval, normalize
from model import RESNET18_IMAGENET_FILE, build_model, pretrained_entry

URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
# Offline for real on any machine: HTTPS goes through a proxy port where nothing listens.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def write_two_colour_folder(root, per_class, seed):
    """A second task: 'warm' images (red-dominant) against 'cold' ones (blue-dominant)."""
    rng = np.random.RandomState(seed)
    for name, channel in (("cold", 2), ("warm", 0)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.randint(0, 110, size=(20, 24, 3)).astype(np.uint8)
            pixels[..., channel] = rng.randint(140, 256, size=(20, 24))
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:03d}.png"))
    return root


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A torch.hub cache holding "ImageNet" ResNet-18 weights under torchvision's file name: a
    ResNet-18 trained here on a first dataset (three colour-dominant classes)."""
    root = tmp_path_factory.mktemp("pretraining")
    first = dict(train_dir=write_image_folder(str(root / "train"), per_class=16),
                 val_dir=write_image_folder(str(root / "val"), per_class=3, seed=1))
    run_cli(train_cmd(*data_flags(first, str(root / "run"), epochs=3, batch_size=8)))
    weights = torch.load(root / "run" / "checkpoints" / "checkpoint_latest.pth")["model_state_dict"]
    home = root / "torch_home"
    os.makedirs(home / "hub" / "checkpoints")
    torch.save(weights, home / "hub" / "checkpoints" / RESNET18_IMAGENET_FILE)
    return str(home), weights


@pytest.fixture(scope="module")
def second_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("second_task")
    return dict(train_dir=write_two_colour_folder(str(root / "train"), per_class=12, seed=2),
                val_dir=write_two_colour_folder(str(root / "val"), per_class=6, seed=3))


def test_pretrained_offline_is_one_error_line_naming_the_file_and_where_to_put_it(tiny_data, tmp_path):
    home = tmp_path / "empty_torch_home"
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), pretrained=True)),
                     env={"TORCH_HOME": str(home), **OFFLINE}, check=False)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert f"cannot download {URL}" in result.stderr
    assert f"put it at {home}/hub/checkpoints/{RESNET18_IMAGENET_FILE}" in result.stderr
    assert "--pretrained_weights PATH" in result.stderr
    assert not os.path.exists(f"{tmp_path}/checkpoints")


def test_pretrained_by_name_refuses_unknown_weights_and_models_without_any(tiny_data, tmp_path):
    unknown = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), pretrained="IMAGENET9K")), check=False)
    assert unknown.returncode == 2 and "--pretrained IMAGENET9K: resnet18's weights are DEFAULT (IMAGENET1K_V1) " \
                                       "or IMAGENET1K_V1" in unknown.stderr
    none = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="tiny_cnn", pretrained=True)), check=False)
    assert none.returncode == 2 and "--model tiny_cnn has no pretrained weights in torchvision" in none.stderr


def backbone(state):
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


def test_fine_tuning_finds_the_cached_weights_keeps_the_backbone_frozen_then_trains_it_and_beats_scratch(
        torch_home, second_task, tmp_path):
    """The same recipe from the cached weights and from scratch, at the same budget and schedule:
    two epochs, the first with the backbone frozen (only the fresh head trains). The frozen epoch is
    where transfer shows without noise: a frozen pretrained backbone's features already separate
    the classes, a frozen random one's do not, and a linear head is all that trains (on a given
    backbone, the same numbers with 1 or 2 threads, AVX-512 or AVX2). Against a scratch run that
    trains everything from its first step, this task is too easy to be judged: a from-scratch
    ResNet-18 solves it in 6 steps, with a final loss that moves threefold with the CPU's thread
    count or vector instructions."""
    home, pretrained = torch_home
    env = {"TORCH_HOME": home}
    flags = dict(epochs=2, batch_size=4, learning_rate=3e-3, freeze_backbone_epochs=1, save_top_k=2)
    tuned = data_flags(second_task, f"{tmp_path}/tuned", pretrained=True, **flags)
    run_cli(train_cmd(*tuned), env=env)
    checkpoints = f"{tmp_path}/tuned/checkpoints"
    after_frozen = torch.load(f"{checkpoints}/checkpoint_epoch001.pth")["model_state_dict"]
    for key, value in backbone(pretrained).items():  # weights and batch-norm statistics, bit for bit
        assert torch.equal(after_frozen[key], value), key
    torch.manual_seed(42)  # the run's --seed: the fresh two-class head it started with
    fresh_head = build_model("resnet18", 2).fc.state_dict()
    assert after_frozen["fc.weight"].shape == (2, 512) and not torch.equal(after_frozen["fc.weight"],
                                                                           fresh_head["weight"])  # trained
    tuned_final = torch.load(f"{checkpoints}/checkpoint_epoch002.pth")
    assert not torch.equal(tuned_final["model_state_dict"]["conv1.weight"], pretrained["conv1.weight"])
    # Resumed after the frozen epoch, epoch 2 unfreezes the backbone just the same, bit for bit.
    resumed = data_flags(second_task, f"{tmp_path}/resumed", pretrained=True, **flags)
    run_cli(train_cmd(*resumed, "--resume", f"{checkpoints}/checkpoint_epoch001.pth"), env=env)
    assert_same_weights(load_weights(f"{tmp_path}/resumed/checkpoints/checkpoint_latest.pth"),
                        tuned_final["model_state_dict"])

    run_cli(train_cmd(*data_flags(second_task, f"{tmp_path}/scratch", **flags)), env=env)
    scratch = json.load(open(f"{tmp_path}/scratch/logs/training_history.json"))
    tuned_history = tuned_final["history"]
    # Ignored weights would make the two runs one and the same (same seed): every "<" would fail.
    # Seen: frozen epoch 0.29-0.46 against 0.56, then 0.01-0.04 against 0.58-0.64 (2 and 1 threads, AVX2).
    assert tuned_history["val_loss"][0] < scratch["val_loss"][0]  # the frozen epoch
    assert tuned_history["val_acc"][0] >= scratch["val_acc"][0]
    assert tuned_history["val_loss"][-1] < scratch["val_loss"][-1]  # then everything trained
    assert tuned_history["val_acc"][-1] >= scratch["val_acc"][-1]


def test_backbone_lr_scale_gives_the_backbone_its_fraction_of_the_heads_rate(tiny_data, tmp_path):
    run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="tiny_cnn", backbone_lr_scale=0.1,
                                  lr_scheduler="none", learning_rate=0.002)))
    groups = torch.load(f"{tmp_path}/checkpoints/checkpoint_latest.pth")["optimizer_state_dict"]["param_groups"]
    assert [group["lr"] for group in groups] == [0.002, pytest.approx(0.0002)]
    assert [len(group["params"]) for group in groups] == [2, 4]  # fc.weight and fc.bias; the two convs


def test_freezing_with_two_processes_neither_hangs_nor_trains_the_frozen_backbone(tiny_data, tmp_path):
    run_cli(torchrun(2, *data_flags(tiny_data, str(tmp_path), model="tiny_cnn", batch_size=2, epochs=2,
                                    freeze_backbone_epochs=1, save_top_k=2)), timeout=180)
    torch.manual_seed(42)  # the run's --seed: its initial weights
    initial = build_model("tiny_cnn", 3).state_dict()
    first = torch.load(f"{tmp_path}/checkpoints/checkpoint_epoch001.pth")["model_state_dict"]
    second = torch.load(f"{tmp_path}/checkpoints/checkpoint_epoch002.pth")["model_state_dict"]
    for key in ("features.0.weight", "features.3.weight"):
        assert torch.equal(first[key], initial[key]) and not torch.equal(second[key], initial[key])
    assert not torch.equal(first["fc.weight"], initial["fc.weight"])


def test_the_weights_own_preprocessing_is_used_stored_and_applied_by_predict_and_export(tiny_data, tmp_path):
    """RegNetY-400MF's IMAGENET1K_V2 weights were evaluated on 224 px crops of 232 px (not
    224 / 0.875 = 256): a run that sets only --image_size 32 keeps their ratio (33 px, not 37),
    and mean/std set by the user win. Predictions and the ONNX metadata follow the checkpoint."""
    entry = pretrained_entry("regnet_y_400mf", "IMAGENET1K_V2")
    home = tmp_path / "torch_home"
    os.makedirs(home / "hub" / "checkpoints")
    torch.save(get_model("regnet_y_400mf").state_dict(), home / "hub" / "checkpoints" / os.path.basename(entry.url))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="regnet_y_400mf",
                                           pretrained="IMAGENET1K_V2", image_size=32, limit_train_batches=1),
                               "--mean", *map(str, mean), "--std", *map(str, std)), env={"TORCH_HOME": str(home)})
    assert ("Preprocessing: 32 px crops, evaluation images resized to 33 px first, mean [0.5, 0.4, 0.3], std "
            "[0.2, 0.25, 0.3]: RegNet_Y_400MF_Weights.IMAGENET1K_V2's own, except what you set (--image_size, "
            "--mean, --std)") in result.stdout
    path = f"{tmp_path}/checkpoints/checkpoint_best.pth"
    checkpoint = torch.load(path)
    assert checkpoint["preprocessing"] == dict(image_size=32, resize_size=33, mean=mean, std=std)

    model = build_model("regnet_y_400mf", 3)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    image = sorted(glob.glob(f"{tiny_data['val_dir']}/*/*.png"))[0]
    with torch.no_grad():
        def probabilities(resize_size):
            pixels = TF.pil_to_tensor(load_eval(image, 32, resize_size))[None]
            return model(normalize(pixels, mean, std)).softmax(dim=1)[0]
        expected, other = probabilities(33), probabilities(37)
    assert (expected - other).abs().max() > 1e-3  # the resize size shows in the result
    predicted = run_cli([sys.executable, f"{REPO}/predict.py", "--checkpoint", path, image, "--topk", "3",
                         "--output", f"{tmp_path}/predictions.json"])
    assert predicted.returncode == 0
    predictions = json.load(open(f"{tmp_path}/predictions.json"))[0]["predictions"]
    for prediction in predictions:
        index = checkpoint["class_names"].index(prediction["class"])
        assert prediction["probability"] == pytest.approx(expected[index].item(), abs=1e-6)
    metadata = export.export_metadata(checkpoint, "model")
    assert (metadata["image_size"], metadata["resize_size"], metadata["mean"], metadata["std"]) == (32, 33, mean, std)
