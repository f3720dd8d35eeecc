"""Models: the seeds' ResNet18Animals90, a builder for any torchvision or timm classifier, and
the trained model of a checkpoint (predict.py, export.py and resume load weights the same way).

`ResNet18Animals90` subclasses torchvision's ResNet, so its state dict has torchvision's plain
key names (`conv1.weight`, ..., `fc.weight`) and the seeds' loading snippet works verbatim. The
wrappers a model is trained in (DDP, torch.compile) are taken off here too: `unwrap` for the
module, `strip_wrapper_prefixes` for a state dict.

`--model timm/NAME` is timm's model NAME (timm.create_model; timm is imported on first use, so
torchvision models need neither it nor its import time). timm sizes the head at creation and
names it (get_classifier). Models that can take any multiple of their patch size (ViTs, Swin:
timm's dynamic_img_size) are built so: one model then trains FixRes and progressive crops and
evaluates at another size, and loads weights of its architecture unchanged, their position
embeddings resampled to the image's patch grid in the forward pass; other sizes are refused in
one line (check_image_size). Their pretrained weights are timm's files on the Hugging Face hub,
in its cache (TimmWeights, pretrained_file); their preprocessing is timm's pretrained_cfg.
"""
import difflib
import math
import os
import socket
import warnings
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.transforms import InterpolationMode

from config import image_size_too_small
from core.errors import CheckpointError, ModelError, first_line

# The file name torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads into torch.hub's cache.
RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"
TIMM_PREFIX = "timm/"
# The file of a timm model's weights on the Hugging Face hub (timm reads it first, before pytorch_model.bin).
TIMM_WEIGHTS_FILE = "model.safetensors"


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def strip_wrapper_prefixes(state_dict):
    """Remove `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes, in any nesting order."""
    def clean(key):
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key
    return {clean(k): v for k, v in state_dict.items()}


def load_weights_file(path):
    """Load a local state-dict file safely (weights_only, or safetensors for a .safetensors file)
    with a clear error if it is unusable."""
    if not os.path.isfile(path):
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):  # timm's files on the Hugging Face hub
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load weights file {path}: {first_line(exc)}") from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return strip_wrapper_prefixes(state)


DOWNLOAD_TIMEOUT_S = 30  # per network operation: an offline node fails fast instead of hanging


def pretrained_entry(model_name, weights_name="DEFAULT"):
    """torchvision's weights entry for `--model NAME --pretrained WEIGHTS` (DEFAULT, or a name such
    as IMAGENET1K_V1), with its download URL and preprocessing metadata; for a timm model, its
    TimmWeights (WEIGHTS: DEFAULT or one of its tags, such as a1_in1k)."""
    if is_timm(model_name):
        return timm_pretrained_entry(model_name, weights_name)
    try:
        weights = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ModelError(f"--model {model_name} has no pretrained weights in torchvision; train it from "
                         "scratch or pass --pretrained_weights PATH") from None
    names = [name for name in weights.__members__ if name != "DEFAULT"]
    if weights_name not in weights.__members__:
        raise ModelError(f"--pretrained {weights_name}: {model_name}'s weights are DEFAULT ({weights.DEFAULT.name})"
                         f" or {', '.join(names)}")
    return weights[weights_name]


def pretrained_file(entry, download=True):
    """The weights file of `entry` in torch.hub's cache, where torchvision itself looks. Missing, it
    is downloaded there first by torch.hub (to a temporary name, its hash checked, then renamed, so
    no partial file is ever loaded), or None when `download` is off (ranks waiting for another).
    For TimmWeights, their file in the Hugging Face cache (timm_weights_file)."""
    if isinstance(entry, TimmWeights):
        return timm_weights_file(entry, download)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
    if os.path.isfile(path) or not download:
        return path if os.path.isfile(path) else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(path))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(entry.url, path, hash_prefix.group(1) if hash_prefix else None,
                                       progress=False)
    except (OSError, RuntimeError, ValueError) as exc:  # no network, a timeout, a hash mismatch
        reason = getattr(exc, "reason", None) or exc
        raise ModelError(f"cannot download {entry.url} ({first_line(reason)}); on a machine with network, "
                         f"fetch that file and put it at {path}, or pass --pretrained_weights PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def is_timm(name):
    return name.startswith(TIMM_PREFIX)


def import_timm():
    try:
        import timm
    except ImportError:
        raise ModelError("--model timm/...: timm is not installed; pip install 'timm>=1.0'") from None
    return timm


def timm_architecture(model_name):
    """timm's name of `--model timm/NAME`, refused in one line when timm has no such model or the
    name carries a weights tag (those are --pretrained's)."""
    timm = import_timm()
    name = model_name[len(TIMM_PREFIX):]
    architecture, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        raise ModelError(f"unknown timm model '{name}'; "
                         + (f"did you mean {', '.join(TIMM_PREFIX + match for match in close)}?" if close else
                            "timm.list_models() lists them"))
    if tag:
        raise ModelError(f"--model {model_name}: name the architecture, --model {TIMM_PREFIX}{architecture}, and "
                         f"its weights with --pretrained {tag}")
    return architecture


def build_timm_model(architecture, num_classes):
    """timm's model with a `num_classes`-way head, taking any multiple of its patch size where it
    can (dynamic_img_size: the module docstring)."""
    timm = import_timm()
    try:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, dynamic_img_size=True)
    except TypeError as exc:  # a model without the option: CNNs, and models of one fixed size
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(architecture, pretrained=False, num_classes=num_classes)


class TimmWeights(NamedTuple):
    """timm's pretrained weights of an architecture, under one of its tags: the weights entry of a
    timm model, read the way training reads torchvision's (str, transforms, pretrained_file)."""
    architecture: str
    tag: str
    config: object  # timm's PretrainedCfg: the weights' file on the hub and their preprocessing

    def __str__(self):
        return f"{TIMM_PREFIX}{self.architecture}.{self.tag}"

    def transforms(self):
        """The weights' evaluation transform as timm makes it: images resized to crop / crop_pct
        (rounded down), center-cropped to the input size, normalised by mean and std."""
        crop = self.config.input_size[-1]
        return SimpleNamespace(crop_size=[crop], resize_size=[math.floor(crop / self.config.crop_pct)],
                               mean=list(self.config.mean), std=list(self.config.std),
                               interpolation=InterpolationMode(self.config.interpolation))


def timm_pretrained_entry(model_name, weights_name):
    """The TimmWeights of `--model timm/NAME --pretrained WEIGHTS`: DEFAULT (timm's default tag)
    or a tag; only weights that timm fetches from the Hugging Face hub."""
    timm = import_timm()
    architecture = timm_architecture(model_name)
    configs = {config.tag: config for config in timm.models.get_arch_pretrained_cfgs(architecture).values()
               if config.hf_hub_id}
    if not configs:
        raise ModelError(f"--model {model_name} has no pretrained weights on the Hugging Face hub in timm; train it "
                         "from scratch or pass --pretrained_weights PATH")
    default = timm.models.get_pretrained_cfg(architecture).tag
    tag = default if weights_name == "DEFAULT" else weights_name
    if tag not in configs:
        raise ModelError(f"--pretrained {weights_name}: {model_name}'s weights are DEFAULT ({default}) or "
                         f"{', '.join(configs)}")
    return TimmWeights(architecture, tag, configs[tag])


def timm_weights_file(entry, download=True):
    """The weights file of `entry` in the Hugging Face cache, where timm itself looks. Missing, it
    is downloaded there first by huggingface_hub (to a temporary name, then renamed), or None when
    `download` is off. Without network the error names the file and the cache folder it goes in."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    repo = entry.config.hf_hub_id
    cached = try_to_load_from_cache(repo, TIMM_WEIGHTS_FILE)
    if isinstance(cached, str) or not download:
        return cached if isinstance(cached, str) else None
    url = hf_hub_url(repo, TIMM_WEIGHTS_FILE)
    try:
        # One try first: hf_hub_download retries a failed connection for about 25 s, logging each retry.
        get_hf_file_metadata(url, timeout=DOWNLOAD_TIMEOUT_S)
        return hf_hub_download(repo, TIMM_WEIGHTS_FILE, etag_timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as exc:  # its HTTP library's errors, which vary with its version; offline mode; a full disk
        folder = "models--" + repo.replace("/", "--")
        raise ModelError(f"cannot download {url} ({first_line(exc)}); on a machine with network, run `hf download "
                         f"{repo} {TIMM_WEIGHTS_FILE}` and copy the folder it fills, {folder} in its Hugging Face "
                         f"cache, to {os.path.join(constants.HF_HUB_CACHE, folder)}, or pass --pretrained_weights "
                         "PATH with that file") from None


class ResNet18Animals90(ResNet):
    """torchvision ResNet-18 with a `num_classes`-way head.

    `pretrained=True` starts from torchvision's ImageNet weights (IMAGENET1K_V1): from
    `weights_path` if given, else from torch.hub's cache, downloaded there once if missing. Without
    network the error names the file to fetch and where to put it.
    """

    def __init__(self, num_classes=90, pretrained=False, weights_path=None):
        super().__init__(BasicBlock, [2, 2, 2, 2])
        if pretrained:
            path = weights_path or pretrained_file(pretrained_entry("resnet18", "IMAGENET1K_V1"))
            load_backbone_weights(self, load_weights_file(path), path)
        self.fc = nn.Linear(self.fc.in_features, num_classes)


class TinyCNN(nn.Module):
    """Two conv layers, no batch norm: exact gradient-equivalence tests and per-step benchmarks."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def load_backbone_weights(model, state_dict, source):
    """Load pretrained weights into `model`. Only the classification head (the last linear layer)
    may differ in shape, and is then left as initialised; any other mismatch is an error."""
    head_keys = {f"{name}.{param}" for name in [last_linear_name(model)] for param in ("weight", "bias")}
    own = model.state_dict()
    mismatched = {k for k in own if k in state_dict and own[k].shape != state_dict[k].shape}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state_dict.items() if k not in mismatched}, strict=False)
    wrong = (mismatched | set(missing)) - head_keys
    if wrong or unexpected:
        raise ModelError(f"weights in {source} do not fit this model ({len(wrong)} tensors missing or "
                         f"of another shape, {len(unexpected)} unexpected); were they saved from another "
                         f"architecture? e.g. {sorted(wrong | set(unexpected))[:3]}")


def last_linear_name(model):
    """The classification head's name in `model` (wrapped or not): a timm model's own
    (get_classifier), else the last nn.Linear (torchvision's classifiers)."""
    get_classifier = getattr(unwrap(model), "get_classifier", None)
    head = get_classifier() if get_classifier else None
    if isinstance(head, nn.Linear):
        return next(name for name, module in model.named_modules() if module is head)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no linear head")
    return names[-1]


def replace_head(model, num_classes):
    """Swap the last nn.Linear of a torchvision classifier for a `num_classes`-way one."""
    path = last_linear_name(model).split(".")
    parent = model.get_submodule(".".join(path[:-1]))
    old = getattr(parent, path[-1])
    setattr(parent, path[-1], nn.Linear(old.in_features, num_classes))


def available_models():
    return ["tiny_cnn"] + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name, num_classes, pretrained_weights=None):
    """The model train_ddp.py trains: `resnet18` is ResNet18Animals90, `timm/NAME` timm's NAME,
    others come from torchvision."""
    if is_timm(name):
        model = build_timm_model(timm_architecture(name), num_classes)
    elif name == "resnet18":
        model = ResNet18Animals90(num_classes=num_classes, pretrained=False)
    elif name == "tiny_cnn":
        model = TinyCNN(num_classes=num_classes)
    elif name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name)
        replace_head(model, num_classes)
    else:
        raise ModelError(f"unknown model '{name}'; choose one of: {', '.join(available_models())}; or "
                         f"{TIMM_PREFIX}NAME for timm's model NAME")
    if pretrained_weights:
        load_backbone_weights(model, load_weights_file(pretrained_weights), pretrained_weights)
    return model


def checkpoint_model_name(checkpoint):
    """The --model of a loaded checkpoint (engine.checkpoint.load_checkpoint); older checkpoints
    have it only in their config."""
    return checkpoint.get("model_name") or checkpoint["config"].get("model", "resnet18")


def trained_weights(checkpoint, weights="model"):
    """A loaded checkpoint's state dict of the trained weights ("model") or of their exponential
    moving average ("ema"), with the model's own key names."""
    if weights == "model":
        return checkpoint["model_state_dict"]
    # An AveragedModel's state dict wraps the model in `module.` and counts its updates.
    state = strip_wrapper_prefixes(checkpoint["ema_state_dict"])
    state.pop("n_averaged", None)
    return state


def load_trained_weights(model, checkpoint, weights="model"):
    """Load a checkpoint's weights (trained_weights) into a built, unwrapped model; weights of
    another architecture are a CheckpointError naming the model."""
    try:
        model.load_state_dict(trained_weights(checkpoint, weights))
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit a '{checkpoint_model_name(checkpoint)}' "
                              f"model: {first_line(exc)}") from None


def model_from_checkpoint(checkpoint, weights="model"):
    """The trained model of a loaded checkpoint, on the CPU in eval mode: built as the checkpoint
    names it, for its classes, with its `weights` ("model" or "ema")."""
    model = build_model(checkpoint_model_name(checkpoint), len(checkpoint["class_names"]))
    load_trained_weights(model, checkpoint, weights)
    return model.eval()


# The size torchvision's classifiers are built for: a model that fails here too is not judged.
REFERENCE_IMAGE_SIZE = 224


def check_image_size(name, image_size):
    """Refuse an --image_size the model cannot take, naming the smallest one it can, before any
    data work. A dry forward pass on the meta device: shapes only, no memory and no compute, so it
    costs a fraction of a second. A model that cannot run on the meta device is not checked.
    A timm model is judged against the size of its weights (pretrained_cfg) and named "too small"
    only if its sizes are a threshold: a ViT takes multiples of its patch size, and its error
    says so."""
    with warnings.catch_warnings():  # the model's own construction warnings come with the real build
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = build_model(name, num_classes=2).train()
        except ModelError:  # an unknown name: refused now, before any data work
            raise
        except Exception:  # e.g. RegNet's construction copies data out of a tensor
            return
    reference = model.pretrained_cfg["input_size"][-1] if is_timm(name) else REFERENCE_IMAGE_SIZE
    error = forward_error(model, image_size)
    if error is None or forward_error(model, reference) is not None:
        return
    if image_size < reference:
        smallest = smallest_fitting_size(model, image_size, reference)
        if not is_timm(name) or forward_error(model, smallest + 1) is None:
            raise ModelError(image_size_too_small(name, image_size, smallest))
    raise ModelError(f"--image_size {image_size} does not fit {name}: {error}")


def forward_error(model, image_size):
    """None when a training batch of image_size x image_size images passes the model, else its error."""
    try:
        model(torch.empty(2, 3, image_size, image_size, device="meta"))
    except Exception as exc:
        return first_line(exc)
    return None


def smallest_fitting_size(model, failing, fitting=REFERENCE_IMAGE_SIZE):
    """Bisect between a size the model fails on and a size it takes: the smallest size it takes,
    for the models whose smallest input is a threshold (all of torchvision's CNNs)."""
    while fitting - failing > 1:
        middle = (failing + fitting) // 2
        if forward_error(model, middle) is None:
            fitting = middle
        else:
            failing = middle
    return fitting
