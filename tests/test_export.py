"""export.py: real checkpoints from the training CLI, exported for real, run in onnxruntime and
torch.jit, compared with the checkpoint's PyTorch model on the same preprocessed validation images."""
import glob
import json
import os
import shutil
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import CLASSES, REPO, data_flags, make_tiny_data, run_cli, train_cmd
from torchvision.transforms import functional as TF

import export
from dataset import load_eval, normalize
from engine.checkpoint import load_checkpoint
from model import model_from_checkpoint

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
        return model_from_checkpoint(load_checkpoint(checkpoint_path), weights)(normalize(images))


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


def assert_refused(result, *words):
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_the_default_torchscript_output_of_a_checkpoint_named_model_pt_is_refused(trained, tmp_path):
    """The issue's repro: the default output <name>.pt of model.pt is the checkpoint itself."""
    shutil.copy(trained["tiny"], tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()
    result = run_cli(EXPORT + ["--checkpoint", "model.pt", "--format", "torchscript"], cwd=tmp_path, check=False,
                     timeout=120)
    assert_refused(result, "model.pt would replace the checkpoint", "--output model-torchscript.pt")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_an_output_that_is_the_checkpoint_under_another_spelling_is_refused_even_with_overwrite(
        trained, tmp_path, export_format):
    os.makedirs(tmp_path / "run")
    shutil.copy(trained["tiny"], tmp_path / "run" / "model.pth")
    before = (tmp_path / "run" / "model.pth").read_bytes()
    for output in ("run/model.pth", f"{tmp_path}/run/../run/model.pth"):
        result = run_cli(EXPORT + ["--checkpoint", f"{tmp_path}/run/model.pth", "--format", export_format,
                                   "--output", output, "--overwrite"], cwd=tmp_path, check=False, timeout=120)
        assert_refused(result, "would replace the checkpoint being exported")
    assert (tmp_path / "run" / "model.pth").read_bytes() == before
    assert os.listdir(tmp_path / "run") == ["model.pth"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_exporting_again_replaces_an_earlier_export(trained, tmp_path, export_format):
    output = str(tmp_path / f"model{export.SUFFIXES[export_format]}")
    for weights in ("model", "ema"):
        assert export.main(["--checkpoint", trained["tiny"], "--format", export_format, "--output", output,
                            "--weights", weights]) == 0
        assert json.loads(open(output + ".json").read())["weights"] == weights
    assert export.earlier_export(output)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(output), os.path.basename(output) + ".json"])


def test_a_file_that_no_export_wrote_is_replaced_only_with_overwrite(trained, tmp_path, capsys):
    notes, output = tmp_path / "notes.onnx", str(tmp_path / "notes.onnx")
    notes.write_text("my notes")
    flags = ["--checkpoint", trained["tiny"], "--format", "onnx", "--output", output]
    assert export.main(flags) == 2
    assert capsys.readouterr().err == (f"error: {output} exists and is not an earlier export; pass --overwrite to "
                                       "replace it, or give another --output\n")
    assert notes.read_text() == "my notes" and os.listdir(tmp_path) == ["notes.onnx"]
    assert export.main(flags + ["--overwrite"]) == 0
    assert onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"]).get_inputs()[0].name == "images"


def test_a_training_checkpoint_beside_a_stale_export_sidecar_or_a_foreign_sidecar_is_not_replaced(trained, tmp_path):
    """The sidecar alone does not make a file an export: the file itself must be one."""
    assert export.main(["--checkpoint", trained["tiny"], "--format", "torchscript",
                        "--output", str(tmp_path / "old.pt")]) == 0
    shutil.copy(trained["resnet"], tmp_path / "other_run.pt")  # another run's checkpoint, not the one exported
    shutil.copy(tmp_path / "old.pt.json", tmp_path / "other_run.pt.json")
    (tmp_path / "new.onnx.json").write_text('{"my": "settings"}')  # a user's own file where the sidecar goes
    for output in ("other_run.pt", "new.onnx"):
        before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
        export_format = "torchscript" if output.endswith(".pt") else "onnx"
        result = run_cli(EXPORT + ["--checkpoint", trained["tiny"], "--format", export_format,
                                   "--output", str(tmp_path / output)], check=False, timeout=120)
        assert_refused(result, "is not an earlier export", "--overwrite")
        assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
