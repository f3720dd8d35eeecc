"""Split a folder of class sub-folders into an ImageFolder train/val(/test) tree, or label files.

    python data_split.py --input_dir raw --output_dir data \
        --train_ratio 0.8 --val_ratio 0.2 --image_extensions png,jpg,jpeg

Input:  raw/<class>/<images...>   (sub-folders inside a class are searched too, as training
        searches them: links followed but no folder twice, hidden files and FIFOs skipped)
Output: data/train/<class>/..., data/val/<class>/..., data/test/<class>/...
        (test only when --test_ratio > 0). The split is stratified per class and
        deterministic for a given --seed; every class gets a train image, and a val
        image when --val_ratio > 0 (a class of one image is then refused). The output
        is written beside --output_dir and moved into place when complete.
        With --write_csv: data/train.csv, data/val.csv (data/test.csv) instead, nothing
        copied: a header row "image,label", then one row per image, its path relative to
        --input_dir and its class (train_ddp.py --train_csv, --val_csv, --image_root raw).
"""
import csv
import hashlib
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from core.cli import Parser, run_command
from core.errors import UsageError
from inputs.folders import find_files

RATIO_TOLERANCE = 1e-6


def ratio_error(train_ratio, val_ratio, test_ratio):
    """Return a message describing what is wrong with the ratios, or None."""
    ratios = {"train_ratio": train_ratio, "val_ratio": val_ratio, "test_ratio": test_ratio}
    for name, value in ratios.items():
        # `not value >= 0` also rejects NaN, which slips through `value < 0`.
        if not value >= 0:
            return f"--{name} must be >= 0, got {value}"
    if train_ratio == 0:
        return "--train_ratio must be > 0"
    total = train_ratio + val_ratio + test_ratio
    if not abs(total - 1.0) <= RATIO_TOLERANCE:
        return (f"ratios must add up to 1, got {train_ratio} + {val_ratio} + "
                f"{test_ratio} = {total:g}")
    return None


def class_seed(seed, class_name):
    # hashlib rather than hash(): Python salts str hashes per process, which
    # would make the split differ from run to run.
    digest = hashlib.sha256(class_name.encode("utf-8")).digest()
    return seed + int.from_bytes(digest[:8], "big")


def round_half_up(x):
    # Built-in round() rounds 2.5 to 2 (banker's rounding), which surprises people.
    return int(x + 0.5)


def split_files(files_by_class, train_ratio, val_ratio, test_ratio, seed):
    """Stratified, deterministic split.

    Returns {"train": {cls: [files]}, "val": {...}} plus "test" when
    test_ratio > 0. Every input file lands in exactly one split; lists are sorted.
    Every class keeps at least one training image, and one val image when it has
    two or more and val_ratio > 0 (training needs every class in both).
    """
    problem = ratio_error(train_ratio, val_ratio, test_ratio)
    if problem:
        raise ValueError(problem)
    split_names = ["train", "val"] + (["test"] if test_ratio > 0 else [])
    result = {name: {} for name in split_names}
    for class_name in sorted(files_by_class):
        # Sort first so the outcome doesn't depend on directory listing order.
        files = sorted(set(files_by_class[class_name]))
        random.Random(class_seed(seed, class_name)).shuffle(files)
        n = len(files)
        n_val = round_half_up(n * val_ratio)
        if n >= 2 and val_ratio > 0 and n_val == 0:
            n_val = 1  # every class should be represented in validation
        n_val = min(n_val, max(n - 1, 0))  # and in training
        n_test = min(round_half_up(n * test_ratio), max(n - n_val - 1, 0))
        chunks = {"val": files[:n_val], "test": files[n_val:n_val + n_test],
                  "train": files[n_val + n_test:]}
        for name in split_names:
            result[name][class_name] = sorted(chunks[name])
    return result


def parse_extensions(text):
    exts = {"." + part.strip().lstrip(".").lower() for part in text.split(",")}
    return exts - {"."}


def find_images(input_dir, extensions):
    """Map class name -> sorted image paths relative to the class folder, searched as training
    searches its class folders (folders.find_files); and the warnings about what was skipped."""
    files_by_class, warnings = {}, []
    for class_dir in sorted(p for p in input_dir.iterdir()
                            if p.is_dir() and not p.name.startswith(".")):
        paths, skipped = find_files(str(class_dir), extensions)
        files_by_class[class_dir.name] = sorted(Path(p).relative_to(class_dir).as_posix() for p in paths)
        warnings += skipped
    return files_by_class, warnings


def check_output_dir(input_dir, output_dir, mode):
    """A message saying why the output cannot go to output_dir, or None. Label files may go into
    the input folder itself (they are not class folders), never below it."""
    if mode == "csv" and input_dir in output_dir.parents:
        return (f"--output_dir {output_dir} is inside the input dir; write the label files outside it, or into "
                "--input_dir itself")
    if mode != "csv" and (output_dir == input_dir or input_dir in output_dir.parents):
        return f"--output_dir {output_dir} is the input dir or inside it; pick a folder outside it"
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {output_dir} exists and is not a folder"
    if mode == "csv":
        for name in ("train.csv", "val.csv", "test.csv"):
            if os.path.lexists(output_dir / name):
                return f"{output_dir / name} already exists; remove it or pick another --output_dir"
        return None
    for split in ("train", "val", "test"):
        split_dir = output_dir / split
        if split_dir.is_dir() and any(split_dir.iterdir()):
            return f"{split_dir} already exists and is not empty; pick an empty --output_dir"
    return None


def print_table(splits, files_by_class):
    split_names = list(splits)
    header = ["class", "total"] + split_names
    rows = [[c, len(files_by_class[c])] + [len(splits[s][c]) for s in split_names]
            for c in sorted(files_by_class)]
    rows.append(["TOTAL"] + [sum(r[i] for r in rows) for i in range(1, len(header))])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths))))


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="folder of class sub-folders")
    p.add_argument("--output_dir", required=True, help="where train/ val/ (test/), or their .csv files, go")
    p.add_argument("--train_ratio", type=float, required=True)
    p.add_argument("--val_ratio", type=float, required=True)
    p.add_argument("--test_ratio", type=float, default=0.0)
    p.add_argument("--image_extensions", required=True,
                   help="comma separated, case-insensitive, e.g. png,jpg,jpeg")
    p.add_argument("--seed", type=int, default=42)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--copy", dest="mode", action="store_const", const="copy",
                      help="copy files (default)")
    mode.add_argument("--symlink", dest="mode", action="store_const", const="symlink",
                      help="create absolute symlinks to the originals instead of copying")
    mode.add_argument("--write_csv", dest="mode", action="store_const", const="csv",
                      help="write label files train.csv, val.csv (test.csv) into --output_dir instead of copying: "
                           "columns image,label, each path relative to --input_dir, rows in ImageFolder's order; "
                           "train with --train_csv and --val_csv, and --image_root INPUT_DIR unless --output_dir "
                           "is --input_dir itself")
    p.set_defaults(mode="copy")
    return p.parse_args(argv)


def classes_without_val(splits, val_ratio):
    """A message naming the classes that get no val image (those of one image: split_files keeps
    it for training), or None. train_ddp.py refuses a val/ that lacks a class of train/, so such an
    output would be written only to fail later: it is refused before anything is written."""
    lonely = [c for c, files in splits["val"].items() if not files] if val_ratio > 0 else []
    if not lonely:
        return None
    names = ", ".join(f"'{c}'" for c in lonely[:5]) + (f" and {len(lonely) - 5} more" if len(lonely) > 5 else "")
    which = f"class {names} has 1 image" if len(lonely) == 1 else f"classes {names} have 1 image each"
    return (f"{which}: 1 train and 0 val images; train_ddp.py needs every class in both train/ and val/, so "
            "add images, remove the class folder, or pass --val_ratio 0")


class Stopped(BaseException):
    """SIGINT or SIGTERM while writing: raised so the partial output is removed on the way out."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop(signum, _frame):
    raise Stopped(signum)


def output_names(splits, mode):
    """What each split becomes in --output_dir: a folder, or with --write_csv a label file."""
    return [f"{split}.csv" if mode == "csv" else split for split in splits]


def write_splits(splits, input_dir, output_dir, mode):
    """Copy (or link) every split, or write its label file, into a hidden folder beside output_dir,
    then move the finished split folders (files) into place: a failure or a stop signal leaves
    nothing behind, so a rerun is not refused. Split folders that exist are empty and label files
    do not exist (check_output_dir), so os.replace may take their place."""
    created = outermost_missing(output_dir)  # made here, so removed again on failure
    moved, staging = [], None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-partial-", dir=output_dir.parent))
        for (split, by_class), name in zip(splits.items(), output_names(splits, mode)):
            if mode == "csv":
                write_label_file(staging / name, by_class)
            else:
                place_files(by_class, input_dir, staging / name, mode)
        for name in output_names(splits, mode):
            os.replace(staging / name, output_dir / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            os.replace(output_dir / name, staging / name)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def place_files(by_class, input_dir, split_dir, mode):
    """Copy (or link) one split's files into split_dir/<class>/."""
    split_dir.mkdir()
    for class_name, files in by_class.items():
        for rel in files:
            src, dst = input_dir / class_name / rel, split_dir / class_name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if mode == "symlink":
                os.symlink(src, dst)
            else:
                shutil.copy2(src, dst)


def write_label_file(path, by_class):
    """One split as a label file (inputs/label_files.py): image paths relative to the input folder
    and their classes, classes sorted and files sorted within each, as ImageFolder orders them."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label"])
        writer.writerows((f"{class_name}/{rel}", class_name) for class_name in sorted(by_class)
                         for rel in by_class[class_name])


def training_flags(splits, input_dir, output_dir):
    """The train_ddp.py flags that read the label files written by --write_csv."""
    flags = ["--train_csv", output_dir / "train.csv"]
    flags += ["--val_csv", output_dir / "val.csv"] if any(splits["val"].values()) else []
    flags += [] if output_dir == input_dir else ["--image_root", input_dir]
    return shlex.join(map(str, flags))


def outermost_missing(path):
    """The outermost folder of `path` that does not exist yet; None when `path` exists."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def run(argv):
    args = parse_args(argv)
    problem = ratio_error(args.train_ratio, args.val_ratio, args.test_ratio)
    if problem:
        raise UsageError(problem)
    extensions = parse_extensions(args.image_extensions)
    if not extensions:
        raise UsageError("--image_extensions is empty")

    input_dir = Path(args.input_dir).resolve()
    output_dir = Path(args.output_dir).resolve()
    if not input_dir.is_dir():
        raise UsageError(f"--input_dir {args.input_dir} does not exist or is not a folder")
    problem = check_output_dir(input_dir, output_dir, args.mode)
    if problem:
        raise UsageError(problem)
    files_by_class, skipped = find_images(input_dir, extensions)
    for warning in skipped:
        print(f"warning: {warning}", file=sys.stderr)
    if not files_by_class:
        raise UsageError(f"--input_dir {args.input_dir} has no class sub-folders")
    if not any(files_by_class.values()):
        raise UsageError(f"no files with extensions {','.join(sorted(extensions))} found under {args.input_dir}")

    for class_name, files in files_by_class.items():
        if not files:
            print(f"warning: class '{class_name}' has no matching images and is skipped; "
                  "class indices may then differ from other datasets", file=sys.stderr)
    files_by_class = {c: f for c, f in files_by_class.items() if f}
    splits = split_files(files_by_class, args.train_ratio, args.val_ratio,
                         args.test_ratio, args.seed)
    problem = classes_without_val(splits, args.val_ratio)
    if problem:
        raise UsageError(problem)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        write_splits(splits, input_dir, output_dir, args.mode)
    except OSError as exc:
        print(f"error: failed while writing {output_dir}: {exc}; nothing was written", file=sys.stderr)
        return 1
    except Stopped as exc:
        print(f"stopped by signal {exc.signum}; nothing was written", file=sys.stderr)
        return 128 + exc.signum

    if args.mode == "csv":
        print(f"wrote {', '.join(output_names(splits, args.mode))} into {output_dir} (seed {args.seed}), image "
              f"paths relative to {input_dir}; train with: {training_flags(splits, input_dir, output_dir)}")
    else:
        print(f"{'linked' if args.mode == 'symlink' else 'copied'} files into {output_dir} (seed {args.seed})")
    print_table(splits, files_by_class)


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
