"""Split a folder of class sub-folders into an ImageFolder train/val(/test) tree.

    python data_split.py --input_dir raw --output_dir data \
        --train_ratio 0.8 --val_ratio 0.2 --image_extensions png,jpg,jpeg

Input:  raw/<class>/<images...>   (sub-folders inside a class are searched too)
Output: data/train/<class>/..., data/val/<class>/..., data/test/<class>/...
        (test only when --test_ratio > 0). The split is stratified per class and
        deterministic for a given --seed.
"""
import argparse
import hashlib
import os
import random
import shutil
import sys
from pathlib import Path

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
        n_val = min(n_val, n)
        n_test = min(round_half_up(n * test_ratio), n - n_val)
        chunks = {"val": files[:n_val], "test": files[n_val:n_val + n_test],
                  "train": files[n_val + n_test:]}
        for name in split_names:
            result[name][class_name] = sorted(chunks[name])
    return result


def parse_extensions(text):
    exts = {"." + part.strip().lstrip(".").lower() for part in text.split(",")}
    return exts - {"."}


def find_images(input_dir, extensions):
    """Map class name -> sorted image paths relative to the class folder."""
    files_by_class = {}
    for class_dir in sorted(p for p in input_dir.iterdir()
                            if p.is_dir() and not p.name.startswith(".")):
        found = []
        for root, dirs, names in os.walk(class_dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                    found.append((Path(root) / name).relative_to(class_dir).as_posix())
        files_by_class[class_dir.name] = sorted(found)
    return files_by_class


def check_output_dir(input_dir, output_dir):
    if output_dir == input_dir or input_dir in output_dir.parents:
        return f"--output_dir {output_dir} is the input dir or inside it; pick a folder outside it"
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {output_dir} exists and is not a folder"
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="folder of class sub-folders")
    p.add_argument("--output_dir", required=True, help="where train/ val/ (test/) go")
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
    p.set_defaults(mode="copy")
    return p.parse_args(argv)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    problem = ratio_error(args.train_ratio, args.val_ratio, args.test_ratio)
    if problem:
        return fail(problem)
    extensions = parse_extensions(args.image_extensions)
    if not extensions:
        return fail("--image_extensions is empty")

    input_dir = Path(args.input_dir).resolve()
    output_dir = Path(args.output_dir).resolve()
    if not input_dir.is_dir():
        return fail(f"--input_dir {args.input_dir} does not exist or is not a folder")
    problem = check_output_dir(input_dir, output_dir)
    if problem:
        return fail(problem)
    files_by_class = find_images(input_dir, extensions)
    if not files_by_class:
        return fail(f"--input_dir {args.input_dir} has no class sub-folders")
    if not any(files_by_class.values()):
        return fail(f"no files with extensions {','.join(sorted(extensions))} "
                    f"found under {args.input_dir}")

    for class_name, files in files_by_class.items():
        if not files:
            print(f"warning: class '{class_name}' has no matching images and is skipped; "
                  "class indices may then differ from other datasets", file=sys.stderr)
    files_by_class = {c: f for c, f in files_by_class.items() if f}
    splits = split_files(files_by_class, args.train_ratio, args.val_ratio,
                         args.test_ratio, args.seed)
    if args.val_ratio > 0:
        for class_name, files in splits["val"].items():
            if not files:
                print(f"warning: class '{class_name}' has {len(files_by_class[class_name])} "
                      "image(s) and gets no val images; val/ will lack this class folder, "
                      "so ImageFolder class indices in val/ would differ from train/",
                      file=sys.stderr)

    try:
        for split, by_class in splits.items():
            for class_name, files in by_class.items():
                for rel in files:
                    src = input_dir / class_name / rel
                    dst = output_dir / split / class_name / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if args.mode == "symlink":
                        os.symlink(src, dst)
                    else:
                        shutil.copy2(src, dst)
    except OSError as exc:
        print(f"error: failed while writing {output_dir}: {exc}", file=sys.stderr)
        return 1

    verb = "linked" if args.mode == "symlink" else "copied"
    print(f"{verb} files into {output_dir} (seed {args.seed})")
    print_table(splits, files_by_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
