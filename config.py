"""The training flags of train_ddp.py (and so of launch_ddp.py), their defaults and their checks.

Torch-free, so launch_ddp.py can refuse bad flags in a fraction of a second (folders.py does the
same for data folders).
"""
import argparse
import difflib
import json
import os
import sys
import tempfile

from core import cli
from core.errors import ConfigError

# The smallest --image_size of models a dry forward pass would otherwise judge only on the ranks
# (model.check_image_size, which tests/test_model.py holds this table to), so that launch_ddp.py
# can refuse a size without importing torch. Models not listed take 1 px or are checked on the ranks.
SMALLEST_IMAGE_SIZE = dict(tiny_cnn=2, alexnet=63, googlenet=15, vgg11=32, vgg13=32, vgg16=32, vgg19=32)

# The torchvision recipe's evaluation transform, for runs without --pretrained weights (whose own
# transform, training.resolve_preprocessing, takes its place): the shorter side resized to
# image_size / 0.875, a center crop, ImageNet's mean and std.
DEFAULT_IMAGE_SIZE = 224
EVAL_RESIZE_FRACTION = 0.875
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING_FLAGS = ("image_size", "resize_size", "mean", "std")

DEMO_DIR = "data/digits"
# The demo recipe: 8x8 digit scans upscaled to 32 px; no flips (a mirrored digit is another shape).
DEMO_DEFAULTS = dict(epochs=6, image_size=32, batch_size=32, learning_rate=2e-3, min_crop_scale=0.5,
                     hflip_prob=0.0, num_workers=1, warmup_steps=20)


class Parser(cli.Parser):
    """The commands' parser (cli.Parser) for the training flags: a mistake is a ConfigError (one
    `error:` line from the caller, exit 2), and a misspelt flag names the closest real one."""

    user_error = ConfigError
    other_flags = ()  # flags a wrapping command line takes besides these (launch_ddp.py's own)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unrecognized(unknown, [*self._option_string_actions, *self.other_flags]))
        return namespace


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default only where it says something: not None or a switch's False, and
    not where the help text already states the default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def unrecognized(tokens, flags):
    """The message for command-line words no flag takes, naming the closest flag for each misspelt
    one (compared without dashes, - read as _: `--learning-rate` and `--lr_rate` -> --learning_rate)."""
    names = {flag.lstrip("-"): flag for flag in flags if flag.startswith("--")}
    words = [token.split("=", 1)[0] for token in tokens if token.startswith("--")] or tokens
    closest = {word: difflib.get_close_matches(word.lstrip("-").replace("-", "_"), names, n=1) for word in words}
    if len(words) == 1 and closest[words[0]]:
        return f"unrecognized argument {words[0]}; did you mean {names[closest[words[0]][0]]}?"
    listed = ", ".join(word + (f" (did you mean {names[match[0]]}?)" if match else "")
                       for word, match in closest.items())
    return f"unrecognized argument{'s' if len(words) > 1 else ''} {listed}; see --help for the flags"


def print_help_if_asked(argv):
    """Answer -h/--help from this torch-free module and exit: train_ddp.py calls it before it
    imports torch, which takes seconds."""
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        sys.exit(0)


def build_parser():
    parser = Parser(
        description="Train an image classifier with PyTorch DDP. Run directly (one process), "
                    "under torchrun, or through launch_ddp.py; distribution is read from "
                    "torchrun's environment.",
        formatter_class=HelpFormatter, allow_abbrev=False)
    add_data_flags(parser.add_argument_group("data"))
    add_augmentation_flags(parser.add_argument_group("augmentation (torchvision's and timm's recipes)"))
    add_model_flags(parser.add_argument_group("model"))
    add_optimisation_flags(parser.add_argument_group("optimisation"))
    add_precision_flags(parser.add_argument_group("precision and distribution"))
    add_debugging_flags(parser.add_argument_group("debugging (as in Lightning)"))
    add_output_flags(parser.add_argument_group("checkpoints and logs"))
    return parser


def add_data_flags(data):
    data.add_argument("--train_dir", default="data/train", help="ImageFolder root: train_dir/<class>/<images>")
    data.add_argument("--val_dir", default="data/val", help="ImageFolder root with the same classes as train_dir")
    data.add_argument("--train_csv", default=None, metavar="FILE",
                      help="labels from a CSV file instead of --train_dir's class folders: a header row, then one row "
                           "per image (columns --image_column and --label_column)")
    data.add_argument("--val_csv", default=None, metavar="FILE", help="the validation images' CSV file")
    data.add_argument("--image_root", default=None, metavar="DIR",
                      help="the folder the CSV files' image paths are relative to (default: each file's own folder)")
    data.add_argument("--image_column", default="image", help="the CSV column holding image paths")
    data.add_argument("--label_column", default="label", help="the CSV column holding labels")
    data.add_argument("--multi_label", action="store_true",
                      help="each image may carry several labels: the CSV label column lists them, separated by "
                           "--label_delimiter (as Kaggle's multi-label competitions write them); sigmoid outputs, "
                           "binary cross-entropy, mAP and F1")
    data.add_argument("--label_delimiter", default=" ", help="--multi_label: what separates an image's labels")
    data.add_argument("--pos_weight", choices=["none", "balanced"], default="none",
                      help="--multi_label: weigh each class's positives by its negatives / positives in training")
    data.add_argument("--sampling", choices=["uniform", "class_balanced", "sqrt"], default="uniform",
                      help="training draws: each image once per epoch (uniform), or with replacement weighted so "
                           "every class is drawn equally often (class_balanced) or in proportion to the square root "
                           "of its size (sqrt); the epoch keeps the dataset's length")
    data.add_argument("--demo", action="store_true",
                      help=f"train on scikit-learn's handwritten digits, written once as PNGs to {DEMO_DIR}; "
                           "sets the demo recipe for any flag not given")
    data.add_argument("--image_size", type=int, default=None,
                      help="training and evaluation crop size in pixels (default 224, or the --pretrained "
                           "weights' own); --train_crop_size and --val_crop_size set each apart")
    data.add_argument("--resize_size", type=int, default=None,
                      help="evaluation: the shorter side is resized to this, then center-cropped to image_size "
                           "(default image_size / 0.875, or the --pretrained weights' ratio)")
    data.add_argument("--train_crop_size", type=int, default=None,
                      help="training crop size (FixRes: smaller than the evaluation crop; default --image_size)")
    data.add_argument("--val_crop_size", type=int, default=None,
                      help="evaluation center-crop size (default --image_size); predict.py and export.py use it")
    data.add_argument("--val_resize_size", type=int, default=None,
                      help="evaluation: shorter side resized to this before the center crop (same as --resize_size)")
    data.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                      help="per-channel normalisation mean of 0-1 pixels (default ImageNet's, or the --pretrained "
                           "weights' own)")
    data.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                      help="per-channel normalisation standard deviation (default ImageNet's, or the weights' own)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="DataLoader worker processes per training process (default: this machine's usable "
                           "cores shared among its training processes, at least 1, at most 4)")
    data.add_argument("--min_crop_scale", type=float, default=0.08,
                      help="smallest image area fraction a random resized crop keeps")
    data.add_argument("--hflip_prob", type=float, default=0.5, help="probability of a horizontal flip")
    data.add_argument("--cache_images", nargs="?", const="image_cache", default=None, metavar="DIR",
                      help="decode every image once into a uint8 memory-mapped cache in DIR (default "
                           "image_cache/), reused by later runs and all ranks; crops and flips then run "
                           "batched on the device")
    data.add_argument("--cache_format", choices=["auto", "raw", "jpeg"], default="auto",
                      help="--cache_images storage: raw uint8 pixels (fastest to read), or every image re-encoded "
                           "once as a JPEG at the storage size (about a tenth of the bytes, decoded at load time); "
                           "auto: raw while it takes at most a quarter of this machine's memory")
    data.add_argument("--cache_quality", type=int, default=90, help="JPEG quality of a compressed image cache (1-100)")
    data.add_argument("--decode_on_device", action="store_true",
                      help="decode JPEG files in batches on the training device (nvjpeg on a GPU) instead of in "
                           "DataLoader workers: for GPUs whose host cannot decode fast enough; no cache")
    data.add_argument("--no_augmentation", action="store_true",
                      help="train on the evaluation transform (resize + center crop) instead of random crops and flips")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="skip unreadable image files with a warning (counted in the history) "
                           "instead of stopping with an error that names the file")


def add_augmentation_flags(augment):
    augment.add_argument("--auto_augment", choices=["ta_wide", "ra", "augmix", "imagenet", "cifar10", "svhn"],
                         default=None,
                         help="per-sample policy after the crop and flip: TrivialAugmentWide, RandAugment, AugMix, "
                              "or AutoAugment's imagenet/cifar10/svhn policy (torchvision's operations)")
    augment.add_argument("--ra_magnitude", type=int, default=9, help="RandAugment's magnitude (0-30)")
    augment.add_argument("--ra_num_ops", type=int, default=2, help="RandAugment's operations per image")
    augment.add_argument("--augmix_severity", type=int, default=3, help="AugMix's severity (1-10)")
    augment.add_argument("--color_jitter", type=float, default=0.0,
                         help="brightness, contrast and saturation jitter F: factors in [1-F, 1+F] (0: off)")
    augment.add_argument("--random_erase", type=float, default=0.0,
                         help="probability of erasing a random rectangle of a training image (torchvision's "
                              "RandomErasing; 0: off)")
    augment.add_argument("--mixup_alpha", type=float, default=0.0, help="mixup: lambda ~ Beta(alpha, alpha) (0: off)")
    augment.add_argument("--cutmix_alpha", type=float, default=0.0, help="cutmix: lambda ~ Beta(alpha, alpha) (0: off)")
    augment.add_argument("--mix_prob", type=float, default=1.0,
                         help="probability that a pair of samples is mixed (pairs are consecutive in the global "
                              "sample order, so every layout mixes the same pairs)")
    augment.add_argument("--mix_switch_prob", type=float, default=0.5,
                         help="with both mixup and cutmix: probability that a mixed pair uses cutmix")
    augment.add_argument("--mix_off_epoch", type=int, default=0,
                         help="no mixing from this epoch on (0: mix to the end)")
    augment.add_argument("--ra_reps", type=int, default=1,
                         help="repeated augmentation: each image drawn comes N times in a row, differently augmented, "
                              "on different processes (torchvision's RASampler: the epoch keeps the dataset's length, "
                              "so it sees about 1/N of the images)")
    augment.add_argument("--progressive_min_size", type=int, default=None,
                         help="progressive resizing: train at this crop size up to --progressive_start_epoch, then "
                              "grow linearly (multiples of 16 px) to --train_crop_size at --progressive_end_epoch")
    augment.add_argument("--progressive_start_epoch", type=int, default=1, help="progressive resizing: ramp start")
    augment.add_argument("--progressive_end_epoch", type=int, default=None,
                         help="progressive resizing: the first epoch at the full --train_crop_size (default: "
                              "the last 15%% of --epochs train at full size)")


def add_model_flags(model):
    model.add_argument("--model", default="resnet18",
                       help="torchvision classification model name (resnet18, resnet50, mobilenet_v3_small, ...), "
                            "tiny_cnn, or timm/NAME for timm's model NAME (timm/resnet50, timm/vit_small_patch16_224, "
                            "...); its head is replaced for the dataset's classes")
    model.add_argument("--sync_bn", action="store_true",
                       help="SyncBatchNorm across processes (CUDA only; ignored with a note on CPU)")
    model.add_argument("--channels_last", action="store_true",
                       help="channels_last memory format (faster convs on GPUs)")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the training model; checkpoints still load into an uncompiled model")
    model.add_argument("--pretrained", nargs="?", const="DEFAULT", default=None, metavar="WEIGHTS",
                       help="start from pretrained weights for --model: DEFAULT (the flag alone), a torchvision name "
                            "such as IMAGENET1K_V1, or a timm tag such as a1_in1k; downloaded once per node into "
                            "torch.hub's cache (timm models: the Hugging Face cache) (offline: put the file there, "
                            "the error names it)")
    model.add_argument("--pretrained_weights", default=None, metavar="PATH",
                       help="local weights file to start from (.pth, a training checkpoint, or timm's "
                            ".safetensors); its classification head is kept only if it has as many classes as the "
                            "dataset")


def add_optimisation_flags(optim):
    optim.add_argument("--epochs", type=int, default=50, help="number of training epochs")
    optim.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    optim.add_argument("--learning_rate", type=float, default=0.001, help="peak learning rate")
    optim.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                       help="optimizer (fused implementation)")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="weight decay")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    optim.add_argument("--norm_weight_decay", type=float, default=None,
                       help="weight decay of normalisation layers' weights (torchvision's recipe: 0; default: "
                            "--weight_decay)")
    optim.add_argument("--bias_weight_decay", type=float, default=None,
                       help="weight decay of biases (default: --weight_decay)")
    optim.add_argument("--layer_decay", type=float, default=None,
                       help="layer-wise learning-rate decay for fine-tuning: layer d of L trains at F^(L-1-d) "
                            "times the rate, the head at the full rate (e.g. 0.75)")
    optim.add_argument("--label_smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    optim.add_argument("--loss", choices=["ce", "focal"], default="ce",
                       help="training loss: cross-entropy, or focal loss (down-weights easy examples, --focal_gamma)")
    optim.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss: the focusing exponent gamma")
    optim.add_argument("--class_weights", default="none", metavar="{none,balanced,FILE}",
                       help="per-class weights of the training loss: none, balanced (n_images / (n_classes x "
                            "class images), scikit-learn's), or a JSON file mapping class names to weights")
    optim.add_argument("--freeze_backbone_epochs", type=int, default=0,
                       help="fine-tuning: train only the classification head (the last linear layer) for the "
                            "first N epochs, backbone weights and batch-norm statistics frozen; then everything")
    optim.add_argument("--backbone_lr_scale", type=float, default=1.0,
                       help="fine-tuning: the backbone's learning rate is this times the head's")
    optim.add_argument("--scale_lr", choices=["none", "linear", "sqrt"], default="none",
                       help="scale --learning_rate by the number of processes (linear) or its square root")
    optim.add_argument("--lr_scheduler", choices=["none", "cosine", "step"], default="cosine",
                       help="learning-rate schedule, stepped per optimizer step")
    optim.add_argument("--lr_step_epochs", type=int, default=30, help="step schedule: decay every N epochs")
    optim.add_argument("--lr_gamma", type=float, default=0.1, help="step schedule: decay factor")
    optim.add_argument("--warmup_steps", type=int, default=0, help="learning-rate warm-up, in optimizer steps")
    optim.add_argument("--lr_warmup_epochs", type=int, default=0, help="learning-rate warm-up, in epochs")
    optim.add_argument("--lr_warmup_method", choices=["linear", "constant"], default="linear",
                       help="warm-up: rate ramped linearly from lr_warmup_decay x the peak, or held at it")
    optim.add_argument("--lr_warmup_decay", type=float, default=None,
                       help="the warm-up's starting factor of the peak rate (default: 1 / (warm-up steps + 1) "
                            "linear, 0.01 constant)")
    optim.add_argument("--lr_min", type=float, default=0.0, help="cosine schedule: the rate it decays to")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=None,
                       help="micro-batches per optimizer step; the gradient all-reduce runs on the last only "
                            "(default 1; on resume, whatever keeps the checkpoint's global batch)")
    optim.add_argument("--max_grad_norm", type=float, default=0.0,
                       help="clip the gradient norm to this value; 0 disables clipping (the norm is always reported)")
    optim.add_argument("--seed", type=int, default=42, help="seed for weights, data order and augmentation")
    optim.add_argument("--use_ema", action="store_true",
                       help="keep an exponential moving average of the weights (torch AveragedModel); "
                            "it is validated, monitored and saved as ema_state_dict")
    optim.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per update")
    optim.add_argument("--ema_steps", type=int, default=1, help="update the EMA every N optimizer steps")
    optim.add_argument("--ema_warmup", action="store_true",
                       help="EMA decay warm-up (timm's): min(decay, (1 + n) / (10 + n)) at update n")
    optim.add_argument("--max_nonfinite_steps", type=int, default=20,
                       help="stop with an error after this many consecutive optimizer steps with a NaN/Inf "
                            "loss or gradient (each such step is skipped)")


def add_precision_flags(precision):
    precision.add_argument("--use_amp", action="store_true", help="automatic mixed precision (torch.amp autocast)")
    precision.add_argument("--amp_dtype", choices=["auto", "float16", "bfloat16"], default="auto",
                           help="autocast dtype; float16 uses a GradScaler, bfloat16 needs none. auto: float16 on "
                                "GPUs; on a CPU bfloat16 where it has native bfloat16 instructions, else full "
                                "precision (float16 autocast on a CPU is many times slower than float32); a resumed "
                                "run keeps its checkpoint's")
    precision.add_argument("--find_unused_parameters", action="store_true",
                           help="DDP find_unused_parameters, for models with branches unused in a step")
    precision.add_argument("--dist_timeout_minutes", type=float, default=10.0,
                           help="process-group timeout: a rank stuck in a collective this long fails the job")
    precision.add_argument("--distributed", action="store_true",
                           help="accepted for compatibility; distribution is detected from torchrun's environment")


def add_debugging_flags(debug):
    debug.add_argument("--fast_dev_run", action="store_true",
                       help="one train and one val batch per process, no checkpoint or log files, then exit")
    debug.add_argument("--overfit_batches", type=int, default=0,
                       help="train and validate on the same N batches (fixed images, no augmentation)")
    debug.add_argument("--limit_train_batches", type=int, default=0,
                       help="at most N training batches per epoch (0: all)")
    debug.add_argument("--limit_val_batches", type=int, default=0,
                       help="at most N validation batches per process (0: all)")
    debug.add_argument("--trace_samples", action="store_true",
                       help="record which dataset indices each rank trains at every optimizer step, in "
                            "log_dir/sample_trace/rank<R>.jsonl (resumed runs append)")
    debug.add_argument("--tta", choices=["none", "flip"], default="none",
                       help="test-time augmentation in validation: the mean softmax of each image and its mirror")
    debug.add_argument("--num_sanity_val_steps", type=int, default=2,
                       help="validation batches run before training, so a broken validation fails in seconds (0: off)")


def add_output_flags(output):
    output.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of flag values (keys are flag names); command-line flags win")
    output.add_argument("--monitor_metric", choices=["val_acc", "val_loss", "val_macro_f1", "val_balanced_acc",
                                                      "val_map", "val_micro_f1"],
                        default="val_acc",
                        help="metric for checkpoint_best.pth, --save_top_k and early stopping (named so that "
                             "torchrun's own --monitor-interval does not swallow it)")
    output.add_argument("--early_stopping_patience", type=int, default=0,
                        help="stop after N epochs without improvement of --monitor_metric (0: off)")
    output.add_argument("--early_stopping_min_delta", type=float, default=0.0,
                        help="smallest change of --monitor_metric that counts as an improvement")
    output.add_argument("--save_top_k", type=int, default=0,
                        help="also keep the K best checkpoints by --monitor_metric as checkpoint_epochNNN.pth")
    output.add_argument("--checkpoint_dir", default="checkpoints",
                        help="checkpoint_latest.pth (every epoch) and checkpoint_best.pth go here; a new run first "
                             "moves an earlier run's checkpoint_* files to previous/<when it ended>/")
    output.add_argument("--log_dir", default="logs",
                        help="training_history.json and config.json go here (an earlier run's logs move to "
                             "previous/<when it ended>/)")
    output.add_argument("--resume", default=None, metavar="PATH", help="continue training from this checkpoint")
    output.add_argument("--reset_optimizer", action="store_true",
                        help="on resume, start the optimizer's state afresh (needed to change --optimizer)")
    output.add_argument("--reset_lr_schedule", action="store_true",
                        help="on resume, start a new learning-rate schedule over the remaining epochs (needed to "
                             "change --lr_scheduler, --warmup_steps, --learning_rate, --scale_lr or the step decay)")
    output.add_argument("--reset_best", action="store_true",
                        help="on resume, forget the best value, top-k and early-stopping count (needed to change "
                             "--monitor_metric)")
    output.add_argument("--auto_resume", action="store_true",
                        help="resume from checkpoint_dir/checkpoint_latest.pth when it exists (set by the "
                             "launcher when --max_restarts > 0, so torchrun restarts continue the run)")
    output.add_argument("--save_every_steps", type=int, default=0,
                        help="also write checkpoint_latest.pth every N optimizer steps (0: once per epoch); "
                             "a resume continues at the exact next batch")
    output.add_argument("--log_every_steps", type=int, default=10,
                        help="every N optimizer steps (and at each epoch's first step, on the bar): progress-bar "
                             "and logger metrics (a host sync on rank 0); stop decisions (signals, non-finite "
                             "streak) have their own cadence, about every 0.25 s of training")
    output.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (rank 0)")
    output.add_argument("--wandb_project", default="ddp-classify", help="WandB project")
    output.add_argument("--wandb_name", default=None, help="WandB run name")
    output.add_argument("--use_tensorboard", action="store_true", help="log to TensorBoard under log_dir/tensorboard")

def parse_args(argv=None, other_flags=()):
    """Flags, in increasing priority: defaults, the --demo recipe, the --config file, the command line.
    Values are checked as given, before defaults are derived from them. other_flags: a wrapping
    command line's own flags, offered too when a flag is misspelt."""
    parser = build_parser()
    parser.other_flags = other_flags
    first = parser.parse_args(argv)
    if first.demo:
        parser.set_defaults(**DEMO_DEFAULTS, train_dir=f"{DEMO_DIR}/train", val_dir=f"{DEMO_DIR}/val")
    if first.config:
        parser.set_defaults(**read_config_file(first.config, parser))
    args = parser.parse_args(argv)
    if args.fast_dev_run:  # one batch each way, nothing written (checkpoints, history, loggers)
        args.epochs, args.limit_train_batches, args.limit_val_batches, args.num_sanity_val_steps = 1, 1, 1, 0
        args.use_wandb = args.use_tensorboard = False
    if args.num_workers is None:
        args.num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    validate_args(args)  # the values as given: a default derived from a bad one would hide it
    split_crop_sizes(args)
    if not args.pretrained:  # with --pretrained, the ranks fill them in from the weights' own transform
        fill_preprocessing(args)
        check_preprocessing(args)
        fill_crop_sizes(args)
        check_recipe_sizes(args)
    return args


class Settled(argparse.Namespace):
    """A run's flags once every value derived from them is resolved (engine.training.settle), read-only
    from then on: what runs is what logs/config.json and the checkpoints record. vars() gives the
    values, for those files; `replaced` gives a settled copy with some values changed."""

    def __init__(self, **values):
        self.__dict__.update(values)  # Namespace.__init__ would go through the refused setattr

    def __setattr__(self, name, value):
        raise AttributeError(f"the run's configuration is settled: --{name} cannot change after "
                             "engine.training.settle (derive the value there)")

    def __delattr__(self, name):
        self.__setattr__(name, None)

    def replaced(self, **changes):
        return Settled(**{**vars(self), **changes})


def default_num_workers(local_processes):
    """DataLoader workers per process when --num_workers is not given: the usable cores shared
    among this machine's training processes, at most 4. At least 1 even with under one core per
    process: torch's DataLoader warns only above the core count, and a worker still overlaps
    decoding with the step."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // max(1, local_processes)))


def eval_resize_size(image_size, fraction=EVAL_RESIZE_FRACTION):
    """The evaluation transform's shorter side before its center crop: image_size / fraction."""
    return int(round(image_size / fraction))


def fill_preprocessing(args, image_size=DEFAULT_IMAGE_SIZE, resize_fraction=EVAL_RESIZE_FRACTION,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Give the preprocessing flags not set (None) these values: a crop size, the resize as a
    fraction of it, mean and std. Flags the user set stay."""
    if args.image_size is None:
        args.image_size = image_size
    if args.resize_size is None:
        args.resize_size = eval_resize_size(args.image_size, resize_fraction)
    args.mean, args.std = list(mean if args.mean is None else args.mean), list(std if args.std is None else args.std)


def split_crop_sizes(args):
    """--image_size and --resize_size are shorthands: the settled configuration keeps the
    evaluation sizes in them (what checkpoints' preprocessing and predict.py read) once
    --val_crop_size/--val_resize_size are taken in, and the training crop in --train_crop_size
    (filled from --image_size when the preprocessing is: fill_crop_sizes)."""
    args.train_crop_size = args.train_crop_size or args.image_size
    args.image_size = args.val_crop_size or args.image_size
    args.resize_size = args.val_resize_size or args.resize_size


def fill_crop_sizes(args):
    """After the preprocessing is filled in: the training crop defaults to the evaluation crop, and
    --val_crop_size/--val_resize_size record the evaluation sizes."""
    args.train_crop_size = args.train_crop_size or args.image_size
    args.val_crop_size, args.val_resize_size = args.image_size, args.resize_size


def check_preprocessing(args):
    if args.resize_size is not None and args.image_size is not None and args.resize_size < args.image_size:
        raise ConfigError(f"--resize_size {args.resize_size} is smaller than --image_size {args.image_size}: the "
                          "center crop needs at least that; leave --resize_size out for image_size / 0.875")


def preprocessing_of(config):
    """The evaluation transform of a run's flags (vars(args), or a checkpoint's config) as a dict:
    image_size, resize_size, mean, std. Older checkpoints lack some flags: the recipe's values."""
    preprocessing = argparse.Namespace(**{name: config.get(name) for name in PREPROCESSING_FLAGS})
    fill_preprocessing(preprocessing)
    return vars(preprocessing)


def read_config_file(path, parser):
    """Flag values from YAML/JSON, checked and converted like command-line values."""
    try:
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot read --config {path}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ConfigError(f"cannot parse --config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    converted = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            match = difflib.get_close_matches(str(key), [name for name in actions if name not in ("help", "config")],
                                              n=1)
            raise ConfigError(f"--config {path}: unknown key '{key}' (keys are train_ddp.py flag names"
                              + (f"; did you mean '{match[0]}'?)" if match else ")"))
        try:
            if action.nargs == 3 and value is not None:  # --mean, --std
                if not (isinstance(value, list) and len(value) == 3):
                    raise ValueError("expected a list of 3 numbers")
                value = [float(number) for number in value]
            elif action.nargs == 0:  # store_true flags
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif value is not None and action.type in (int, float):
                # Strings convert as on the command line (YAML reads `2e-3` as a string); a bool or
                # a fraction for an integer flag is a mistake, not something to truncate.
                if isinstance(value, bool) or (action.type is int and isinstance(value, float)):
                    raise ValueError(f"expected {'an integer' if action.type is int else 'a number'}")
                value = action.type(value)
            elif value is not None:
                if not isinstance(value, str):
                    raise ValueError("expected a string")
            if action.choices and value not in action.choices:
                raise ValueError(f"expected one of {', '.join(action.choices)}")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--config {path}: key '{key}' = {value!r}: {exc}") from None
        converted[key] = value
    return converted


def validate_args(args):
    positive = ["epochs", "batch_size", "image_size", "resize_size", "gradient_accumulation_steps",
                "log_every_steps", "max_nonfinite_steps", "train_crop_size", "val_crop_size", "val_resize_size",
                "ra_num_ops", "augmix_severity", "ra_reps", "ema_steps", "progressive_min_size",
                "progressive_start_epoch", "progressive_end_epoch"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    limits = dict(batch_size=65536, epochs=1_000_000, image_size=4096, resize_size=8192, train_crop_size=4096,
                  val_crop_size=4096, val_resize_size=8192, gradient_accumulation_steps=65536, num_workers=256,
                  ra_magnitude=30, ra_num_ops=14, augmix_severity=10, ra_reps=16)
    for name, limit in limits.items():
        if getattr(args, name) is not None and getattr(args, name) > limit:
            raise ConfigError(f"--{name} {getattr(args, name)} is beyond any sensible value (at most {limit})")
    check_preprocessing(args)
    if args.mean is not None and not all(0 <= value <= 1 for value in args.mean):
        raise ConfigError(f"--mean takes three values in [0, 1] (pixels scaled to 0-1), got {args.mean}")
    if args.std is not None and not all(0 < value <= 1 for value in args.std):
        raise ConfigError(f"--std takes three values in (0, 1] (pixels scaled to 0-1), got {args.std}")
    if args.image_size is not None and args.image_size < SMALLEST_IMAGE_SIZE.get(args.model, 1):
        raise ConfigError(image_size_too_small(args.model, args.image_size, SMALLEST_IMAGE_SIZE[args.model]))
    if args.decode_on_device and (args.cache_images or args.skip_bad_images):
        raise ConfigError(f"--decode_on_device reads the image files every epoch; it cannot be combined with "
                          f"--{'cache_images' if args.cache_images else 'skip_bad_images'} (drop one of them)")
    if not 1 <= args.cache_quality <= 100:
        raise ConfigError(f"--cache_quality must be in [1, 100], got {args.cache_quality}")
    if args.num_workers < 0:
        raise ConfigError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not 0 < args.learning_rate <= 10:
        raise ConfigError(f"--learning_rate must be in (0, 10], got {args.learning_rate}")
    if not 0 < args.dist_timeout_minutes <= 24 * 60:
        raise ConfigError(f"--dist_timeout_minutes must be in (0, 1440], got {args.dist_timeout_minutes}")
    if not 0 < args.backbone_lr_scale <= 1000:
        raise ConfigError(f"--backbone_lr_scale must be in (0, 1000], got {args.backbone_lr_scale}")
    for name in ("freeze_backbone_epochs", "weight_decay", "max_grad_norm", "warmup_steps", "save_every_steps",
                 "momentum", "overfit_batches", "limit_train_batches", "limit_val_batches", "num_sanity_val_steps",
                 "early_stopping_patience", "early_stopping_min_delta", "save_top_k"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 1:
        raise ConfigError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0 < args.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.lr_step_epochs < 1 or not 0 < args.lr_gamma <= 1:
        raise ConfigError("--lr_step_epochs must be at least 1 and --lr_gamma in (0, 1]")
    if not 0 < args.min_crop_scale <= 1:
        raise ConfigError(f"--min_crop_scale must be in (0, 1], got {args.min_crop_scale}")
    if args.pretrained and args.pretrained_weights:
        raise ConfigError("--pretrained and --pretrained_weights both name starting weights; give one of them")
    if not 0 <= args.hflip_prob <= 1:
        raise ConfigError(f"--hflip_prob must be in [0, 1], got {args.hflip_prob}")
    validate_recipe(args)
    for name in ("checkpoint_dir", "log_dir"):
        check_writable_dir(getattr(args, name), name)


def validate_recipe(args):
    """The modern recipe's flags (augmentation, mixing, weight-decay groups, schedule, EMA), as given."""
    for name in ("random_erase", "mix_prob", "mix_switch_prob", "color_jitter"):
        if not 0 <= getattr(args, name) <= 1:
            raise ConfigError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name in ("ra_magnitude", "mixup_alpha", "cutmix_alpha", "mix_off_epoch", "lr_warmup_epochs", "lr_min",
                 "norm_weight_decay", "bias_weight_decay"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    mixing = args.mixup_alpha > 0 or args.cutmix_alpha > 0
    if mixing and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix mix pairs of samples within each process's batch: --batch_size must be "
                          f"even, got {args.batch_size}")
    if mixing and args.skip_bad_images:
        raise ConfigError("mixup/cutmix pair samples by their place in the batch, which a skipped image would shift: "
                          "drop --skip_bad_images (fix or remove the unreadable files) or the mixing")
    asked = [flag for flag, on in (("auto_augment", args.auto_augment), ("color_jitter", args.color_jitter),
                                   ("random_erase", args.random_erase), ("mixup_alpha", mixing and args.mixup_alpha),
                                   ("cutmix_alpha", mixing and args.cutmix_alpha), ("ra_reps", args.ra_reps > 1),
                                   ("progressive_min_size", args.progressive_min_size)) if on]
    if asked and (args.no_augmentation or args.overfit_batches):
        raise ConfigError(f"--{'no_augmentation' if args.no_augmentation else 'overfit_batches'} trains without "
                          f"augmentation, but --{asked[0]} asks for some: drop one of them")
    if args.warmup_steps and args.lr_warmup_epochs:
        raise ConfigError("--warmup_steps and --lr_warmup_epochs both set the warm-up's length; give one of them")
    if args.lr_warmup_decay is not None and not 0 < args.lr_warmup_decay <= 1:
        raise ConfigError(f"--lr_warmup_decay must be in (0, 1], got {args.lr_warmup_decay}")
    if args.lr_min >= args.learning_rate:
        raise ConfigError(f"--lr_min {args.lr_min:g} must be below --learning_rate {args.learning_rate:g}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise ConfigError(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum <= 0):
        raise ConfigError("--nesterov is SGD's Nesterov momentum: it needs --optimizer sgd and --momentum above 0")
    validate_multi_label(args)
    if args.focal_gamma < 0:
        raise ConfigError(f"--focal_gamma must be 0 or more, got {args.focal_gamma}")
    if args.class_weights not in ("none", "balanced") and not os.path.isfile(args.class_weights):
        raise ConfigError(f"--class_weights {args.class_weights}: no such file; give none, balanced, or a JSON file "
                          "mapping class names to weights")
    if args.progressive_end_epoch is not None and args.progressive_min_size is None:
        raise ConfigError("--progressive_end_epoch needs --progressive_min_size (the size the ramp starts from)")


def validate_multi_label(args):
    """--multi_label's needs (label files) and what it cannot be combined with."""
    if not args.multi_label:
        if args.monitor_metric in ("val_map", "val_micro_f1") or args.pos_weight != "none":
            flag = "--pos_weight" if args.pos_weight != "none" else f"--monitor_metric {args.monitor_metric}"
            raise ConfigError(f"{flag} is for --multi_label runs; add --multi_label (with --train_csv/--val_csv) or "
                              "drop it")
        return
    if not (args.train_csv and args.val_csv):
        raise ConfigError("--multi_label reads each image's labels from CSV files: give --train_csv and --val_csv "
                          "(class folders hold one label per image)")
    for flag, value, default in (("sampling", args.sampling, "uniform"), ("class_weights", args.class_weights, "none"),
                                 ("loss", args.loss, "ce")):
        if value != default:
            raise ConfigError(f"--{flag} {value} is for single-label runs; with --multi_label use --pos_weight "
                              "balanced for rare labels")
    if args.tta != "none":
        raise ConfigError("--tta averages softmax views of one-label models; drop it with --multi_label")
    if not args.label_delimiter:
        raise ConfigError("--label_delimiter must not be empty (it separates an image's labels; a space by default)")
    if args.monitor_metric == "val_balanced_acc":
        raise ConfigError("--monitor_metric val_balanced_acc is single-label; with --multi_label monitor val_map, "
                          "val_macro_f1, val_micro_f1, val_acc (exact match) or val_loss")


def check_recipe_sizes(args):
    """Checks that need the settled crop sizes (after the --pretrained weights' own are filled in)."""
    if args.train_crop_size < SMALLEST_IMAGE_SIZE.get(args.model, 1):
        raise ConfigError(image_size_too_small(args.model, args.train_crop_size, SMALLEST_IMAGE_SIZE[args.model],
                                               "train_crop_size"))
    low = args.progressive_min_size
    if low is not None:
        if low >= args.train_crop_size:
            raise ConfigError(f"--progressive_min_size {low} must be below the training crop size "
                              f"{args.train_crop_size}")
        if low < SMALLEST_IMAGE_SIZE.get(args.model, 1):
            raise ConfigError(image_size_too_small(args.model, low, SMALLEST_IMAGE_SIZE[args.model],
                                                   "progressive_min_size"))
        end = args.progressive_end_epoch
        if end is not None and not args.progressive_start_epoch < end:
            raise ConfigError(f"--progressive_end_epoch {end} must come after --progressive_start_epoch "
                              f"{args.progressive_start_epoch}")


def image_size_too_small(model, image_size, smallest, flag="image_size"):
    return (f"--{flag} {image_size} is too small for {model}: its smallest input is {smallest} px; "
            f"use --{flag} {smallest} or more")


def check_writable_dir(path, flag):
    """The directory, or its nearest existing parent, must be writable; nothing is created here."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--{flag} {path}: {probe} is a file, not a directory")
    try:  # a real write: os.access says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"--{flag} {path} is not writable ({probe}: {exc.strerror}); "
                          "pick a folder you can write to") from None
