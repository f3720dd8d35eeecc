"""Durable files, torch-free: a write either lands whole or leaves the previous file untouched.

The files the project writes for a user (checkpoints, the history, the config and report JSON
files, exports) go through `atomic_path`: written under a temporary name in the same folder,
fsynced, renamed over the target, and the rename made durable by an fsync of the folder. A kill,
a full disk or a power loss at any moment leaves the old file or the new one, never a truncated
one; an error or a stop signal leaves no temporary file (a SIGKILL leaves `<name>.tmp.<pid>`).
The image cache publishes its own way (fastload/cache_file.py: the header last, under a lock)
with the same fsync_directory and remove_quietly.
"""
import json
import os
import shutil
from contextlib import contextmanager


def temporary_name(path):
    """A name beside `path` (the same file system, so the rename is atomic) that no other process
    writes to: one process writes a given file at a time, and the pid tells processes apart."""
    return f"{path}.tmp.{os.getpid()}"


def fsync_directory(directory):
    """Make a rename in `directory` durable: after a power loss the name points at the new file,
    not at nothing. Some file systems cannot sync a directory; the rename still happened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_file(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_quietly(path):
    """Remove a file if it is there; a file already gone or not removable is not an error."""
    try:
        os.remove(path)
    except OSError:
        pass


@contextmanager
def atomic_path(path):
    """Yield the temporary path to write `path`'s new content to. When the block ends, that file is
    fsynced and renamed over `path`, then the folder is fsynced; on any exception (a failed write,
    a stop signal) it is removed and `path` keeps its previous content. The folder must exist."""
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_atomic(path, write):
    """Call `write(file)` on a binary file opened at a temporary name, then put it in place durably."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json_atomic(path, data, indent=2):
    """`data` as indented JSON, durably (readers never see half a file), its folder created if need
    be. Data that JSON cannot hold raises TypeError before anything is written."""
    text = json.dumps(data, indent=indent)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: f.write(text.encode()))


def link_or_copy_atomic(source, path):
    """Give a finished file a second name without rewriting it: a hard link (the next atomic write
    of `source` renames a new file over it, so this name keeps its content), or a copy where links
    are not supported."""
    with atomic_path(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
