"""Score a training checkpoint on a labelled image set: loss, top-1 (and top-5) accuracy, macro-F1,
balanced accuracy, per-class precision, recall and F1, and the confusion matrix.

    python evaluate.py --checkpoint checkpoints/checkpoint_best.pth --data_dir data/test --output results.json
    torchrun --nproc_per_node=2 evaluate.py --checkpoint checkpoints/checkpoint_best.pth --data_dir data/test

The numbers are training's exact validation (metrics.evaluate_classes): each process scores an
unpadded shard of the images, and one all-reduce of per-image vectors gives every process the same
per-image results, summed in one order, so 1 and N processes report the same numbers. Images take
the checkpoint's evaluation transform (its "preprocessing"), as predict.py's do, with the test-time
augmentation of --tta (metrics.tta_views opens each file, so multi_crop can crop the resized image).
Labels are the checkpoint's class indices: the data's classes must be classes of the checkpoint,
and may be only some of them.

Every check runs before the process group starts and gives the same answer on every process, so
rank 0 alone reports a refusal (one `error:` line, exit 2). Rank 0 prints the report and writes
--output: a JSON file (the metrics, the per-class table, the confusion matrix, every image's
prediction) and the matrix's picture beside it (<output>_confusion.png, utils.plot_confusion).
"""
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from config import default_num_workers
from core.cli import Parser, run_command
from core.errors import USER_ERRORS, CheckpointError, DataError, UsageError
from core.files import write_json_atomic
from dataset import UNREADABLE, collate_readable
from engine.batches import BatchStage
from engine.checkpoint import checkpoint_preprocessing, load_checkpoint
from engine.distributed import is_peer_loss, setup_distributed, teardown_distributed, validation_shard
from engine.metrics import TTA_MODES, balanced_accuracy, evaluate_classes, macro_f1, per_class_metrics, tta_views
from inputs.folders import class_folders, find_files
from inputs.label_files import read_label_file
from model import checkpoint_model_name, model_from_checkpoint
from utils import plot_confusion


def build_parser():
    parser = Parser(description="Score a training checkpoint on a labelled ImageFolder set (one folder per class): "
                                "loss, accuracy, macro-F1, balanced accuracy, per-class metrics, confusion matrix. "
                                "Run it with torchrun to share the images among processes.", allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train_ddp.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="ImageFolder root: <class_name>/<images>, classes of the checkpoint "
                                           "(some or all)")
    source.add_argument("--csv", default=None, metavar="FILE",
                        help="a label file instead (as train_ddp.py's --train_csv: a header, then image,label rows)")
    parser.add_argument("--image_root", default=None, metavar="DIR",
                        help="--csv: the folder its image paths are relative to (default: the file's own folder)")
    parser.add_argument("--image_column", default="image", help="--csv: the column holding image paths")
    parser.add_argument("--label_column", default="label", help="--csv: the column holding labels")
    parser.add_argument("--output", default=None, metavar="FILE.json",
                        help="also write the results as JSON, and the confusion matrix as FILE_confusion.png")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="the trained weights, or their exponential moving average (--use_ema runs)")
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation: the mean softmax of the image and its mirror (flip), or of "
                             "the four corner and the center crops of the resized image (multi_crop)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch, per process")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader workers per process (default: the usable cores shared among the processes "
                             "of this machine, 1 to 4)")
    return parser


def prepare(argv):
    """(args, checkpoint, model, samples): everything checked before any image is scored. The same
    on every process: the flags, the checkpoint, its weights and the data's classes."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        raise UsageError("--batch_size must be at least 1, --num_workers at least 0")
    if args.num_workers is None:
        args.num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if args.output and not args.output.lower().endswith(".json"):
        raise UsageError(f"--output {args.output}: use a name ending in .json (the confusion matrix goes beside it)")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"--output {args.output}: its folder does not exist")
    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint["config"].get("multi_label"):
        raise CheckpointError(f"{args.checkpoint} was trained with several labels per image (--multi_label); "
                              "evaluate.py scores checkpoints of one label per image (a softmax over the classes)")
    if args.weights == "ema" and "ema_state_dict" not in checkpoint:
        raise CheckpointError(f"--weights ema: {args.checkpoint} has no EMA weights (it was trained without "
                              "--use_ema); use --weights model")
    model = model_from_checkpoint(checkpoint, args.weights)
    if args.csv:
        labelled = read_label_file(args.csv, "--csv", args.image_root, args.image_column, args.label_column)
        data_classes, pairs = labelled.classes, labelled.samples
    else:
        data_classes, pairs = folder_samples(args.data_dir)
    samples = checkpoint_labels(pairs, data_classes, checkpoint["class_names"], args.csv or args.data_dir)
    return args, checkpoint, model, samples


def folder_samples(data_dir):
    """(class folder names, [(path, class name)]) of an ImageFolder root in ImageFolder's order,
    walked as training walks its class folders (folders.find_files); rank 0 prints the warnings.
    A class folder without images is fine (its class gets no support); no image at all is not."""
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir}: {'not a folder' if os.path.exists(data_dir) else 'folder not found'}")
    classes, pairs = class_folders(data_dir, "data"), []
    for name in classes:
        paths, skipped = find_files(os.path.join(data_dir, name), IMG_EXTENSIONS)
        pairs += [(path, name) for path in paths]
        if os.environ.get("RANK", "0") == "0":
            for warning in skipped:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    if not pairs:
        raise DataError(f"no images in the class folders of {data_dir} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return classes, pairs


def checkpoint_labels(pairs, data_classes, class_names, source):
    """[(path, the checkpoint's index of its class)]; a class the checkpoint does not have is refused."""
    label_of = {name: label for label, name in enumerate(class_names)}
    unknown = [name for name in data_classes if name not in label_of]
    if unknown:
        raise DataError(f"{source} has classes the checkpoint was not trained on: {listed(unknown)}; the checkpoint's "
                        f"classes are {listed(class_names)} (the data may hold some of them, not others)")
    return [(path, label_of[name]) for path, name in pairs]


def listed(names, shown=5):
    """The first few names, and how many more: a refusal stays one line with 1,000 classes."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class LabelledImages(Dataset):
    """(uint8 views, label, index) of (path, label) samples: metrics.tta_views under the checkpoint's
    preprocessing. An unreadable image is a DataError naming it."""

    def __init__(self, samples, preprocessing, tta):
        self.samples, self.preprocessing, self.tta = samples, preprocessing, tta

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return tta_views(path, self.preprocessing, self.tta), label, index
        except UNREADABLE as exc:
            raise DataError(f"cannot read image {path} ({exc}); fix or remove it") from None


def score(model, samples, preprocessing, args, ctx):
    """The Evaluation (metrics.evaluate_classes) of every sample, this process scoring its shard."""
    images = LabelledImages(samples, preprocessing, args.tta)
    shard = Subset(images, validation_shard(len(images), ctx.rank, ctx.world_size))
    loader = DataLoader(shard, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_readable, pin_memory=ctx.device.type == "cuda")
    # evaluate_classes takes a run's batch stage and autocast dtype: the checkpoint's normalisation, float32.
    stage = BatchStage(ctx.device, tuple(preprocessing["mean"]), tuple(preprocessing["std"]), torch.contiguous_format)
    pieces = SimpleNamespace(stage=stage, amp_dtype=torch.float32)
    try:
        return evaluate_classes(model.to(ctx.device), loader, len(images), pieces, ctx, args.batch_size, use_amp=False,
                                tta=args.tta)
    except DataError as exc:
        message = str(exc).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: its last line is the message
            raise DataError(message.splitlines()[-1].split(": ", 1)[-1]) from None
        raise


def results(evaluation, checkpoint, samples, args):
    """The report as plain data: what was scored and how, the metrics (in %, loss in nats), the
    per-class table, the confusion matrix (rows: true class) and every image's prediction."""
    class_names = checkpoint["class_names"]
    per_class = per_class_metrics(evaluation.confusion)
    return dict(
        checkpoint=args.checkpoint, checkpoint_epoch=checkpoint.get("epoch"),
        model_name=checkpoint_model_name(checkpoint), weights=args.weights, tta=args.tta,
        preprocessing=checkpoint_preprocessing(checkpoint), data_dir=args.csv or args.data_dir, images=len(samples),
        loss=evaluation.loss, accuracy=evaluation.acc, top5_accuracy=evaluation.acc5,
        macro_f1=macro_f1(evaluation.confusion), balanced_accuracy=balanced_accuracy(evaluation.confusion),
        class_names=list(class_names), confusion_matrix=evaluation.confusion.tolist(),
        per_class=[dict(name=name, support=entry["images"], predicted=entry["predicted"], correct=entry["correct"],
                        precision=entry["precision"], recall=entry["recall"], f1=entry["f1"])
                   for name, entry in zip(class_names, per_class)],
        predictions=[dict(path=path, label=class_names[label], predicted=class_names[predicted])
                     for (path, label), predicted in zip(samples, evaluation.predicted.tolist())])


def report_lines(report, processes):
    """What rank 0 prints: what was scored, the headline metrics, then one row per class."""
    present = sum(entry["support"] > 0 for entry in report["per_class"])
    headline = [f"loss {report['loss']:.4f}", f"top-1 {report['accuracy']:.2f}%"]
    if report["top5_accuracy"] is not None:
        headline.append(f"top-5 {report['top5_accuracy']:.2f}%")
    headline += [f"macro-F1 {report['macro_f1']:.2f}%", f"balanced accuracy {report['balanced_accuracy']:.2f}%"]
    width = max(len("class"), *(len(name) for name in report["class_names"]))
    lines = [f"Evaluated {report['checkpoint']} ({report['model_name']}, {report['weights']} weights, TTA "
             f"{report['tta']}) on {report['images']} images of {report['data_dir']} ({present} of its "
             f"{len(report['class_names'])} classes) with {processes}",
             " | ".join(headline),
             f"{'class':<{width}}  precision  recall      F1  support"]
    lines += [f"{e['name']:<{width}}  {e['precision']:9.2f}  {e['recall']:6.2f}  {e['f1']:6.2f}  {e['support']:7d}"
              for e in report["per_class"]]
    return lines


def write_outputs(report, output):
    """The JSON file (atomically) and the confusion matrix's picture beside it; returns the picture's path."""
    picture = output[:-len(".json")] + "_confusion.png"
    write_json_atomic(output, report)
    title = f"Confusion matrix on {report['data_dir']} ({report['images']} images), rows normalised"
    plot_confusion(report["class_names"], np.asarray(report["confusion_matrix"], dtype=float), None, picture,
                   title=title)
    return picture


def run(argv):
    try:
        args, checkpoint, model, samples = prepare(argv)
    except (UsageError, *USER_ERRORS, OSError):
        if os.environ.get("RANK", "0") == "0":
            raise  # run_command reports it, once: every process found the same
        return 2
    ctx = setup_distributed()
    try:
        evaluation = score(model, samples, checkpoint_preprocessing(checkpoint), args, ctx)
    except RuntimeError as exc:
        if not is_peer_loss(exc):
            raise
        print("error: another process of this job stopped or failed (its own message says why), so this one "
              "stops too", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown_distributed()
    if ctx.is_main:
        report = results(evaluation, checkpoint, samples, args)
        print("\n".join(report_lines(report, ctx.describe())), flush=True)
        if args.output:
            print(f"wrote {args.output} and {write_outputs(report, args.output)}", flush=True)


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
