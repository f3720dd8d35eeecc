"""Durable files, torch-free: a write either lands whole or leaves the previous file untouched.

Every file the project writes for a user (checkpoints, the image cache, the history, the config and
report JSON files, exports) goes through `write_atomic`: written under a temporary name in the same
folder, flushed and fsynced, renamed over the target, and the rename made durable by an fsync of
the folder. A kill, a full disk or a power loss at any moment leaves the old file or the new one,
never a truncated one and never a stray temporary.
"""
import json
import os
from contextlib import contextmanager


def temporary_name(path):
    """A name beside `path` that no other process uses (the pid), hidden from folder listings."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}")


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


def remove_quietly(path):
    """Remove a file if it is there; a file already gone or not removable is not an error."""
    try:
        os.remove(path)
    except OSError:
        pass


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write `path`'s new content to; on success it is fsynced and renamed
    over `path` durably, on any failure (an exception, a stop signal) it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_directory(directory)


def write_atomic(path, write):
    """Call `write(file)` on a binary file opened at a temporary name, then put it in place durably."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json_atomic(path, data):
    """`data` as indented JSON, durably: readers never see half a file."""
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def link_or_copy_atomic(source, path):
    """Give a finished file a second name without rewriting it: a hard link (the next atomic write
    of `source` renames a new file over it, so this name keeps its content), or a copy where links
    are not supported."""
    import shutil

    with atomic_path(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
