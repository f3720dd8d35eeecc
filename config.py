"""The training flags of train_ddp.py (and so of launch_ddp.py), their defaults and their checks."""
import argparse
import os
import tempfile

DEMO_DIR = "data/digits"
# The demo recipe: 8x8 digit scans upscaled to 32 px; no flips (a mirrored digit is another shape).
DEMO_DEFAULTS = dict(epochs=6, image_size=32, batch_size=32, learning_rate=2e-3, min_crop_scale=0.5,
                     hflip_prob=0.0, num_workers=1, warmup_steps=20)


class ConfigError(ValueError):
    """Flag values that cannot work; the message names the flag and what it accepts."""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train an image classifier with PyTorch DDP. Run directly (one process), "
                    "under torchrun, or through launch_ddp.py; distribution is read from "
                    "torchrun's environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)

    data = parser.add_argument_group("data")
    data.add_argument("--train_dir", default="data/train", help="ImageFolder root: train_dir/<class>/<images>")
    data.add_argument("--val_dir", default="data/val", help="ImageFolder root with the same classes as train_dir")
    data.add_argument("--demo", action="store_true",
                      help=f"train on scikit-learn's handwritten digits, written once as PNGs to {DEMO_DIR}; "
                           "sets the demo recipe for any flag not given")
    data.add_argument("--image_size", type=int, default=224, help="training and evaluation crop size in pixels")
    data.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes per training process")
    data.add_argument("--min_crop_scale", type=float, default=0.08,
                      help="smallest image area fraction a random resized crop keeps")
    data.add_argument("--hflip_prob", type=float, default=0.5, help="probability of a horizontal flip")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="skip unreadable image files with a warning (counted in the history) "
                           "instead of stopping with an error that names the file")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet18",
                       help="torchvision classification model name (resnet18, resnet50, mobilenet_v3_small, ...) "
                            "or tiny_cnn; its head is replaced for the dataset's classes")
    model.add_argument("--pretrained_weights", default=None, metavar="PATH",
                       help="local weights file to start from; its classification head is kept only "
                            "if it has as many classes as the dataset")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=50, help="number of training epochs")
    optim.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    optim.add_argument("--learning_rate", type=float, default=0.001, help="peak learning rate")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    optim.add_argument("--lr_scheduler", choices=["none", "cosine"], default="cosine",
                       help="learning-rate schedule, stepped per optimizer step")
    optim.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up, in optimizer steps")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches per optimizer step; the gradient all-reduce runs on the last only")
    optim.add_argument("--max_grad_norm", type=float, default=0.0,
                       help="clip the gradient norm to this value; 0 disables clipping (the norm is always reported)")
    optim.add_argument("--seed", type=int, default=42, help="seed for weights, data order and augmentation")
    optim.add_argument("--max_nonfinite_steps", type=int, default=20,
                       help="stop with an error after this many consecutive optimizer steps with a NaN/Inf "
                            "loss or gradient (each such step is skipped)")

    precision = parser.add_argument_group("precision and distribution")
    precision.add_argument("--use_amp", action="store_true", help="automatic mixed precision (torch.amp autocast)")
    precision.add_argument("--amp_dtype", choices=["float16", "bfloat16"], default="float16",
                           help="autocast dtype; float16 uses a GradScaler, bfloat16 needs none")
    precision.add_argument("--find_unused_parameters", action="store_true",
                           help="DDP find_unused_parameters, for models with branches unused in a step")
    precision.add_argument("--dist_timeout_minutes", type=float, default=10.0,
                           help="process-group timeout: a rank stuck in a collective this long fails the job")
    precision.add_argument("--distributed", action="store_true",
                           help="accepted for compatibility; distribution is detected from torchrun's environment")

    output = parser.add_argument_group("checkpoints and logs")
    output.add_argument("--checkpoint_dir", default="checkpoints",
                        help="checkpoint_latest.pth (every epoch) and checkpoint_best.pth go here")
    output.add_argument("--log_dir", default="logs", help="training_history.json goes here")
    output.add_argument("--resume", default=None, metavar="PATH", help="continue training from this checkpoint")
    output.add_argument("--auto_resume", action="store_true",
                        help="resume from checkpoint_dir/checkpoint_latest.pth when it exists (set by the "
                             "launcher when --max_restarts > 0, so torchrun restarts continue the run)")
    output.add_argument("--save_every_steps", type=int, default=0,
                        help="also write checkpoint_latest.pth every N optimizer steps (0: once per epoch); "
                             "a resume continues at the exact next batch")
    output.add_argument("--log_every_steps", type=int, default=10,
                        help="refresh the progress bar's loss, accuracy and learning rate every N optimizer steps")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo recipe fills in what the user did not set on the command line
        parser.set_defaults(**DEMO_DEFAULTS, train_dir=f"{DEMO_DIR}/train", val_dir=f"{DEMO_DIR}/val")
        args = parser.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args):
    positive = ["epochs", "batch_size", "image_size", "gradient_accumulation_steps", "log_every_steps",
                "max_nonfinite_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    limits = dict(batch_size=65536, epochs=1_000_000, image_size=4096, gradient_accumulation_steps=65536,
                  num_workers=256)
    for name, limit in limits.items():
        if getattr(args, name) > limit:
            raise ConfigError(f"--{name} {getattr(args, name)} is beyond any sensible value (at most {limit})")
    if args.num_workers < 0:
        raise ConfigError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not 0 < args.learning_rate <= 10:
        raise ConfigError(f"--learning_rate must be in (0, 10], got {args.learning_rate}")
    if not 0 < args.dist_timeout_minutes <= 24 * 60:
        raise ConfigError(f"--dist_timeout_minutes must be in (0, 1440], got {args.dist_timeout_minutes}")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "save_every_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0 < args.min_crop_scale <= 1:
        raise ConfigError(f"--min_crop_scale must be in (0, 1], got {args.min_crop_scale}")
    if not 0 <= args.hflip_prob <= 1:
        raise ConfigError(f"--hflip_prob must be in [0, 1], got {args.hflip_prob}")
    for name in ("checkpoint_dir", "log_dir"):
        check_writable_dir(getattr(args, name), name)


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
