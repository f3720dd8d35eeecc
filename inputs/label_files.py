"""Labels from CSV files (--train_csv, --val_csv) instead of class folders, and the run's data
sources whichever way each split is given (run_data). Torch-free, so launch_ddp.py refuses a bad
file before anything spawns.

A label file is a header row naming its columns, then one row per image: the image's path and its
class name (--image_column, --label_column; other columns are ignored, spaces around a value too).
Paths are relative to the image root (--image_root, by default the file's own folder); an absolute
path is taken when it lies inside the root. Each must lead, links followed, to a regular file inside
the root: a `..` or a link out of the tree would quietly train on other images. Any file is
accepted whatever its extension (the file names it; a file that is not an image fails when read).

The classes are the train file's sorted distinct labels, as ImageFolder sorts its class folders,
and the samples are sorted as ImageFolder orders its files (by class, then folder, then name): a
file describing a class-folder tree gives the same class indices and the same sample order, hence
the same training, whatever its row order. A val file's labels must be train classes; it may lack
some (a val folder may not: its class indices come from its folder names). Every problem is one
line naming the file and line; the first is reported, with the number of others.

With --multi_label a label cell lists an image's labels separated by --label_delimiter (a space by
default, as Kaggle's multi-label competitions write them); a sample's label is then the sorted
tuple of its class names, the classes are the union of all of them, and samples are sorted by path.
"""
import csv
import io
import os
import stat
from dataclasses import dataclass

from core.errors import ConfigError, DataError
from inputs.folders import check_data_folders, class_folders, not_a_file, refuse_empty_classes

BYTE_ORDER_MARK = b"\xef\xbb\xbf"  # what Excel writes at the start of a "CSV UTF-8" file
NUL = b"\0"  # in no text file; csv refuses it anyway, with a less helpful message


@dataclass(frozen=True)
class LabelFile:
    """A checked label file: `samples` (image path, class name) in ImageFolder's order, all inside
    `root`, and `classes`, its sorted distinct labels."""
    path: str
    root: str
    samples: list
    classes: list


@dataclass(frozen=True)
class RunData:
    """The run's class names and its train and val sources: each a LabelFile or a class-folder root."""
    classes: list
    train: LabelFile | str
    val: LabelFile | str


def run_data(args):
    """The sources of the parsed flags, checked: --train_csv or --train_dir gives the classes,
    --val_csv's labels must be among them, --val_dir's class folders must equal them."""
    if args.demo and (args.train_csv or args.val_csv):
        raise ConfigError("--demo trains on its own digit folders: leave out --train_csv and --val_csv")
    if not (args.train_csv or args.val_csv):
        return RunData(check_data_folders(args.train_dir, args.val_dir), args.train_dir, args.val_dir)
    columns = dict(image_root=args.image_root, image_column=args.image_column, label_column=args.label_column,
                   delimiter=args.label_delimiter if getattr(args, "multi_label", False) else None)
    train = read_label_file(args.train_csv, "train", **columns) if args.train_csv else args.train_dir
    classes = train.classes if args.train_csv else class_folders(args.train_dir, "train")
    if args.val_csv:
        return RunData(classes, train, read_label_file(args.val_csv, "val", classes=classes, **columns))
    val_classes = class_folders(args.val_dir, "val")
    if val_classes != classes:
        raise DataError(f"the class folders of --val_dir {args.val_dir} differ from the labels of --train_csv "
                        f"{args.train_csv} (only in the CSV: {names(sorted(set(classes) - set(val_classes)))}; only "
                        f"in the folder: {names(sorted(set(val_classes) - set(classes)))}); --val_dir needs one "
                        "class folder per train label, or pass --val_csv FILE")
    return RunData(classes, train, args.val_dir)


def data_classes(args):
    """The run's class names (run_data), for checking a checkpoint's before resuming it."""
    return run_data(args).classes


def check_run_data(args):
    """The launcher's check of the run's data before anything spawns: run_data, and an image in
    every class folder of a folder source. The demo's folders are written by the run itself."""
    if args.demo and not (args.train_csv or args.val_csv):
        return
    data = run_data(args)
    for source in (data.train, data.val):
        if isinstance(source, str):
            refuse_empty_classes(source, data.classes)


def read_label_file(path, role, image_root=None, image_column="image", label_column="label", classes=None,
                    delimiter=None):
    """The LabelFile of the CSV file at `path` (`role` "train" or "val" names its flag in messages, as
    --train_csv or --val_csv; another command passes its own flag, e.g. "--csv");
    with `classes`, every label must be one of them; with a `delimiter`, a label cell lists several."""
    text = read_text(path, role if role.startswith("--") else f"--{role}_csv")
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(root):
        raise DataError(f"--image_root {image_root} is not a folder")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return read_rows(reader, path, root, (image_column, label_column), classes, delimiter)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not a CSV file ({exc})") from None


def read_text(path, flag):
    """A label file's text; a file that is missing, not a regular file, binary or not UTF-8 is refused."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
            raise DataError(f"{flag} {path} is {'a folder' if os.path.isdir(path) else not_a_file(path)}; "
                            "pass a CSV file")
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise DataError(f"{flag} file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {flag} {path} ({exc.strerror})") from None
    if NUL in raw:
        raise DataError(f"{path}:{line_at(raw, raw.index(NUL))}: not a CSV file (it holds binary data)")
    body = raw.removeprefix(BYTE_ORDER_MARK)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{line_at(body, exc.start)}: not a CSV file of UTF-8 text (byte "
                        f"0x{body[exc.start]:02x} is not UTF-8); save it as UTF-8") from None


def line_at(raw, offset):
    """The 1-based line of a byte offset."""
    return raw.count(b"\n", 0, offset) + 1


def read_rows(reader, path, root, columns, classes, delimiter=None):
    """read_label_file's work on the parsed rows: the header, then each row checked."""
    header = next((row for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:
        raise DataError(f"{path} is empty; a label file is a header row ({','.join(columns)}) and then one row "
                        "per image")
    names_found = [cell.strip() for cell in header]
    column_at = header_columns(names_found, columns, f"{path}:{reader.line_num}")
    known = None if classes is None else set(classes)
    real_root, real_folders = os.path.realpath(root), {}
    samples, first_line, problems = [], {}, []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            problems.append(f"{where}: {len(row)} field(s) where the header has {len(header)} (quote a path or "
                            "label that holds a comma)")
            continue
        image, label = (row[column_at[name]].strip() for name in columns)
        if not image or not label:
            problems.append(f"{where}: empty {'image path' if not image else f'label for image {image!r}'}")
            continue
        labels = [label] if delimiter is None else sorted({part.strip() for part in label.split(delimiter)} - {""})
        unknown = [name for name in labels if known is not None and name not in known]
        if unknown:
            problems.append(f"{where}: label {unknown[0]!r} is not a class of the training data ({names(classes)})")
            continue
        if delimiter is not None:
            label = tuple(labels)
        try:
            image_path, real = locate(image, root, real_root, real_folders)
        except DataError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if real in first_line:
            problems.append(f"{where}: image {image!r} is listed twice (first at line {first_line[real]})")
            continue
        first_line[real] = reader.line_num
        relative = os.path.relpath(os.path.normpath(image_path), root)
        order = (label, os.path.dirname(relative), os.path.basename(relative)) if delimiter is None else relative
        samples.append((order, image_path, label))
    if problems:
        more = f" (and {len(problems) - 1} more problem row(s))" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    if not samples:
        raise DataError(f"{path} has a header but no image rows")
    samples.sort()
    found = {name for _, _, label in samples for name in ((label,) if delimiter is None else label)}
    return LabelFile(path, root, [(image_path, label) for _, image_path, label in samples], sorted(found))


def header_columns(names_found, columns, where):
    """{column name: its position} for the image and label columns, refused when missing or repeated."""
    missing = [name for name in columns if name not in names_found]
    if missing:
        comma_hint = " (the file must be comma-separated)" if any(";" in n or "\t" in n for n in names_found) else ""
        raise DataError(f"{where}: no column {' or '.join(map(repr, missing))} in the header (columns found: "
                        f"{', '.join(map(repr, names_found))}){comma_hint}; name the image and label columns with "
                        "--image_column NAME and --label_column NAME")
    repeated = [name for name in columns if names_found.count(name) > 1]
    if repeated:
        raise DataError(f"{where}: the header names column {repeated[0]!r} twice")
    return {name: names_found.index(name) for name in columns}


def locate(image, root, real_root, real_folders):
    """(path, real path) of a row's image: a regular file inside the real root, links followed.
    Each folder's real path is found once (real_folders), so a row costs one lstat."""
    image_path = os.path.join(root, image)
    folder = os.path.dirname(image_path)
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder)
    refuse_outside(image, root, real_folders[folder], real_root)
    try:
        info = os.lstat(image_path)
        real = os.path.join(real_folders[folder], os.path.basename(image_path))
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(image_path)
            refuse_outside(image, root, real, real_root, link=True)
            info = os.stat(image_path)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"image not found: {image_path}") from None
    except OSError as exc:
        raise DataError(f"cannot read image {image_path} ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{image_path} is {'a folder' if stat.S_ISDIR(info.st_mode) else not_a_file(image_path)}")
    return image_path, real


def refuse_outside(image, root, real, real_root, link=False):
    if os.path.commonpath([real_root, real]) != real_root:
        what = f"is a link to {real}," if link else "is"
        raise DataError(f"image {image!r} {what} outside the image root {root}; list images inside it, or pass "
                        "--image_root DIR for a folder that holds them all")


def names(classes, shown=5):
    """Class names for a message: the first few, and how many more."""
    more = f" and {len(classes) - shown} more" if len(classes) > shown else ""
    return ", ".join(map(repr, classes[:shown])) + more if classes else "none"
