"""export.py: real checkpoints from the training CLI, exported for real, run in onnxruntime and
torch.jit, compared with the checkpoint's PyTorch model on the same preprocessed validation images."""
import glob
import json
import os
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from torchvision.transforms import functional as TF

import export
from checkpoint import load_checkpoint
from conftest import CLASSES, REPO, data_flags, make_tiny_data, run_cli, train_cmd
from dataset import load_eval, normalize
from predict import load_model

EXPORT = [sys.executable, os.path.join(REPO, "export.py")]
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The conftest tiny dataset, a tiny_cnn checkpoint with EMA weights and a resnet18 one without."""
    root = tmp_path_factory.mktemp("export")
    data = make_tiny_data(str(root))
    run_cli(train_cmd(*data_flags(data, f"{root}/tiny", model="tiny_cnn", use_ema=True, ema_decay=0.5)))
    run_cli(train_cmd(*data_flags(data, f"{root}/resnet", image_size=IMAGE_SIZE)))  # the default model
    return dict(data, tiny=f"{root}/tiny/checkpoints/checkpoint_best.pth",
                resnet=f"{root}/resnet/checkpoints/checkpoint_best.pth")


def validation_batch(val_dir):
    """All 8 validation images as predict.py preprocesses them: a uint8 batch, not the export's size."""
    paths = sorted(glob.glob(os.path.join(val_dir, "*", "*.png")))
    images = torch.stack([TF.pil_to_tensor(load_eval(path, IMAGE_SIZE)) for path in paths])
    assert len(images) != export.EXPORT_BATCH
    return images


def pytorch_logits(checkpoint_path, weights, images):
    with torch.no_grad():
        return load_model(load_checkpoint(checkpoint_path), weights, torch.device("cpu"))(normalize(images))


def check_metadata(metadata, weights):
    assert metadata["class_names"] == list(CLASSES)
    assert (metadata["image_size"], metadata["resize_size"], metadata["weights"]) == (IMAGE_SIZE, 18, weights)
    assert metadata["mean"] == [0.485, 0.456, 0.406] and metadata["std"] == [0.229, 0.224, 0.225]


@pytest.mark.parametrize("model, weights", [("tiny", "model"), ("tiny", "ema"), ("resnet", "model")])
def test_onnx_runs_in_onnxruntime_like_pytorch(trained, tmp_path, model, weights):
    output = str(tmp_path / "model.onnx")
    assert export.main(["--checkpoint", trained[model], "--format", "onnx", "--output", output,
                        "--weights", weights]) == 0
    images = validation_batch(trained["val_dir"])
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(logits, pytorch_logits(trained[model], weights, images).numpy(), rtol=1e-4, atol=1e-4)
    if weights == "ema":  # the EMA weights, not the model's, went into the file
        assert not np.allclose(logits, pytorch_logits(trained[model], "model", images).numpy(), atol=1e-3)
    sidecar = json.loads(open(output + ".json").read())
    embedded = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    assert embedded == sidecar
    check_metadata(sidecar, weights)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.json"]  # no staging left behind


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("model", ["tiny", "resnet"])
def test_torchscript_runs_in_torch_jit_like_pytorch(trained, model):
    assert export.main(["--checkpoint", trained[model], "--format", "torchscript"]) == 0
    output = trained[model].replace(".pth", ".pt")  # the default: next to the checkpoint
    extra_files = {export.TORCHSCRIPT_METADATA_FILE: ""}
    scripted = torch.jit.load(output, _extra_files=extra_files)
    images = validation_batch(trained["val_dir"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), pytorch_logits(trained[model], "model", images),
                                   rtol=1e-4, atol=1e-4)
    embedded = json.loads(extra_files[export.TORCHSCRIPT_METADATA_FILE])
    assert embedded == json.loads(open(output + ".json").read())
    check_metadata(embedded, "model")


BAD_INPUTS = {  # case: (the flags it replaces, {tmp} standing for the test's folder; words of its error)
    "missing checkpoint": ({"--checkpoint": "{tmp}/absent.pth"}, "checkpoint not found"),
    "not a checkpoint": ({"--checkpoint": "{tmp}/notes.txt"}, "is not a readable PyTorch checkpoint"),
    "unknown format": ({"--format": "tflite"}, "invalid choice: 'tflite'"),
    "missing output folder": ({"--output": "{tmp}/absent/model.onnx"}, "cannot write"),
    "EMA weights of a run without EMA": ({"--weights": "ema"}, "has no EMA weights"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_no_file(trained, tmp_path, case):
    replaced, expected = BAD_INPUTS[case]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    flags = {"--checkpoint": trained["resnet"], "--format": "onnx", "--output": f"{tmp_path}/model.onnx",
             "--weights": "model"}
    flags.update({flag: value.format(tmp=tmp_path) for flag, value in replaced.items()})
    result = run_cli(EXPORT + [item for pair in flags.items() for item in pair], check=False, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["notes.txt"]  # no output, no sidecar, no staging folder
