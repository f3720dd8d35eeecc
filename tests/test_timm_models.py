"""timm models (--model timm/NAME), as users run them: a timm ResNet-18 fine-tuned from timm's
pretrained weights found in the Hugging Face cache, and a timm ViT-Tiny from scratch at 32 px
(2 x 2 patches), each for two epochs on two processes with a frozen first epoch; their resume,
their exports and predictions; timm's weights files, offline errors and preprocessing."""
import argparse
import glob
import json
import os

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import CLASSES, data_flags, make_tiny_data, run_cli, torchrun, train_cmd
from huggingface_hub import constants
from safetensors.torch import save_file
from test_fault_tolerance import assert_same_run
from torchvision.transforms import functional as TF

import export
import predict
from dataset import load_eval, normalize
from engine.checkpoint import load_checkpoint
from engine.recipe import parameter_layers
from engine.training import resolve_preprocessing
from model import TIMM_WEIGHTS_FILE, ModelError, build_model, model_from_checkpoint, pretrained_entry, pretrained_file

IMAGE_SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Offline for real on any machine: HTTPS goes through a proxy port where nothing listens.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
RESNET_WEIGHTS_REPO = "timm/resnet18.a1_in1k"  # the hub repository of timm's default resnet18 weights
RUNS = {  # the model, its head and the run's own flags; both runs: two epochs, the first with the backbone frozen
    "resnet": ("timm/resnet18", "fc", dict(pretrained=True, backbone_lr_scale=0.1)),
    "vit": ("timm/vit_tiny_patch16_224", "head", dict(layer_decay=0.5)),
}
COMMON = dict(image_size=IMAGE_SIZE, batch_size=2, epochs=2, freeze_backbone_epochs=1, save_top_k=2)


def fill_hf_cache(cache, repo, state):
    """What `hf download REPO model.safetensors` leaves in a Hugging Face cache: the file as a blob,
    linked from the snapshot of the commit that refs/main names."""
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    commit, etag = "0123456789abcdef0123456789abcdef01234567", "f" * 64
    for sub in ("blobs", "refs", os.path.join("snapshots", commit)):
        os.makedirs(os.path.join(folder, sub))
    save_file(state, os.path.join(folder, "blobs", etag))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    os.symlink(os.path.join("..", "..", "blobs", etag), os.path.join(folder, "snapshots", commit, TIMM_WEIGHTS_FILE))


def imagenet_like_timm_resnet18():
    """timm's resnet18 with ImageNet's 1000 classes, seeded: stands in for its pretrained weights."""
    torch.manual_seed(11)
    return build_model("timm/resnet18", 1000).state_dict()


def backbone(state, head):
    return {key: value for key, value in state.items() if not key.startswith(head + ".")}


# ------------------------------------------------------------------ in this process

def test_layer_decay_splits_a_timm_vit_into_its_blocks():
    with torch.device("meta"):
        vit = build_model("timm/vit_tiny_patch16_224", 3)
    names = {id(param): name for name, param in vit.named_parameters()}
    layers = [sorted({names[id(param)].rsplit(".", 1)[0] for _, _, param in layer}) for layer in parameter_layers(vit)]
    assert layers[0] == ["cls_token", "pos_embed"] and layers[1] == ["patch_embed.proj"]
    for index in range(12):  # each block is one layer, its attention and MLP together
        assert {name.split(".")[1] for name in layers[2 + index]} == {str(index)}
    assert layers[14:] == [["norm"], ["head"]] and len(layers) == 16


def test_timm_weights_fill_the_preprocessing_not_given_as_torchvisions_do(capsys):
    args = argparse.Namespace(model="timm/resnet18", pretrained="DEFAULT", image_size=IMAGE_SIZE, resize_size=None,
                              mean=None, std=None)
    resolve_preprocessing(args, argparse.Namespace(is_main=True))
    # timm evaluates a1_in1k on 224 px crops of 235 px (crop_pct 0.95): 32 px crops keep that ratio.
    assert (args.image_size, args.resize_size, args.mean, args.std) == (32, 34, IMAGENET_MEAN, IMAGENET_STD)
    assert capsys.readouterr().out == (
        f"Preprocessing: 32 px crops, evaluation images resized to 34 px first, mean {IMAGENET_MEAN}, std "
        f"{IMAGENET_STD}: timm/resnet18.a1_in1k's own, except what you set (--image_size); resized bilinearly, "
        "where the weights were evaluated bicubic\n")


def test_the_weights_are_found_where_hf_download_leaves_them_and_loaded_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request to the hub is an error
    state = imagenet_like_timm_resnet18()
    fill_hf_cache(str(tmp_path), RESNET_WEIGHTS_REPO, state)
    path = pretrained_file(pretrained_entry("timm/resnet18"))
    assert path == str(tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" /
                       "0123456789abcdef0123456789abcdef01234567" / TIMM_WEIGHTS_FILE)
    model = build_model("timm/resnet18", 3, path)
    for key, value in backbone(state, "fc").items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.out_features == 3


def test_timm_weights_offline_are_one_error_naming_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    entry = pretrained_entry("timm/resnet18")
    assert pretrained_file(entry, download=False) is None  # a rank waiting for the download finds nothing
    with pytest.raises(ModelError) as error:
        pretrained_file(entry)
    assert str(error.value).startswith(
        f"cannot download https://huggingface.co/{RESNET_WEIGHTS_REPO}/resolve/main/model.safetensors (")
    assert str(error.value).endswith(
        f"run `hf download {RESNET_WEIGHTS_REPO} model.safetensors` and copy the folder it fills, "
        f"models--timm--resnet18.a1_in1k in its Hugging Face cache, to {tmp_path}/models--timm--resnet18.a1_in1k, "
        "or pass --pretrained_weights PATH with that file")
    assert "\n" not in str(error.value) and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ real runs

@pytest.mark.slow
def test_pretrained_offline_is_one_error_line_naming_the_file_and_where_it_goes(tiny_data, tmp_path):
    cache = tmp_path / "empty_hf_cache"
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path), model="timm/resnet18", pretrained=True)),
                     env={"HF_HUB_CACHE": str(cache), **OFFLINE}, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot download https://huggingface.co/{RESNET_WEIGHTS_REPO}/resolve/main/"
                                     "model.safetensors (")
    assert f"to {cache}/models--timm--resnet18.a1_in1k, or pass --pretrained_weights PATH" in result.stderr
    assert not os.path.exists(f"{tmp_path}/checkpoints")
    assert not os.path.exists(cache / "models--timm--resnet18.a1_in1k")  # nothing half-downloaded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The two runs of RUNS on two processes; the ResNet's starting weights are in a Hugging Face
    cache, and any attempt to reach the network fails."""
    root = tmp_path_factory.mktemp("timm")
    data = make_tiny_data(str(root))
    weights = imagenet_like_timm_resnet18()
    fill_hf_cache(str(root / "hf_cache"), RESNET_WEIGHTS_REPO, weights)
    env = {"HF_HUB_CACHE": str(root / "hf_cache"), **OFFLINE}
    runs = dict(data=data, env=env, root=str(root), pretrained=weights, output={})
    for run, (model, _, flags) in RUNS.items():
        runs["output"][run] = run_cli(torchrun(2, *data_flags(data, f"{root}/{run}", model=model, **COMMON, **flags)),
                                      env=env, timeout=300).stdout
    return runs


def seeded_initialisation(model):
    """The weights a run builds its model with (--seed 42): its head's, and its backbone's without
    --pretrained."""
    torch.manual_seed(42)
    return build_model(model, len(CLASSES)).state_dict()


def checkpoint_path(trained, run, name):
    return f"{trained['root']}/{run}/checkpoints/{name}.pth"


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_the_head_has_the_datasets_classes_and_the_frozen_epoch_left_the_backbone_untouched(trained, run):
    model, head, flags = RUNS[run]
    fresh = seeded_initialisation(model)
    initial = backbone(trained["pretrained"] if flags.get("pretrained") else fresh, head)
    first = torch.load(checkpoint_path(trained, run, "checkpoint_epoch001"))
    assert first["model_name"] == model and first["class_names"] == list(CLASSES)
    for key, value in initial.items():  # weights and batch-norm statistics, bit for bit
        assert torch.equal(first["model_state_dict"][key], value), key
    trained_head = first["model_state_dict"][f"{head}.weight"]
    assert trained_head.shape == fresh[f"{head}.weight"].shape and trained_head.shape[0] == len(CLASSES)
    assert not torch.equal(trained_head, fresh[f"{head}.weight"])  # the head trained in the frozen epoch
    second = torch.load(checkpoint_path(trained, run, "checkpoint_epoch002"))["model_state_dict"]
    changed = [key for key, value in initial.items() if not torch.equal(second[key], value)]
    assert len(changed) > len(initial) // 2  # then the backbone trained too


@pytest.mark.slow
def test_the_weights_own_preprocessing_is_used_and_stored(trained):
    assert ("Preprocessing: 32 px crops, evaluation images resized to 34 px first, mean [0.485, 0.456, 0.406], std "
            "[0.229, 0.224, 0.225]: timm/resnet18.a1_in1k's own, except what you set (--image_size)"
            ) in trained["output"]["resnet"]
    assert torch.load(checkpoint_path(trained, "resnet", "checkpoint_best"))["preprocessing"] == dict(
        image_size=IMAGE_SIZE, resize_size=34, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@pytest.mark.slow
def test_backbone_lr_scale_and_layer_decay_give_the_timm_models_their_rates(trained):
    groups = torch.load(checkpoint_path(trained, "resnet", "checkpoint_latest"))["optimizer_state_dict"]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [0.001, pytest.approx(0.0001)]
    assert len(groups[0]["params"]) == 2  # fc.weight and fc.bias
    groups = torch.load(checkpoint_path(trained, "vit", "checkpoint_latest"))["optimizer_state_dict"]["param_groups"]
    scales = sorted({group["initial_lr"] / 0.001 for group in groups}, reverse=True)
    assert scales == pytest.approx([0.5 ** depth for depth in range(16)])  # 16 layers, 12 of them the blocks
    # the head: weight and bias in one group (biases apart only with --bias_weight_decay, as torchvision groups them)
    assert groups[0]["initial_lr"] == 0.001 and groups[0]["kind"] == "default" and len(groups[0]["params"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_resumed_after_the_frozen_epoch_the_run_continues_exactly(trained, run, tmp_path):
    model, _, flags = RUNS[run]
    resumed = data_flags(trained["data"], str(tmp_path), model=model, **COMMON, **flags)
    run_cli(torchrun(2, *resumed, "--resume", checkpoint_path(trained, run, "checkpoint_epoch001")),
            env=trained["env"], timeout=300)
    assert_same_run(f"{tmp_path}/checkpoints/checkpoint_latest.pth", checkpoint_path(trained, run, "checkpoint_latest"))


def validation_images(trained, preprocessing):
    paths = sorted(glob.glob(os.path.join(trained["data"]["val_dir"], "*", "*.png")))
    images = torch.stack([TF.pil_to_tensor(load_eval(path, preprocessing["image_size"], preprocessing["resize_size"]))
                          for path in paths])
    assert len(images) not in (export.EXPORT_BATCH, export.CHECK_BATCH)
    return paths, images


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("run", RUNS)
def test_exports_run_in_onnxruntime_and_torch_jit_like_pytorch(trained, run, tmp_path):
    path = checkpoint_path(trained, run, "checkpoint_best")
    checkpoint = load_checkpoint(path)
    _, images = validation_images(trained, checkpoint["preprocessing"])
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint)(normalize(images, checkpoint["preprocessing"]["mean"],
                                                               checkpoint["preprocessing"]["std"]))
    assert export.main(["--checkpoint", path, "--format", "onnx", "--output", f"{tmp_path}/model.onnx"]) == 0
    session = onnxruntime.InferenceSession(f"{tmp_path}/model.onnx", providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected.numpy(), rtol=1e-4,
                               atol=1e-4)
    assert export.main(["--checkpoint", path, "--format", "torchscript", "--output", f"{tmp_path}/model.pt"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(f"{tmp_path}/model.pt")(images), expected, rtol=1e-4, atol=1e-4)
    metadata = json.loads(open(f"{tmp_path}/model.onnx.json").read())
    assert metadata["model_name"] == RUNS[run][0] and metadata["class_names"] == list(CLASSES)


@pytest.mark.slow
def test_predict_gives_the_checkpoints_probabilities(trained, tmp_path):
    path = checkpoint_path(trained, "vit", "checkpoint_best")
    checkpoint = load_checkpoint(path)
    paths, images = validation_images(trained, checkpoint["preprocessing"])
    with torch.no_grad():
        expected = model_from_checkpoint(checkpoint)(normalize(images)).softmax(dim=1)
    assert predict.main([*paths, "--checkpoint", path, "--topk", "3", "--output", f"{tmp_path}/p.json"]) == 0
    for result, probabilities in zip(json.load(open(f"{tmp_path}/p.json")), expected):
        for prediction in result["predictions"]:
            index = checkpoint["class_names"].index(prediction["class"])
            assert prediction["probability"] == pytest.approx(probabilities[index].item(), abs=1e-6)

