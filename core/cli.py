"""The shell every command shares, torch-free: flags parsed without argparse's usage dump, and
every mistake a user can make reported as one `error: ...` line with exit code 2, never a traceback.

    def run(argv):            # the command's body: parse, check, work; raise on a mistake
        ...
    def main(argv=None):
        return run_command(run, argv)

train_ddp.py reports its errors itself (train_ddp.report_error): on every rank, with what was saved.
"""
import argparse
import sys

from core.errors import USER_ERRORS, UsageError, first_line


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake in the flags raises `user_error` with argparse's message (one
    `error:` line from run_command) instead of printing the usage text and exiting."""

    user_error = UsageError

    def error(self, message):
        raise self.user_error(message)


def run_command(body, argv=None):
    """Run `body(argv)` (argv: the command line's words after the program, by default) and return
    the exit code: body's own, or 0. A user error (core.errors) and an OSError (a missing or
    read-only folder, a full disk) are printed as one `error: ...` line and give 2."""
    try:
        return body(sys.argv[1:] if argv is None else argv) or 0
    except (UsageError, *USER_ERRORS) as exc:
        message = str(exc)
    except OSError as exc:
        message = first_line(exc)
    print(f"error: {message}", file=sys.stderr)
    return 2
