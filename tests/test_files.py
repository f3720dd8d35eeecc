"""core/files.py: durable atomic writes (the order of fsyncs and the rename, nothing left behind on
failure), the second name of a finished file, and core/cli.py: the commands' one-line errors."""
import json
import os
import stat

import pytest

from core.cli import Parser, run_command
from core.errors import CheckpointError, UsageError
from core.files import link_or_copy_atomic, remove_quietly, write_atomic, write_json_atomic


def recorded_syscalls(monkeypatch):
    """fsync (of a file or a directory) and replace, in the order they happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        real_fsync(descriptor)

    def replace(source, target):
        events.append("replace")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("write", [lambda path: write_atomic(path, lambda f: f.write(b"new")),
                                   lambda path: write_json_atomic(path, {"a": 1})])
def test_a_write_syncs_the_file_renames_it_then_syncs_the_folder(tmp_path, monkeypatch, write):
    events = recorded_syscalls(monkeypatch)
    write(str(tmp_path / "file"))
    assert events == ["fsync file", "replace", "fsync directory"]
    assert os.listdir(tmp_path) == ["file"]


def test_json_is_indented_and_the_folder_is_created(tmp_path):
    path = tmp_path / "logs" / "config.json"
    write_json_atomic(str(path), {"epochs": 2, "mean": [0.5]})
    assert path.read_text() == json.dumps({"epochs": 2, "mean": [0.5]}, indent=2)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, failure):
    path = str(tmp_path / "file")
    write_atomic(path, lambda f: f.write(b"old"))

    def fail_midway(f):
        f.write(b"half")
        raise failure

    with pytest.raises(type(failure)):
        write_atomic(path, fail_midway)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["file"]


def test_a_second_name_keeps_its_content_when_the_first_is_written_again(tmp_path):
    first, second = str(tmp_path / "latest"), str(tmp_path / "best")
    write_atomic(first, lambda f: f.write(b"epoch 1"))
    link_or_copy_atomic(first, second)
    write_atomic(first, lambda f: f.write(b"epoch 2"))
    assert open(second, "rb").read() == b"epoch 1" and open(first, "rb").read() == b"epoch 2"
    assert sorted(os.listdir(tmp_path)) == ["best", "latest"]


def test_a_second_name_is_a_copy_where_links_are_not_supported(tmp_path, monkeypatch):
    first, second = str(tmp_path / "latest"), str(tmp_path / "best")
    write_atomic(first, lambda f: f.write(b"epoch 1"))

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    link_or_copy_atomic(first, second)
    assert open(second, "rb").read() == b"epoch 1" and os.stat(second).st_nlink == 1


def test_remove_quietly_ignores_a_missing_file(tmp_path):
    remove_quietly(str(tmp_path / "absent"))
    (tmp_path / "present").write_text("x")
    remove_quietly(str(tmp_path / "present"))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the commands' shell

@pytest.mark.parametrize("raised, printed", [
    (UsageError("--topk must be at least 1"), "error: --topk must be at least 1\n"),
    (CheckpointError("checkpoint not found: x.pth"), "error: checkpoint not found: x.pth\n"),
    (PermissionError(13, "Permission denied", "out.csv"), "error: [Errno 13] Permission denied: 'out.csv'\n"),
])
def test_a_commands_user_error_or_os_error_is_one_line_and_exit_code_2(capsys, raised, printed):
    def body(argv):
        raise raised

    assert run_command(body, []) == 2
    assert capsys.readouterr() == ("", printed)


def test_a_command_exits_with_its_own_code_or_0(capsys):
    assert run_command(lambda argv: None, []) == 0
    assert run_command(lambda argv: 1, []) == 1


def test_a_bad_flag_is_a_usage_error_with_argparses_message_not_a_usage_dump(capsys):
    parser = Parser(prog="command", allow_abbrev=False)
    parser.add_argument("--topk", type=int)

    def body(argv):
        parser.parse_args(argv)

    assert run_command(body, ["--topk", "many"]) == 2
    assert capsys.readouterr() == ("", "error: argument --topk: invalid int value: 'many'\n")
    with pytest.raises(UsageError, match="unrecognized arguments: --top"):
        parser.parse_args(["--top", "3"])
