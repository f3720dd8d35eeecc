"""Finding a run's images: the class folders of an ImageFolder root and the one walk over them
(`find_files`), shared by training, predict.py and data_split.py. Torch-free, so launch_ddp.py can
refuse a bad data folder in a fraction of a second."""
import os
import stat
from collections import deque

from core.errors import DataError

# torchvision's IMG_EXTENSIONS (what ImageFolder and dataset.py accept), spelled out here so the
# launcher can check class folders without importing torchvision.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folders(root, role):
    """The sorted class sub-folder names of an ImageFolder root, with clear errors."""
    if not os.path.exists(root):
        raise DataError(f"{role} folder not found: {root} (pass --{role}_dir PATH, or --demo)")
    if not os.path.isdir(root):
        raise DataError(f"{role} folder is not a directory: {root}")
    classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and followed_is_dir(e, role))
    if not classes:
        raise DataError(f"{role} folder {root} has no class sub-folders; expected "
                        f"{root}/<class_name>/<image files>")
    return classes


def followed_is_dir(entry, role):
    """Whether a folder entry is a directory, following links; a link that cannot be followed (one
    pointing at itself) is refused: it might be a class, and leaving a class out would shift labels."""
    try:
        return entry.is_dir()
    except OSError as exc:
        raise DataError(f"{role} folder entry {entry.path} cannot be followed ({exc.strerror}); "
                        "fix or remove it") from None


def check_data_folders(train_dir, val_dir):
    """Class names from the train folder; val must hold exactly the same classes."""
    train_classes = class_folders(train_dir, "train")
    val_classes = class_folders(val_dir, "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"val classes differ from train classes (only in train: {only_train[:5]}, "
                        f"only in val: {only_val[:5]}); both folders need the same class sub-folders")
    return train_classes


def refuse_empty_classes(root, classes):
    """The workers' DataError for class folders holding no image (dataset.py's make_dataset), found
    before anything spawns: each folder is read only until its first image (has_files)."""
    empty = [name for name in classes if not has_files(os.path.join(root, name), IMAGE_EXTENSIONS)]
    if empty:
        raise DataError(f"no image files in the class folder(s) {', '.join(empty[:5])} of {root} "
                        f"(supported extensions: {', '.join(IMAGE_EXTENSIONS)})")


def has_files(folder, extensions):
    """Whether find_files(folder, extensions) finds anything (the same entries count), stopping at
    the first one: a class folder of thousands of images costs one directory read."""
    extensions = tuple(extensions)
    walked, pending, ignored = set(), deque([folder]), []
    while pending:
        path = pending.popleft()
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in walked:
                continue
            walked.add((info.st_dev, info.st_ino))
            with os.scandir(path) as scan:
                if any(not entry.name.startswith(".") and keep_entry(entry, extensions, pending, pending, ignored)
                       for entry in scan):
                    return True
        except OSError:  # find_files skips such a directory too (with a warning, which the workers print)
            continue
    return False


def find_files(folder, extensions):
    """The files under `folder` whose lower-cased names end in one of `extensions`, in the order of
    torchvision's ImageFolder (sorted os.walk(followlinks=True)), and warnings about what was left out.

    Links are followed, but no directory is walked twice: a link back into the tree (a loop) or a
    second way into one directory is skipped with a warning. Real sub-folders are walked before
    any link, so the warning names the link. Hidden files and folders (.ipynb_checkpoints, macOS's
    ._photo.jpg) are skipped silently, as data_split.py does; a matching name that is not a regular
    file (a FIFO named x.png would block its reader forever) with a warning.
    Returns (paths, warnings)."""
    extensions = tuple(extensions)
    names_in, warnings = {}, []  # directory path -> the matching file names in it
    walked = {}  # (st_dev, st_ino) of each directory walked -> the path it was walked as
    real_dirs, linked_dirs = [folder], deque()
    while real_dirs or linked_dirs:
        path = real_dirs.pop() if real_dirs else linked_dirs.popleft()
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in walked:
                warnings.append(f"skipping {path}: it leads to {walked[info.st_dev, info.st_ino]}, which is "
                                "already included (a link loop, or a second link to one folder)")
                continue
            walked[info.st_dev, info.st_ino] = path
            with os.scandir(path) as scan:  # sorted: which of two links is skipped must not depend on the disk
                entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda e: e.name)
            names_in[path] = [entry.name for entry in entries
                              if keep_entry(entry, extensions, real_dirs, linked_dirs, warnings)]
        except OSError as exc:  # unreadable, a link that cannot be followed, or gone meanwhile
            warnings.append(f"skipping {path}: {exc.strerror}")
    paths = [os.path.join(d, name) for d in sorted(names_in) for name in sorted(names_in[d])]
    return paths, warnings


def keep_entry(entry, extensions, real_dirs, linked_dirs, warnings):
    """find_files' look at one entry: queues a directory, says whether to keep a file."""
    try:
        is_dir = entry.is_dir()
    except OSError as exc:  # a link to itself
        warnings.append(f"skipping {entry.path}: {exc.strerror}")
        return False
    if is_dir:
        (linked_dirs if entry.is_symlink() else real_dirs).append(entry.path)
        return False
    if not entry.name.lower().endswith(extensions):
        return False
    if entry.is_file():
        return True
    warnings.append(f"skipping {entry.path}: {not_a_file(entry.path)}")
    return False


def not_a_file(path):
    """What a path with an image name is instead of a regular file, for a warning."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"a link that cannot be followed ({exc.strerror})"
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device")]
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "something") + ", not a regular file"
