"""Export a training checkpoint's model to ONNX or TorchScript, with its classes and preprocessing.

    python export.py --checkpoint checkpoints/checkpoint_best.pth --format onnx [--output F] [--weights ema]

The exported model takes uint8 RGB images, NCHW, any batch size, already resized (shorter side to
`resize_size`) and center-cropped to `image_size` x `image_size`, and returns float32 logits in
`class_names` order. The run's normalisation (dataset.normalize with the checkpoint's mean and
std, SCHEMA's "preprocessing") is inside the graph: a deployment only decodes, resizes and crops,
and cannot get the mean/std, the channel order or the 0-255 vs 0-1 scale wrong; uint8 input is
also a quarter of float32's size. The same batch fed to the checkpoint's PyTorch model after that
normalisation gives the same logits.

Metadata (class_names, model_name, weights, image_size, resize_size, mean, std, input, output)
goes into the file itself, in ONNX's metadata_props (each value JSON-encoded) or TorchScript's
extra file `metadata.json`, and into a sidecar `<output>.json`. Both files are written durably
under temporary names and renamed (core.files), so a failed export leaves no partial file. They
never replace the checkpoint itself (under whatever name), nor, without --overwrite, a file that no
export wrote.

ONNX uses torch's default (dynamo) exporter, which needs the `onnx` and `onnxscript` packages
(requirements-dev.txt). TorchScript uses torch.jit.trace: torch deprecates TorchScript, but it
still loads with a bare `torch.jit.load` and no project code. Every model is traced, timm's too
(--model timm/NAME): tracing needs no TorchScript-compatible Python in the model, and fixes the
one image size the export takes, which is what a timm ViT's position embeddings are resampled
for (model.py).
"""
import importlib.util
import json
import os
import sys
import warnings
import zipfile

import torch

from core.cli import Parser, run_command
from core.errors import CheckpointError, ModelError, UsageError, first_line
from core.files import atomic_path, write_json_atomic
from dataset import normalization_constants
from engine.checkpoint import checkpoint_preprocessing, load_checkpoint
from model import checkpoint_model_name, model_from_checkpoint

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
TORCHSCRIPT_METADATA_FILE = "metadata.json"
# Batch sizes of the example input and of the check that the batch dimension stayed dynamic. Not 1:
# torch.export specialises a dimension of size 1 to a constant.
EXPORT_BATCH, CHECK_BATCH = 2, 3
# What marks a previous export: its sidecar's keys (export_metadata's), and an ONNX model's first
# byte (ModelProto's ir_version field, which protobuf writes first) or a TorchScript archive's metadata.
EXPORT_KEYS = frozenset({"class_names", "model_name", "weights", "input", "output"})
ONNX_START = b"\x08"


class NormalizingClassifier(torch.nn.Module):
    """uint8 NCHW images in, logits out: training's own normalisation, then the classifier. A
    --multi_label model gives each class's sigmoid probability instead (`multi_label`)."""

    def __init__(self, model, mean, std, multi_label=False):
        super().__init__()
        self.model, self.multi_label = model, multi_label
        # dataset.normalize's constants as buffers, taken eagerly: calling normalize inside the export
        # would fill its lru_cache with the exporter's fake tensors.
        scale, shift = normalization_constants(torch.device("cpu"), torch.float32, tuple(mean), tuple(std))
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, images):
        logits = self.model(torch.addcmul(self.shift, images.to(torch.float32), self.scale))  # = normalize(images)
        return torch.sigmoid(logits) if self.multi_label else logits


def build_parser():
    parser = Parser(description="Export a training checkpoint's model to ONNX or TorchScript, "
                                "with its class names and preprocessing.", allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_ddp.py")
    parser.add_argument("--format", required=True, choices=tuple(SUFFIXES))
    parser.add_argument("--output", default=None,
                        help="the exported file (default: next to the checkpoint, <checkpoint name>.onnx or .pt); "
                             "its metadata also goes to <output>.json")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="the trained weights, or their exponential moving average (--use_ema runs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file that is not an earlier export (never the checkpoint)")
    return parser


def default_output(checkpoint_path, export_format):
    return os.path.splitext(checkpoint_path)[0] + SUFFIXES[export_format]


def check_output(checkpoint_path, output, export_format, overwrite):
    """Refuse an output whose writing would lose a file: the checkpoint (under any name, link or
    spelling), or without `overwrite` an existing file that is not an earlier export."""
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder; give a file name")
    for path in (output, output + ".json"):
        if os.path.exists(path) and os.path.exists(checkpoint_path) and os.path.samefile(path, checkpoint_path):
            other = os.path.splitext(output)[0] + f"-{export_format}{SUFFIXES[export_format]}"
            raise UsageError(f"writing {path} would replace the checkpoint being exported; give the export "
                             f"another name, e.g. --output {other}")
    if overwrite or earlier_export(output):
        return
    for path in (output, output + ".json"):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists and is not an earlier export; pass --overwrite to replace it, "
                             "or give another --output")


def earlier_export(output):
    """Whether `output` and its sidecar hold an earlier export: the sidecar is an export's metadata and
    the file (if any) an ONNX model or a TorchScript archive with its metadata, which a training
    checkpoint (a zip without it) that happens to lie beside a stale sidecar is not."""
    try:
        with open(output + ".json") as f:
            sidecar = json.load(f)
        if not (isinstance(sidecar, dict) and EXPORT_KEYS <= sidecar.keys()):
            return False
        if not os.path.lexists(output):
            return True
        if zipfile.is_zipfile(output):
            with zipfile.ZipFile(output) as archive:
                return any(name.endswith("/extra/" + TORCHSCRIPT_METADATA_FILE) for name in archive.namelist())
        with open(output, "rb") as f:
            return f.read(1) == ONNX_START
    except (OSError, ValueError, zipfile.BadZipFile):  # unreadable, not JSON, a damaged zip: not ours to replace
        return False


def export_metadata(checkpoint, weights):
    """What a deployment needs besides the graph: the label names and the preprocessing."""
    preprocessing = checkpoint_preprocessing(checkpoint)
    image_size = preprocessing["image_size"]
    metadata = dict(
        class_names=list(checkpoint["class_names"]),
        model_name=checkpoint_model_name(checkpoint),
        weights=weights, **preprocessing,
        input=f"uint8 RGB, NCHW, N x 3 x {image_size} x {image_size}: the shorter side resized to resize_size, "
              "then center-cropped; mean/std are applied inside the model (on 0-1 scaled pixels)",
        output="float32 logits, N x len(class_names), in class_names order")
    if checkpoint["config"].get("multi_label"):
        metadata.update(
            multi_label=True, thresholds=(checkpoint.get("ema_thresholds" if weights == "ema" else "thresholds")
                                          or [0.5] * len(checkpoint["class_names"])),
            output="float32 sigmoid probabilities, N x len(class_names), in class_names order; an image has "
                   "the classes whose probability is at least their entry of thresholds (tuned on validation)")
    return metadata


def example_images(image_size, batch):
    return torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def write_onnx(model, images, metadata, path):
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:  # torch's exporter would fail with an ImportError deep inside
        raise UsageError(f"--format onnx needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(model, (images,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False)
    except Exception as exc:  # e.g. data-dependent control flow that torch.export cannot capture
        raise ModelError(f"'{metadata['model_name']}' cannot be exported to ONNX: {first_line(exc)}") from None
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.save(path, external_data=False)  # one self-contained file (models under ONNX's 2 GB limit)


def write_torchscript(model, images, metadata, path):
    with warnings.catch_warnings():
        # torch.jit's deprecation notices: TorchScript is what --format torchscript asks for.
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
        # Python values the trace fixes (a timm ViT's patch grid): the export takes one image size, and
        # the batch size, the one dimension left free, is checked below.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(model, images)
        except Exception as exc:
            raise ModelError(f"'{metadata['model_name']}' cannot be traced to TorchScript: {first_line(exc)}") from None
        check_images = example_images(metadata["image_size"], CHECK_BATCH)
        # Tracing freezes Python control flow and shapes silently: another batch size must still agree.
        if not torch.allclose(traced(check_images), model(check_images), rtol=1e-4, atol=1e-4):
            raise ModelError(f"'{metadata['model_name']}' cannot be exported to TorchScript: the traced model "
                             "disagrees with the model on another batch size (control flow depends on the input)")
        torch.jit.save(traced, path, _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript}


def export(checkpoint, export_format, weights, output):
    """Write the exported model to `output` and its metadata to `output`.json, each durably under a
    temporary name and then renamed into place (core.files.atomic_path), so a failure leaves no
    partial file. The model's temporary file is created first: an unwritable place fails before
    the export's work."""
    if weights == "ema" and "ema_state_dict" not in checkpoint:
        raise CheckpointError("--weights ema: the checkpoint has no EMA weights (it was trained without "
                              "--use_ema); use --weights model")
    metadata = export_metadata(checkpoint, weights)
    model = NormalizingClassifier(model_from_checkpoint(checkpoint, weights), metadata["mean"], metadata["std"],
                                  metadata.get("multi_label", False)).eval()
    with atomic_path(output) as staged_model:
        open(staged_model, "wb").close()
        with torch.no_grad():
            WRITERS[export_format](model, example_images(metadata["image_size"], EXPORT_BATCH), metadata,
                                   staged_model)
    write_json_atomic(output + ".json", metadata, indent=1)
    return metadata


def run(argv):
    args = build_parser().parse_args(argv)
    output = args.output or default_output(args.checkpoint, args.format)
    check_output(args.checkpoint, output, args.format, args.overwrite)
    checkpoint = load_checkpoint(args.checkpoint)
    try:
        metadata = export(checkpoint, args.format, args.weights, output)
    except OSError as exc:  # a missing or read-only folder, a full disk: one line naming the output
        raise OSError(f"cannot write {output}: {exc.strerror or first_line(exc)}") from None
    print(f"exported {metadata['model_name']} ({len(metadata['class_names'])} classes, {args.weights} weights) "
          f"to {output}, metadata in {output}.json")


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
