"""model.py: torchvision-compatible ResNet-18, offline-only pretrained weights, the model builder, timm models."""
import os
import re
import sys
import time
import urllib.request

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from conftest import data_flags, run_cli, train_cmd
from safetensors.torch import save_file

import model as model_module
from config import SMALLEST_IMAGE_SIZE
from model import (
    RESNET18_IMAGENET_FILE,
    ModelError,
    ResNet18Animals90,
    TinyCNN,
    build_model,
    check_image_size,
    last_linear_name,
    load_weights_file,
    pretrained_entry,
)


@pytest.fixture(scope="module")
def imagenet_like_weights(tmp_path_factory):
    """A torchvision resnet18 state dict (1000 classes, seeded random init) saved to a file."""
    torch.manual_seed(1234)
    state = torchvision.models.resnet18().state_dict()
    path = str(tmp_path_factory.mktemp("weights") / RESNET18_IMAGENET_FILE)
    torch.save(state, path)
    return path, state


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test instead of hanging on a machine without network."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def assert_backbone_loaded(model, state, head=("fc.weight", "fc.bias")):
    loaded = model.state_dict()
    for key, value in state.items():
        if key not in head:
            assert torch.equal(loaded[key], value), f"{key} was not loaded"


# ------------------------------------------------------------------ ResNet18Animals90

def test_resnet18_animals90_has_torchvisions_keys_and_a_90_way_head():
    model = ResNet18Animals90(num_classes=90, pretrained=False)
    reference = torchvision.models.resnet18(num_classes=90)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 90 and model.fc.in_features == 512
    for key, value in model.state_dict().items():
        assert value.shape == reference.state_dict()[key].shape, key
    assert reference.load_state_dict(model.state_dict(), strict=True).missing_keys == []
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)  # same network, same output
    assert model(x).shape == (2, 90)


def test_resnet18_pretrained_offline_is_one_clear_error_naming_the_file_and_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache; a real download attempt,
    for name in ("https_proxy", "HTTPS_PROXY"):  # through a proxy port where nothing listens: offline anywhere
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelError) as error:
        ResNet18Animals90(num_classes=90, pretrained=True)
    assert time.perf_counter() - start < model_module.DOWNLOAD_TIMEOUT_S + 5
    message = str(error.value)
    assert "--pretrained_weights" in message and RESNET18_IMAGENET_FILE in message
    assert os.path.join(str(tmp_path), "checkpoints", RESNET18_IMAGENET_FILE) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert os.listdir(tmp_path / "checkpoints") == []  # no partial file left


def test_resnet18_pretrained_loads_every_backbone_weight_and_a_fresh_head(imagenet_like_weights, no_network):
    path, state = imagenet_like_weights
    model = ResNet18Animals90(num_classes=90, pretrained=True, weights_path=path)
    assert_backbone_loaded(model, state)
    assert model.fc.weight.shape == (90, 512) and model.fc.bias.shape == (90,)
    assert not torch.equal(model.fc.weight, state["fc.weight"][:90])
    assert model.fc.weight.requires_grad


def test_resnet18_pretrained_finds_the_weights_in_torch_hubs_cache(imagenet_like_weights, monkeypatch,
                                                                   tmp_path, no_network):
    path, state = imagenet_like_weights
    os.makedirs(tmp_path / "checkpoints")
    os.symlink(path, tmp_path / "checkpoints" / RESNET18_IMAGENET_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = ResNet18Animals90(num_classes=5, pretrained=True)
    assert_backbone_loaded(model, state)
    assert model.fc.out_features == 5


# ------------------------------------------------------------------ build_model

def test_build_model_resnet18_is_resnet18_animals90_with_the_asked_head():
    model = build_model("resnet18", 7)
    assert type(model) is ResNet18Animals90 and model.fc.out_features == 7
    assert type(build_model("tiny_cnn", 4)) is TinyCNN


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_build_model_replaces_the_head_of_a_torchvision_classifier(name):
    torch.manual_seed(0)
    model = build_model(name, 7)
    reference = torchvision.models.get_model(name)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    reference_linears = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 7 and linears[-1].in_features == reference_linears[-1].in_features
    for ours, theirs in zip(linears[:-1], reference_linears[:-1]):  # only the last one changes
        assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_build_model_unknown_name_lists_the_choices():
    with pytest.raises(ModelError) as error:
        build_model("resnet_9000", 3)
    message = str(error.value)
    assert "unknown model 'resnet_9000'" in message
    for choice in ("tiny_cnn", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0"):
        assert choice in message


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_pretrained_weights_with_wrapper_prefixes_load_into_the_plain_model(tmp_path, prefix):
    torch.manual_seed(3)
    source = TinyCNN(num_classes=10).state_dict()
    path = str(tmp_path / "weights.pth")
    torch.save({prefix + key: value for key, value in source.items()}, path)
    torch.manual_seed(4)
    model = build_model("tiny_cnn", 10, pretrained_weights=path)
    assert_backbone_loaded(model, source, head=())


def test_pretrained_weights_may_be_a_training_checkpoint(tmp_path):
    torch.manual_seed(5)
    source = TinyCNN(num_classes=3).state_dict()
    path = str(tmp_path / "checkpoint_best.pth")
    torch.save(dict(model_state_dict=source, epoch=3, class_names=["a", "b", "c"], config={}), path)
    model = build_model("tiny_cnn", 6, pretrained_weights=path)  # another class count: head stays new
    assert_backbone_loaded(model, source)
    assert model.fc.out_features == 6


def test_build_model_resnet18_from_imagenet_weights_keeps_backbone_and_new_head(imagenet_like_weights):
    path, state = imagenet_like_weights
    model = build_model("resnet18", 7, pretrained_weights=path)
    assert_backbone_loaded(model, state)
    assert model.fc.out_features == 7


def test_weights_of_another_architecture_are_refused(imagenet_like_weights, tmp_path):
    path, _ = imagenet_like_weights
    tiny = str(tmp_path / "tiny.pth")
    torch.save(TinyCNN(num_classes=3).state_dict(), tiny)
    with pytest.raises(ModelError, match=re.escape(f"weights in {tiny} do not fit this model")):
        build_model("resnet18", 3, pretrained_weights=tiny)
    with pytest.raises(ModelError, match="do not fit this model"):
        build_model("mobilenet_v3_small", 3, pretrained_weights=path)
    with pytest.raises(ModelError, match="do not fit this model"):
        build_model("tiny_cnn", 3, pretrained_weights=path)


def test_weights_with_the_same_keys_but_other_layer_shapes_are_refused(tmp_path):
    # shufflenet_v2_x0_5 and _x1_0 share every key name but differ in channel widths: only
    # the head may differ in shape; a backbone that does not fit must not be skipped silently.
    path = str(tmp_path / "shufflenet_x0_5.pth")
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), path)
    with pytest.raises(ModelError, match="do not fit this model"):
        build_model("shufflenet_v2_x1_0", 7, pretrained_weights=path)


def test_unusable_weights_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="weights file not found: /nonexistent.pth"):
        build_model("tiny_cnn", 3, pretrained_weights="/nonexistent.pth")
    text = tmp_path / "weights.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(ModelError, match=re.escape(f"cannot load weights file {text}")):
        load_weights_file(str(text))
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(ModelError, match="does not hold a state dict"):
        load_weights_file(str(listing))


def test_empty_weights_file_is_a_model_error(tmp_path):
    empty = tmp_path / "empty.pth"  # e.g. an interrupted download
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=re.escape(f"cannot load weights file {empty}")):
        load_weights_file(str(empty))


# ------------------------------------------------------------------ --image_size the model can take

def test_an_image_size_the_model_cannot_take_is_refused_naming_its_smallest():
    with pytest.raises(ModelError, match=re.escape("--image_size 1 is too small for tiny_cnn: its smallest "
                                                   "input is 2 px; use --image_size 2 or more")):
        check_image_size("tiny_cnn", 1)
    with pytest.raises(ModelError, match="too small for vit_b_16: its smallest input is 224 px"):
        check_image_size("vit_b_16", 32)
    with pytest.raises(ModelError, match="--image_size 256 does not fit vit_b_16: Wrong image height"):
        check_image_size("vit_b_16", 256)  # a ViT takes exactly its own size
    rng = torch.get_rng_state()
    for name, size in [("tiny_cnn", 2), ("resnet18", 1), ("vit_b_16", 224)]:
        check_image_size(name, size)
    assert torch.equal(torch.get_rng_state(), rng)  # the dry pass draws no random numbers
    with pytest.raises(ModelError, match="unknown model 'resnet_9000'"):
        check_image_size("resnet_9000", 224)


@pytest.mark.parametrize("name, smallest", sorted(SMALLEST_IMAGE_SIZE.items()))
def test_the_launchers_table_of_smallest_sizes_agrees_with_the_dry_forward_pass(name, smallest):
    check_image_size(name, smallest)
    with pytest.raises(ModelError, match=f"too small for {name}: its smallest input is {smallest} px"):
        check_image_size(name, smallest - 1)


@pytest.mark.parametrize("model, image_size, message", [
    ("tiny_cnn", 1, "--image_size 1 is too small for tiny_cnn: its smallest input is 2 px"),  # config.py's table
    ("convnext_tiny", 16, "--image_size 16 is too small for convnext_tiny: its smallest input is 32 px")])
def test_training_cli_refuses_the_size_in_one_line_before_any_data_work(tmp_path, model, image_size, message):
    # No data folders at all: the size is refused before they are even looked at.
    data = dict(train_dir=str(tmp_path / "missing" / "train"), val_dir=str(tmp_path / "missing" / "val"))
    result = run_cli(train_cmd(*data_flags(data, str(tmp_path / "run"), model=model, image_size=image_size)),
                     check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ timm models (--model timm/NAME)

def test_a_timm_model_is_timms_own_with_the_datasets_head():
    torch.manual_seed(0)
    model = build_model("timm/resnet18", 7)
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=7)
    assert type(model) is type(reference) and last_linear_name(model) == "fc" and model.fc.out_features == 7
    assert_backbone_loaded(model, reference.state_dict(), head=())  # the same network, the same initial weights


def test_a_timm_vit_takes_any_multiple_of_its_patch_size_with_the_same_weights():
    torch.manual_seed(0)
    model = build_model("timm/vit_tiny_patch16_224", 5).eval()
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=5, dynamic_img_size=True).eval()
    assert last_linear_name(model) == "head" and model.head.out_features == 5
    assert_backbone_loaded(model, reference.state_dict(), head=())
    assert model.pos_embed.shape == (1, 197, 192)  # built for 224 px weights: 14 x 14 patches and the class token
    with torch.no_grad():
        for size in (32, 48):
            images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
            torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
            assert model(images).shape == (2, 5)


def test_last_linear_name_is_timms_classifier_also_inside_a_wrapper():
    with torch.device("meta"):
        convnext = build_model("timm/convnext_tiny", 4)
    assert last_linear_name(convnext) == "head.fc" and convnext.get_classifier() is convnext.head.fc
    assert last_linear_name(torch.optim.swa_utils.AveragedModel(convnext, device="meta")) == "module.head.fc"


def test_timm_names_are_refused_in_one_line_naming_what_to_give():
    with pytest.raises(ModelError, match=re.escape("unknown timm model 'resnet1800'; did you mean timm/resnet18")):
        build_model("timm/resnet1800", 3)
    with pytest.raises(ModelError, match=re.escape("--model timm/resnet18.a1_in1k: name the architecture, --model "
                                                   "timm/resnet18, and its weights with --pretrained a1_in1k")):
        check_image_size("timm/resnet18.a1_in1k", 32)
    with pytest.raises(ModelError, match=re.escape("or timm/NAME for timm's model NAME")):
        build_model("resnet_9000", 3)


def test_without_timm_installed_a_timm_model_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ModelError, match=re.escape("timm is not installed; pip install 'timm>=1.0'")):
        build_model("timm/resnet18", 3)
    assert isinstance(build_model("tiny_cnn", 3), TinyCNN)  # the other models do not need it


@pytest.mark.parametrize("name, image_size, message", [
    pytest.param("timm/vit_tiny_patch16_224", 33, "--image_size 33 does not fit timm/vit_tiny_patch16_224: Input "
                 "height (33) should be divisible by patch size (16).", id="vit-not-a-multiple-of-its-patch"),
    pytest.param("timm/vit_tiny_patch16_224", 8, "--image_size 8 does not fit timm/vit_tiny_patch16_224: Input "
                 "height (8) should be divisible by patch size (16).", id="vit-under-one-patch"),
    pytest.param("timm/mixer_b16_224", 32, "--image_size 32 does not fit timm/mixer_b16_224: Input height (32) "
                 "doesn't match model (224).", id="fixed-size-model"),  # no dynamic_img_size: one size only
    pytest.param("timm/convnext_tiny", 16, "--image_size 16 is too small for timm/convnext_tiny: its smallest input "
                 "is 32 px; use --image_size 32 or more", id="cnn-under-its-smallest")])
def test_an_image_size_a_timm_model_cannot_take_is_refused_naming_what_it_takes(name, image_size, message):
    with pytest.raises(ModelError) as error:
        check_image_size(name, image_size)
    assert str(error.value) == message


def test_the_image_sizes_a_timm_model_takes_pass_the_check():
    for name, size in [("timm/vit_tiny_patch16_224", 16), ("timm/vit_tiny_patch16_224", 32),
                       ("timm/vit_tiny_patch16_224", 384), ("timm/mixer_b16_224", 224), ("timm/convnext_tiny", 32),
                       ("timm/resnet18", 1)]:
        check_image_size(name, size)


def test_timm_weights_by_tag_with_their_own_preprocessing():
    default = pretrained_entry("timm/resnet18")
    assert str(default) == "timm/resnet18.a1_in1k"  # timm's default tag for resnet18
    transform = default.transforms()  # timm's: crop 224, crop_pct 0.95, ImageNet's mean and std, bicubic
    assert (transform.crop_size, transform.resize_size) == ([224], [235])  # floor(224 / 0.95)
    assert transform.mean == [0.485, 0.456, 0.406] and transform.std == [0.229, 0.224, 0.225]
    assert transform.interpolation == torchvision.transforms.InterpolationMode.BICUBIC
    vit = pretrained_entry("timm/vit_tiny_patch16_224", "augreg_in21k").transforms()
    assert (vit.crop_size, vit.resize_size, vit.mean, vit.std) == ([224], [248], [0.5] * 3, [0.5] * 3)  # pct 0.9
    with pytest.raises(ModelError, match=re.escape("--pretrained IMAGENET1K_V1: timm/resnet18's weights are DEFAULT "
                                                   "(a1_in1k) or a1_in1k, a2_in1k, a3_in1k, tv_in1k,")):
        pretrained_entry("timm/resnet18", "IMAGENET1K_V1")
    with pytest.raises(ModelError, match="--model timm/gcvit_xxtiny has no pretrained weights on the Hugging Face hub"):
        pretrained_entry("timm/gcvit_xxtiny")  # timm has them only at a URL of its own, outside the hub


def timm_resnet18_weights(path, seed=7):
    """timm's resnet18 with ImageNet's 1000 classes, seeded, saved as timm's files on the hub are."""
    torch.manual_seed(seed)
    state = timm.create_model("resnet18").state_dict()
    save_file(state, path)
    return state


def test_timm_weights_from_a_safetensors_file_keep_the_backbone_and_get_a_new_head(tmp_path):
    state = timm_resnet18_weights(str(tmp_path / "model.safetensors"))
    model = build_model("timm/resnet18", 3, pretrained_weights=str(tmp_path / "model.safetensors"))
    assert_backbone_loaded(model, state)
    assert model.fc.weight.shape == (3, 512) and not torch.equal(model.fc.weight, state["fc.weight"][:3])


def test_a_timm_training_checkpoint_is_starting_weights_and_weights_of_another_model_are_refused(tmp_path):
    torch.manual_seed(8)
    trained = build_model("timm/resnet18", 3).state_dict()
    torch.save(dict(model_state_dict={"module." + key: value for key, value in trained.items()}), tmp_path / "c.pth")
    model = build_model("timm/resnet18", 3, pretrained_weights=str(tmp_path / "c.pth"))
    assert_backbone_loaded(model, trained, head=())  # the same classes: the head too
    with pytest.raises(ModelError, match="do not fit this model"):
        build_model("timm/vit_tiny_patch16_224", 3, pretrained_weights=str(tmp_path / "c.pth"))
