"""Classify images with a training checkpoint; model, classes and image size all come from it.

    python predict.py --checkpoint checkpoints/checkpoint_best.pth photo.jpg photos/ --output preds.csv

Images take training's validation path (load_eval, normalize), so a validation image gets the
probabilities `evaluate` computed for it. `--tta flip` or `--tta multi_crop` average the softmax
over views of each image as evaluate.py does (metrics.tta_views, metrics.tta_log_probabilities).
An unreadable image is reported and listed with its error.
"""
import csv
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from core.cli import Parser, run_command
from core.errors import UsageError, first_line
from dataset import normalize
from engine.checkpoint import checkpoint_preprocessing, load_checkpoint
from engine.metrics import TTA_MODES, tta_log_probabilities, tta_views
from inputs.folders import find_files
from model import model_from_checkpoint


def build_parser(with_ema):
    parser = Parser(description="Classify images (files, or folders searched recursively) with a "
                                "training checkpoint.", allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_ddp.py")
    parser.add_argument("--topk", type=int, default=5, help="classes shown per image (at most all classes)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--output", default=None, help="also write predictions to a .csv or .json file")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation: the mean softmax of the image and its mirror (flip), or of "
                             "the four corner and the center crops of the resized image (multi_crop)")
    if with_ema:  # only checkpoints that carry EMA weights offer the choice
        parser.add_argument("--weights", choices=("model", "ema"), default="model",
                            help="the trained weights, or their exponential moving average")
    return parser


def parse_args(argv):
    """The checkpoint decides which flags exist (--weights), so it is loaded before the full parse."""
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--checkpoint")
    known, _ = pre.parse_known_args(argv)
    checkpoint = load_checkpoint(known.checkpoint) if known.checkpoint else None
    args = build_parser(checkpoint is not None and "ema_state_dict" in checkpoint).parse_args(argv)
    if args.topk < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--topk and --batch_size must be at least 1, --num_workers at least 0")
    if args.output and os.path.splitext(args.output)[1].lower() not in (".csv", ".json"):
        raise UsageError(f"--output {args.output}: unknown format; use a name ending in .csv or .json")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):  # fail before inference
        raise UsageError(f"--output {args.output}: its folder does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu")
    return args, checkpoint


def find_images(inputs):
    """Files as given (any extension: the user named them), folders searched for image extensions
    as training searches its class folders (folders.find_files, which warns about what it skips)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found, skipped = find_files(item, IMG_EXTENSIONS)
            for warning in skipped:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        elif os.path.exists(item):  # reading a FIFO would wait forever
            raise UsageError(f"input {item} is not a regular file or a folder")
        else:
            raise UsageError(f"input not found: {item}")
    if not paths:
        raise UsageError(f"no images found in {', '.join(inputs)} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return paths


class ImageFiles(Dataset):
    """Any image paths through validation's own load_eval (metrics.tta_views: with multi_crop, its
    five crops), so preprocessing cannot drift from it."""

    def __init__(self, paths, preprocessing, tta="none"):
        self.paths, self.preprocessing, self.tta = paths, preprocessing, tta

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, tta_views(self.paths[index], self.preprocessing, self.tta), None
        except Exception as exc:  # one broken file must not cost the other predictions
            return index, None, first_line(exc)


def collate(batch):
    """Indices and a stacked uint8 batch of the readable images; {index: error} of the others."""
    readable = [(i, image) for i, image, _ in batch if image is not None]
    images = torch.stack([image for _, image in readable]) if readable else None
    return [i for i, _ in readable], images, {i: error for i, _, error in batch if error is not None}


@torch.no_grad()
def predict(model, paths, class_names, preprocessing, args, device, thresholds=None):
    """One result per path: {path, predictions: [{class, probability}] best first} or {path, error}.
    `preprocessing` is the checkpoint's (checkpoint_preprocessing): the run's own evaluation transform.
    With `thresholds` (a --multi_label checkpoint's, per class) the probabilities are each class's
    sigmoid, and each result also lists `labels`: the classes at or above their threshold."""
    results = [None] * len(paths)
    topk = min(args.topk, len(class_names))
    loader = DataLoader(ImageFiles(paths, preprocessing, args.tta), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=collate, pin_memory=device.type == "cuda")
    for indices, images, errors in loader:
        for i, error in errors.items():
            print(f"warning: cannot read image {paths[i]} ({error})", file=sys.stderr, flush=True)
            results[i] = dict(path=paths[i], predictions=[], error=error)
        if images is None:
            continue
        # float32, as validation without --use_amp: probabilities must not depend on autocast.
        images = normalize(images.to(device, non_blocking=True), preprocessing["mean"], preprocessing["std"])
        if thresholds is None:
            probs = tta_log_probabilities(model, images, args.tta).exp()
        else:
            probs = torch.sigmoid(model(images).float())
        top_p, top_i = probs.topk(topk, dim=1)
        for i, p_row, i_row, all_p in zip(indices, top_p.tolist(), top_i.tolist(), probs.tolist()):
            results[i] = dict(path=paths[i], predictions=[
                {"class": class_names[c], "probability": p} for c, p in zip(i_row, p_row)])
            if thresholds is not None:
                results[i]["labels"] = [name for name, p, t in zip(class_names, all_p, thresholds) if p >= t]
    return results


def print_table(results):
    width = max(len(r["path"]) for r in results)
    for r in results:
        cells = [f"{p['class']}:{p['probability']:.4f}" for p in r["predictions"]]
        labels = f"  labels: {', '.join(r['labels']) or '-'}" if "labels" in r else ""
        print(f"{r['path']:<{width}}  {'ERROR: ' + r['error'] if 'error' in r else '  '.join(cells) + labels}")


def write_output(results, path):
    with open(path, "w", newline="") as f:
        if path.lower().endswith(".json"):
            json.dump(results, f, indent=1)
            return
        writer = csv.writer(f)
        multi_label = any("labels" in r for r in results)  # then a column says which classes the image has
        writer.writerow(["path", "rank", "class", "probability", "error"] + (["label"] if multi_label else []))
        for r in results:
            if "error" in r:
                writer.writerow([as_text_cell(r["path"]), "", "", "", as_text_cell(r["error"])] + [""] * multi_label)
            for rank, p in enumerate(r["predictions"], start=1):
                has = [int(p["class"] in r["labels"])] if multi_label else []
                writer.writerow([as_text_cell(r["path"]), rank, as_text_cell(p["class"]), repr(p["probability"]), ""]
                                + has)


# A spreadsheet reads a cell starting with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def as_text_cell(text):
    """A path, class name or error for the CSV: one starting like a formula gets a leading single
    quote, which spreadsheets show as text (the OWASP rule). The JSON output keeps every string exact."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def run(argv):
    args, checkpoint = parse_args(argv)
    paths = find_images(args.inputs)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    # load_checkpoint maps to the CPU; the model then moves to the chosen device once.
    model = model_from_checkpoint(checkpoint, getattr(args, "weights", "model")).to(device)
    thresholds = None
    if checkpoint["config"].get("multi_label"):
        if args.tta != "none":
            raise UsageError("--tta averages softmax views of one-label checkpoints; this checkpoint is --multi_label")
        weights = getattr(args, "weights", "model")
        thresholds = (checkpoint.get("ema_thresholds" if weights == "ema" else "thresholds")
                      or [0.5] * len(checkpoint["class_names"]))
    results = predict(model, paths, checkpoint["class_names"], checkpoint_preprocessing(checkpoint), args, device,
                      thresholds)
    print_table(results)
    if args.output:
        write_output(results, args.output)  # an unwritable --output: one error line (cli.run_command)


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
